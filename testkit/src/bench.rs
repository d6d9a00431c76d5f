//! What the benchmark and soak examples share: which daemon binary they run, the figures they
//! read from `/proc`, and the configuration a benchmark daemon starts with.

use std::path::{Path, PathBuf};

use crate::Pki;

/// The daemon to run: `SITERELAY_BIN` if set (to compare two builds), else the `siterelay`
/// binary in the calling example's target directory (`target/<profile>/examples/NAME` ->
/// `target/<profile>/siterelay`).
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SITERELAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("siterelay"))
        .expect("target directory")
}

/// A `/proc/PID/status` figure in KiB (`key` with its colon: `"VmRSS:"`, `"VmHWM:"`,
/// `"RssAnon:"`); 0 when the process or the line is gone.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The configuration of a benchmark daemon: one MLLP feed `feed` on `127.0.0.1:listen_port`,
/// the broker (or a proxy in front of it) at `localhost:mqtt_port` with `pki`'s client
/// certificate, reconnecting at most a second apart, logging warnings only.
pub fn config_text(
    appliance_id: &str,
    data_dir: &Path,
    mqtt_port: u16,
    pki: &Pki,
    feed: &str,
    listen_port: u16,
) -> String {
    format!(
        r#"appliance_id = "{appliance_id}"
organisation = "RXX"
data_dir = "{data}"
[log]
level = "warn"
[mqtt]
host = "localhost"
port = {mqtt_port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
reconnect_max = "1s"
[[mllp]]
name = "{feed}"
listen = "127.0.0.1:{listen_port}"
"#,
        data = data_dir.display(),
        ca = pki.ca_file().display(),
        cert = pki.client_cert_file().display(),
        key = pki.client_key_file().display(),
    )
}
