//! Launches a real Mosquitto broker (mutual TLS on 127.0.0.1) for tests that want one.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::{Child, Command};

use crate::pki::Pki;

/// Environment variable that turns a missing Mosquitto into a test failure instead of a skip.
pub const REQUIRE_MOSQUITTO_ENV: &str = "SITERELAY_REQUIRE_MOSQUITTO";

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The `mosquitto` binary: first on `PATH`, then `/usr/sbin/mosquitto`,
/// `/usr/local/sbin/mosquitto`.
pub fn find_mosquitto() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .map(|d| d.join("mosquitto"))
        .chain([
            PathBuf::from("/usr/sbin/mosquitto"),
            PathBuf::from("/usr/local/sbin/mosquitto"),
        ])
        .find(|p| is_executable(p))
}

/// Whether a `mosquitto` binary can be found.
pub fn mosquitto_available() -> bool {
    find_mosquitto().is_some()
}

/// For tests: true if Mosquitto is available. If it is missing, panics when
/// `SITERELAY_REQUIRE_MOSQUITTO=1`, else prints "mosquitto not installed: skipping" and
/// returns false (the caller should then return early).
pub fn mosquitto_or_skip() -> bool {
    if mosquitto_available() {
        return true;
    }
    if std::env::var(REQUIRE_MOSQUITTO_ENV).as_deref() == Ok("1") {
        panic!(
            "mosquitto not found (apt-get install mosquitto), and {REQUIRE_MOSQUITTO_ENV}=1 requires it"
        );
    }
    println!("mosquitto not installed: skipping");
    false
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A running Mosquitto process (killed on drop) listening with mutual TLS on
/// `127.0.0.1:port()`. Clients authenticate with a certificate of the PKI; its CN becomes the
/// MQTT username (`use_identity_as_username`), which an ACL can refer to.
pub struct Mosquitto {
    bin: PathBuf,
    config_file: PathBuf,
    log_file: PathBuf,
    port: u16,
    child: Option<Child>,
    probe_tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Mosquitto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mosquitto")
            .field("port", &self.port)
            .field("config_file", &self.config_file)
            .finish_non_exhaustive()
    }
}

impl Mosquitto {
    /// Writes a config into `dir` (CA, server cert/key from `pki`, `require_certificate`,
    /// `use_identity_as_username`, no persistence, optional ACL file with the given
    /// contents), starts Mosquitto on a free port and waits (up to 10 s) until it accepts a
    /// TLS connection. Errors include the tail of Mosquitto's log.
    pub async fn start(pki: &Pki, dir: &Path, acl: Option<&str>) -> Result<Mosquitto> {
        Self::start_on(pki, dir, acl, 0).await
    }

    /// Like [`Mosquitto::start`] on a given port (0 = pick a free one), e.g. to bring a broker
    /// back on the port a client is configured for.
    pub async fn start_on(
        pki: &Pki,
        dir: &Path,
        acl: Option<&str>,
        port: u16,
    ) -> Result<Mosquitto> {
        Self::start_with(pki, dir, acl, port, "").await
    }

    /// Like [`Mosquitto::start_on`], with `extra` lines added to the configuration's global
    /// section (e.g. `max_packet_size 200000`).
    pub async fn start_with(
        pki: &Pki,
        dir: &Path,
        acl: Option<&str>,
        port: u16,
        extra: &str,
    ) -> Result<Mosquitto> {
        let bin = find_mosquitto()
            .ok_or_else(|| anyhow!("mosquitto not found (apt-get install mosquitto)"))?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = if port == 0 { crate::free_port() } else { port };
        let stem = format!("mosquitto-{}-{port}", pki.name());
        let config_file = dir.join(format!("{stem}.conf"));
        let log_file = dir.join(format!("{stem}.log"));
        let acl_line = match acl {
            Some(contents) => {
                let acl_file = dir.join(format!("{stem}.acl"));
                fs::write(&acl_file, contents)
                    .with_context(|| format!("writing {}", acl_file.display()))?;
                format!("acl_file {}\n", acl_file.display())
            }
            None => String::new(),
        };
        let config = format!(
            "# written by siterelay-testkit\n\
             # Stay root when started as root (else Mosquitto switches to user 'mosquitto',\n\
             # which may not be able to read the 0600 keys).\n\
             user root\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             log_type subscribe\n\
             log_type unsubscribe\n\
             connection_messages true\n\
             allow_anonymous false\n\
             {acl_line}\
             {extra}\n\
             listener {port} 127.0.0.1\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             use_identity_as_username true\n",
            ca = pki.ca_file().display(),
            cert = pki.server_cert_file().display(),
            key = pki.server_key_file().display(),
        );
        Self::start_config_file(pki, bin, config_file, log_file, port, &config).await
    }

    /// Starts Mosquitto with a whole configuration given as text (e.g. a shipped
    /// configuration file with its paths replaced), written into `dir`. The configuration must
    /// listen with TLS on `127.0.0.1:port` with the PKI's server certificate (the readiness
    /// probe connects there with the PKI's client certificate).
    pub async fn start_with_config_text(
        pki: &Pki,
        dir: &Path,
        port: u16,
        config: &str,
    ) -> Result<Mosquitto> {
        let bin = find_mosquitto()
            .ok_or_else(|| anyhow!("mosquitto not found (apt-get install mosquitto)"))?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stem = format!("mosquitto-{}-{port}", pki.name());
        let config_file = dir.join(format!("{stem}.conf"));
        let log_file = dir.join(format!("{stem}.log"));
        Self::start_config_file(pki, bin, config_file, log_file, port, config).await
    }

    async fn start_config_file(
        pki: &Pki,
        bin: PathBuf,
        config_file: PathBuf,
        log_file: PathBuf,
        port: u16,
        config: &str,
    ) -> Result<Mosquitto> {
        fs::write(&config_file, config)
            .with_context(|| format!("writing {}", config_file.display()))?;
        let probe_tls = pki.client_tls_config()?;
        let mut m = Mosquitto {
            bin,
            config_file,
            log_file,
            port,
            child: None,
            probe_tls,
        };
        m.spawn_and_wait().await?;
        Ok(m)
    }

    /// The TLS port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The generated configuration file.
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// The file Mosquitto's stdout/stderr go to (appended across restarts).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Everything Mosquitto logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Whether the process is running (false after [`Mosquitto::stop`] or if it died).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills Mosquitto (SIGKILL) and waits for it to exit; clients see the connection drop.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Rewrites the global `extra` lines of the configuration (the next [`Mosquitto::restart`]
    /// uses them), e.g. to raise `max_packet_size`.
    pub fn set_extra_config(&mut self, old: &str, new: &str) -> Result<()> {
        let text = fs::read_to_string(&self.config_file)?;
        if !text.contains(old) {
            bail!("{} does not contain {old:?}", self.config_file.display());
        }
        fs::write(&self.config_file, text.replacen(old, new, 1))?;
        Ok(())
    }

    /// Stops Mosquitto if running, then starts it again on the same port with the same config
    /// and waits until it accepts TLS connections.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.spawn_and_wait().await
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .with_context(|| format!("opening {}", self.log_file.display()))?;
        let log2 = log.try_clone()?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);

        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut last_err;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!(
                    "mosquitto exited at startup ({status}); log tail:\n{}",
                    self.log_tail(30)
                );
            }
            match tokio::time::timeout(Duration::from_secs(2), self.probe()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_err = format!("{e:#}"),
                Err(_) => last_err = "TLS probe timed out".to_string(),
            }
            if tokio::time::Instant::now() >= deadline {
                self.stop().await;
                bail!(
                    "mosquitto did not accept TLS connections on 127.0.0.1:{} within {READY_TIMEOUT:?} (last error: {last_err}); log tail:\n{}",
                    self.port,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One TLS handshake (with the PKI's client certificate) to the listener.
    async fn probe(&self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let connector = tokio_rustls::TlsConnector::from(self.probe_tls.clone());
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let mut tls = connector.connect(name, tcp).await?;
        let _ = tls.shutdown().await;
        Ok(())
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
