//! `siterelay enrol`: the key and request are made on the box, the central side signs the request
//! with the openssl commands docs/operations.md gives (run here exactly as written there), the
//! certificate is checked and installed, and the daemon then delivers a record to a real
//! Mosquitto over mutual TLS with it. Every refusal is one sentence naming what is wrong.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// The box's TLS directory and a config pointing at it, as the package lays them out.
struct BoxFiles {
    config: PathBuf,
    key: PathBuf,
    cert: PathBuf,
    ca: PathBuf,
}

fn box_files(env: &Env, broker_port: u16, feeds: &[(&str, &str)]) -> BoxFiles {
    let tls = env.dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (key, cert, ca) = (
        tls.join("client.key"),
        tls.join("client.pem"),
        tls.join("ca.pem"),
    );
    let text = env
        .config_text(broker_port, feeds, "")
        .replace(
            &env.pki.client_cert_file().display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &env.pki.client_key_file().display().to_string(),
            &key.display().to_string(),
        )
        .replace(
            &env.pki.ca_file().display().to_string(),
            &ca.display().to_string(),
        );
    let config = env.write_config("box.toml", &text);
    BoxFiles {
        config,
        key,
        cert,
        ca,
    }
}

fn enrol(b: &BoxFiles, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("enrol")
        .arg("--config")
        .arg(&b.config)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The central side's block of docs/operations.md ("Enrolling a box"): the shell block that
/// signs with `openssl x509 -req`.
fn documented_signing_commands() -> String {
    let doc = include_str!("../docs/operations.md");
    let section = doc
        .split("## Enrolling a box")
        .nth(1)
        .expect("operations.md has 'Enrolling a box'");
    section
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap())
        .find(|b| b.contains("openssl x509 -req"))
        .expect("a shell block with the openssl signing command")
        .to_string()
}

/// Run the documented commands in a directory holding `box.csr`, `ca.pem` and `ca.key`, as
/// the central team would; returns `box.pem`.
fn sign_as_documented(csr: &Path, ca: &Path, ca_key: &Path, workdir: &Path) -> PathBuf {
    std::fs::create_dir_all(workdir).unwrap();
    std::fs::copy(csr, workdir.join("box.csr")).unwrap();
    std::fs::copy(ca, workdir.join("ca.pem")).unwrap();
    std::fs::copy(ca_key, workdir.join("ca.key")).unwrap();
    let out = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &documented_signing_commands()])
        .current_dir(workdir)
        .output()
        .expect("bash and openssl");
    let (o, e) = text(&out);
    assert!(
        out.status.success(),
        "the documented openssl commands failed:\n{o}\n{e}"
    );
    assert!(
        o.contains("subject=CN = "),
        "the documented check shows the subject: {o}"
    );
    workdir.join("box.pem")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_box_signed_with_the_documented_openssl_commands_delivers_over_mutual_tls() {
    if !mosquitto_or_skip() {
        return;
    }
    let env = Env::new();
    let broker = Broker::start(Kind::Mosquitto, &env).await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let b = box_files(&env, broker.port, &[("adt", &listen)]);

    // Step 1 on the box: key (0600, never printed) and request.
    let csr = env.dir.path().join("box.csr");
    let out = enrol(&b, &["--csr", csr.to_str().unwrap()]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "enrol failed: {o}{e}");
    assert_eq!(mode(&b.key), 0o600, "the key is private");
    let key_text = std::fs::read_to_string(&b.key).unwrap();
    assert!(key_text.contains("-----BEGIN PRIVATE KEY-----"));
    assert!(
        !o.contains("PRIVATE KEY") && !e.contains("PRIVATE KEY"),
        "the key is never printed"
    );
    let key_body = key_text.lines().nth(1).unwrap();
    assert!(!o.contains(key_body) && !e.contains(key_body));
    assert!(
        e.contains("siterelay enrol --install-cert"),
        "says what comes next: {e}"
    );
    // The fingerprint printed is the one the central side computes from the request.
    let fp = e
        .lines()
        .find_map(|l| {
            l.strip_prefix("Public key SHA-256 (they compare it with the request they receive): ")
        })
        .expect("fingerprint line")
        .to_string();

    // Central side: the request carries what the docs say; signed exactly as documented.
    let req = Command::new("openssl")
        .args(["req", "-noout", "-text", "-in"])
        .arg(&csr)
        .output()
        .unwrap();
    let req_text = String::from_utf8_lossy(&req.stdout);
    assert!(req_text.contains("CN = test-box"), "{req_text}");
    assert!(
        req_text.contains("TLS Web Client Authentication"),
        "{req_text}"
    );
    let signed = sign_as_documented(
        &csr,
        &env.pki.ca_file(),
        &env.pki.ca_key_file(),
        &env.dir.path().join("central"),
    );
    let central_fp = Command::new("bash")
        .args([
            "-c",
            "openssl req -in box.csr -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -c",
        ])
        .current_dir(env.dir.path().join("central"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&central_fp.stdout).contains(&fp),
        "the central side's SHA-256 of the request's key is the one the box printed ({fp})"
    );

    // Step 2 on the box: checked, installed, told to reload.
    let out = enrol(
        &b,
        &[
            "--install-cert",
            signed.to_str().unwrap(),
            "--ca",
            env.pki.ca_file().to_str().unwrap(),
        ],
    );
    let (o, e) = text(&out);
    assert!(out.status.success(), "install refused: {o}{e}");
    assert!(o.contains("systemctl reload siterelay"), "{o}");
    assert_eq!(
        std::fs::read(&b.cert).unwrap(),
        std::fs::read(&signed).unwrap()
    );
    assert_eq!(
        std::fs::read(&b.ca).unwrap(),
        std::fs::read(env.pki.ca_file()).unwrap()
    );
    assert_eq!(mode(&b.cert), 0o644);
    assert_eq!(mode(&b.ca), 0o644);
    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&b.config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check-config accepts the enrolled box: {:?}",
        text(&check)
    );

    // The daemon delivers a record to Mosquitto with the enrolled identity.
    let mut records = broker
        .subscribe(&env, &format!("siterelay/{APPLIANCE}/records/#"))
        .await;
    let p = Proc::start(&b.config, env.dir.path().join("run.log"));
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(c.send(&adt("ENROL1"), ACK_WAIT).await.unwrap().code, "AA");
    let (_, payload, _) = records
        .recv(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no record delivered; daemon log:\n{}", p.log()));
    assert_eq!(json(&payload)["hl7"]["control_id"], "ENROL1");
}

/// A box enrolled (step 1 done), for the refusals.
fn enrolled(env: &Env) -> (BoxFiles, PathBuf) {
    let b = box_files(env, 1883, &[]);
    let csr = env.dir.path().join("box.csr");
    let out = enrol(&b, &["--csr", csr.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    (b, csr)
}

/// `--install-cert CERT --ca CA` must be refused with one line naming the problem, and leave
/// nothing installed.
fn refused(b: &BoxFiles, cert: &Path, ca: &Path) -> String {
    let out = enrol(
        b,
        &[
            "--install-cert",
            cert.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
        ],
    );
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(1), "refused with exit 1: {o}{e}");
    assert_eq!(e.trim().lines().count(), 1, "one sentence: {e}");
    assert!(!b.cert.exists(), "nothing installed on a refusal");
    assert!(!b.ca.exists(), "nothing installed on a refusal");
    e
}

#[test]
fn a_certificate_issued_for_another_key_is_refused() {
    let env = Env::new();
    let (b, _) = enrolled(&env);
    let (other, _) = env.pki.issue_client(APPLIANCE).unwrap();
    let e = refused(&b, &other, &env.pki.ca_file());
    assert!(e.contains("was issued for another key"), "{e}");
    assert!(e.contains(&b.key.display().to_string()), "{e}");
}

#[test]
fn a_certificate_naming_another_appliance_is_refused() {
    let env = Env::new();
    let (b, _) = enrolled(&env);
    // The central team typed the wrong name: a request for this key with another CN.
    let central = env.dir.path().join("central");
    std::fs::create_dir_all(&central).unwrap();
    let other_csr = central.join("other.csr");
    let st = Command::new("openssl")
        .args(["req", "-new", "-subj", "/CN=other-box", "-key"])
        .arg(&b.key)
        .arg("-out")
        .arg(&other_csr)
        .status()
        .unwrap();
    assert!(st.success());
    let signed = sign_as_documented(
        &other_csr,
        &env.pki.ca_file(),
        &env.pki.ca_key_file(),
        &central,
    );
    let e = refused(&b, &signed, &env.pki.ca_file());
    assert!(
        e.contains("names CN=\"other-box\", but this box's appliance_id is \"test-box\""),
        "{e}"
    );
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let env = Env::new();
    let (b, csr) = enrolled(&env);
    let other =
        siterelay_testkit::pki::Pki::generate(&env.dir.path().join("other"), "other").unwrap();
    let signed = sign_as_documented(
        &csr,
        &other.ca_file(),
        &other.ca_key_file(),
        &env.dir.path().join("central"),
    );
    let e = refused(&b, &signed, &env.pki.ca_file());
    assert!(e.contains("does not chain to the CA"), "{e}");
    assert!(e.contains("not signed by that CA"), "{e}");
}

#[test]
fn an_expired_certificate_is_refused_with_its_date() {
    let env = Env::new();
    let b = box_files(&env, 1883, &[]);
    // A box whose key was enrolled long ago and whose certificate ran out on 2025-01-31.
    let day = |y, m, d| {
        time::Date::from_calendar_date(y, m, d)
            .unwrap()
            .midnight()
            .assume_utc()
    };
    let (cert, key) = env
        .pki
        .issue_client_dated(
            APPLIANCE,
            day(2024, time::Month::February, 1),
            day(2025, time::Month::January, 31),
            "expired",
        )
        .unwrap();
    std::fs::copy(&key, &b.key).unwrap();
    let e = refused(&b, &cert, &env.pki.ca_file());
    assert!(e.contains("expired on 2025-01-31"), "{e}");
    assert!(e.contains("today is "), "{e}");
}

#[test]
fn a_leaf_given_as_the_ca_is_refused() {
    let env = Env::new();
    let (b, csr) = enrolled(&env);
    let signed = sign_as_documented(
        &csr,
        &env.pki.ca_file(),
        &env.pki.ca_key_file(),
        &env.dir.path().join("central"),
    );
    let e = refused(&b, &signed, &signed);
    assert!(e.contains("which is not a CA certificate"), "{e}");
}

#[test]
fn an_existing_key_is_kept_unless_forced() {
    let env = Env::new();
    let (b, _) = enrolled(&env);
    let before = std::fs::read(&b.key).unwrap();
    let out = enrol(&b, &[]);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        e.contains("already holds a key") && e.contains("--force"),
        "{e}"
    );
    assert!(
        !o.contains("CERTIFICATE REQUEST"),
        "no request without a new key"
    );
    assert_eq!(
        std::fs::read(&b.key).unwrap(),
        before,
        "the key is untouched"
    );

    let out = enrol(&b, &["--force"]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{e}");
    assert!(o.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{o}");
    assert_ne!(std::fs::read(&b.key).unwrap(), before, "a new key");
    assert_eq!(mode(&b.key), 0o600);
}

#[test]
fn a_certificate_without_client_authentication_is_refused() {
    let env = Env::new();
    let (b, csr) = enrolled(&env);
    // Signed for a server, not a client: extendedKeyUsage serverAuth only.
    let central = env.dir.path().join("central");
    std::fs::create_dir_all(&central).unwrap();
    std::fs::write(
        central.join("server.ext"),
        "basicConstraints = critical, CA:FALSE\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    let signed = central.join("server-use.pem");
    let st = Command::new("openssl")
        .args(["x509", "-req", "-days", "30", "-sha256", "-extfile"])
        .arg(central.join("server.ext"))
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(env.pki.ca_file())
        .arg("-CAkey")
        .arg(env.pki.ca_key_file())
        .arg("-CAcreateserial")
        .arg("-out")
        .arg(&signed)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let e = refused(&b, &signed, &env.pki.ca_file());
    assert!(
        e.contains("does not allow client authentication (its extendedKeyUsage lacks clientAuth)"),
        "{e}"
    );
}
