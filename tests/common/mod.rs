//! Shared set-up for the end-to-end tests: a throwaway PKI, a real broker (in-process or
//! Mosquitto), a config file written the way a user would, and synthetic HL7 messages.
#![allow(dead_code)]

pub mod analyser;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::time::Duration;

use siterelay::client::MllpClient;
use siterelay::config::Config;
use siterelay_testkit::broker::{BrokerOptions, Fault, TestBroker};
use siterelay_testkit::mosquitto::Mosquitto;
use siterelay_testkit::pki::Pki;
use siterelay_testkit::proxy::{Mode, Proxy};
use siterelay_testkit::subscriber::Subscriber;
use std::process::{Child, Command, Stdio};

use tokio::net::TcpStream;

pub const APPLIANCE: &str = "test-box";
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// Which real broker a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    InProcess,
    Mosquitto,
}

#[allow(clippy::large_enum_variant)]
pub enum Inner {
    Test(TestBroker),
    Mosq(Mosquitto),
    Down,
}

/// A broker that can be stopped and started again on the same port.
///
/// Mosquitto sits behind a [`Proxy`] the test controls (`port` is the proxy's, where siterelay
/// connects; [`Broker::central_port`] is Mosquitto's own, where the central side's test clients
/// connect), so a test can keep the appliance out while its subscriber gets in place: MQTT
/// keeps nothing for a topic nobody subscribes to. The in-process broker does the same with
/// [`Fault::RefuseConnect`].
pub struct Broker {
    pub kind: Kind,
    pub port: u16,
    pub inner: Inner,
    dir: PathBuf,
    /// Mosquitto ACL file contents, if any.
    pub acl: Option<String>,
    /// Mosquitto's own port (the in-process broker: the same as `port`).
    real_port: u16,
    /// In front of Mosquitto: closed while the broker is down or the appliance is kept out.
    gate: Option<Proxy>,
    /// Extra global Mosquitto configuration lines (e.g. `max_packet_size 200000`).
    pub mosquitto_extra: String,
    /// In-process broker: the Maximum Packet Size it announces and enforces.
    pub max_packet_size: Option<u32>,
}

impl Broker {
    pub async fn start(kind: Kind, env: &Env) -> Broker {
        let mut b = Broker::down(kind, env);
        b.up(env).await;
        b
    }

    /// A broker not yet running, with its port reserved.
    pub fn down(kind: Kind, env: &Env) -> Broker {
        let port = siterelay_testkit::free_port();
        Broker {
            kind,
            port,
            inner: Inner::Down,
            dir: env.dir.path().join("broker"),
            acl: None,
            real_port: match kind {
                Kind::InProcess => port,
                Kind::Mosquitto => siterelay_testkit::free_port(),
            },
            gate: None,
            mosquitto_extra: String::new(),
            max_packet_size: None,
        }
    }

    /// Where the central side's test clients connect (past the proxy in front of Mosquitto).
    pub fn central_port(&self) -> u16 {
        self.real_port
    }

    pub async fn up(&mut self, env: &Env) {
        self.up_with_fault(env, Fault::None).await
    }

    /// Start with a fault already active. Mosquitto knows only [`Fault::RefuseConnect`]: its
    /// proxy stays closed, so siterelay cannot connect until [`Broker::let_appliance_in`].
    pub async fn up_with_fault(&mut self, env: &Env, fault: Fault) {
        std::fs::create_dir_all(&self.dir).unwrap();
        self.inner = match self.kind {
            Kind::InProcess => {
                let mut o = BrokerOptions::from_pki(&env.pki).with_port(self.port);
                o.fault = fault;
                o.max_packet_size = self.max_packet_size;
                Inner::Test(TestBroker::start(o).await.expect("start in-process broker"))
            }
            Kind::Mosquitto => Inner::Mosq(
                Mosquitto::start_with(
                    &env.pki,
                    &self.dir,
                    self.acl.as_deref(),
                    self.real_port,
                    &self.mosquitto_extra,
                )
                .await
                .expect("start mosquitto"),
            ),
        };
        if self.kind == Kind::Mosquitto {
            let mode = if fault == Fault::RefuseConnect {
                Mode::Closed
            } else {
                Mode::Pass
            };
            match &self.gate {
                Some(g) => g.set(mode).await,
                None => {
                    self.gate = Some(Proxy::start_on(self.port, self.real_port, mode).await);
                }
            }
        }
    }

    pub async fn stop(&mut self) {
        // The broker first, then its proxy: a broker that dies publishes no Last Will.
        match std::mem::replace(&mut self.inner, Inner::Down) {
            Inner::Test(b) => b.shutdown().await,
            Inner::Mosq(mut m) => m.stop().await,
            Inner::Down => {}
        }
        if let Some(g) = &self.gate {
            g.set(Mode::Closed).await;
        }
    }

    pub fn test_broker(&self) -> &TestBroker {
        match &self.inner {
            Inner::Test(b) => b,
            _ => panic!("not an in-process broker"),
        }
    }

    pub fn set_fault(&self, f: Fault) {
        self.test_broker().set_fault(f)
    }

    /// After `up_with_fault(Fault::RefuseConnect)`: let siterelay connect (in-process: clear
    /// the fault; Mosquitto: open its proxy).
    pub async fn let_appliance_in(&self) {
        match (&self.inner, &self.gate) {
            (Inner::Test(b), _) => b.set_fault(Fault::None),
            (Inner::Mosq(_), Some(g)) => g.set(Mode::Pass).await,
            _ => panic!("no broker running"),
        }
    }

    pub async fn subscribe(&self, env: &Env, filter: &str) -> Subscriber {
        Subscriber::connect(self.real_port, &env.pki, None, filter)
            .await
            .expect("subscriber connects")
    }
}

/// A temporary directory with a PKI.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path(), "main").unwrap();
        Env { dir, pki }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Config text as a user would write it. `feeds` are (name, listen address).
    pub fn config_text(
        &self,
        broker_port: u16,
        feeds: &[(&str, &str)],
        mqtt_extra: &str,
    ) -> String {
        let mut s = format!(
            r#"appliance_id = "{APPLIANCE}"
organisation = "RXX"
data_dir = "{data}"

[log]
level = "info"

[mqtt]
host = "localhost"
port = {broker_port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
reconnect_max_secs = 1
{mqtt_extra}
"#,
            data = self.data_dir().display(),
            ca = self.pki.ca_file().display(),
            cert = self.pki.client_cert_file().display(),
            key = self.pki.client_key_file().display(),
        );
        for (name, listen) in feeds {
            s.push_str(&format!(
                "\n[[mllp]]\nname = \"{name}\"\nlisten = \"{listen}\"\n"
            ));
        }
        s
    }

    pub fn config(&self, broker_port: u16, feeds: &[(&str, &str)], mqtt_extra: &str) -> Config {
        let text = self.config_text(broker_port, feeds, mqtt_extra);
        siterelay::config::parse(Path::new("test.toml"), &text).expect("valid test config")
    }

    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// A synthetic ADT^A01 in original acknowledgement mode (no MSH-15), NHS number from the
/// never-issued 999 range.
pub fn adt(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20261130093000||ADT^A01^ADT_A01|{control_id}|P|2.4\r\
EVN|A01|20261130093000\r\
PID|1||9990000018^^^NHS^NH~MRN{control_id}^^^RXX^MR||TEST^PATIENT^ONE||19800615|F|||1 TEST STREET^^TESTTOWN^^ZZ99 9ZZ\r\
PV1|1|I|WARD1^BED1^^RXX||||C1234^DOCTOR^TEST\r"
    )
    .into_bytes()
}

pub async fn connect(addr: std::net::SocketAddr) -> MllpClient<TcpStream> {
    MllpClient::new(TcpStream::connect(addr).await.expect("connect to listener"))
}

/// Check a payload against one of the published JSON Schemas in `docs/schema/`.
pub fn check_schema(name: &str, v: &serde_json::Value) {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static SCHEMAS: OnceLock<HashMap<&'static str, jsonschema::Validator>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        let texts = [
            (
                "record",
                include_str!("../../docs/schema/record.v1.schema.json"),
            ),
            (
                "status",
                include_str!("../../docs/schema/status.v1.schema.json"),
            ),
            (
                "health",
                include_str!("../../docs/schema/health.v1.schema.json"),
            ),
            (
                "inventory",
                include_str!("../../docs/schema/inventory.v1.schema.json"),
            ),
            (
                "cmd-reply",
                include_str!("../../docs/schema/cmd-reply.v1.schema.json"),
            ),
        ];
        texts
            .into_iter()
            .map(|(n, t)| {
                let schema: serde_json::Value = serde_json::from_str(t).expect("schema is JSON");
                (
                    n,
                    jsonschema::validator_for(&schema).expect("schema compiles"),
                )
            })
            .collect()
    });
    let validator = schemas
        .get(name)
        .unwrap_or_else(|| panic!("no schema {name}"));
    let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{name} payload violates its schema: {errors:?}\n{v}"
    );
}

/// Parse a record payload and check it against `docs/schema/record.v1.schema.json`.
pub fn json(payload: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("record is JSON");
    check_schema("record", &v);
    v
}

/// Wait until `f` is true or the timeout passes.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// Mosquitto availability: a failure when CI requires it, a visible skip otherwise.
pub fn mosquitto_or_skip() -> bool {
    if siterelay_testkit::mosquitto::mosquitto_available() {
        return true;
    }
    if std::env::var("SITERELAY_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
        panic!(
            "SITERELAY_REQUIRE_MOSQUITTO=1 but mosquitto is not installed (apt-get install mosquitto)"
        );
    }
    eprintln!(
        "mosquitto not installed: skipping (set SITERELAY_REQUIRE_MOSQUITTO=1 to make this a failure)"
    );
    false
}

pub const BIN: &str = env!("CARGO_BIN_EXE_siterelay");

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(config: &Path, log: PathBuf) -> Proc {
        Proc::start_with_env(config, log, &[])
    }

    pub fn start_with_env(config: &Path, log: PathBuf, env: &[(&str, &str)]) -> Proc {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn sigterm(&mut self) -> Option<std::process::ExitStatus> {
        unsafe_free_sigterm(self.child.id());
        for _ in 0..100 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_free_sigterm(pid: u32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

pub async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("siterelay did not listen on {port}");
}

/// One row of the fault table in docs/reliability.md, printed by a fault test (shown with
/// `--nocapture`) and gathered by `scripts/fault-table`. `recovered`: forwarding resumed and
/// everything acknowledged was delivered without anyone touching the box.
pub struct FaultRow<'a> {
    pub fault: &'a str,
    pub sent: usize,
    pub acked: usize,
    /// Distinct records (`id`) at the central side.
    pub delivered: usize,
    /// Records received again with an `id` already seen.
    pub duplicated: usize,
    pub lost: usize,
    pub recovered: bool,
}

impl FaultRow<'_> {
    pub fn print(&self) {
        println!(
            "FAULT-ROW | {} | {} | {} | {} | {} | {} | {} |",
            self.fault,
            self.sent,
            self.acked,
            self.delivered,
            self.duplicated,
            self.lost,
            if self.recovered { "yes" } else { "no" }
        );
    }
}
