//! The real `siterelay` binary: SIGKILL durability, SIGTERM, TLS refusals in the log, the
//! `check-config`, `send` and `queue stats` commands, and where the configuration is read from.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use siterelay_testkit::pki::Pki;

/// `s.toml` with one MLLP feed, `adt`, on a free port: (config path, listen address, port).
fn one_feed_config(env: &Env, broker: &Broker) -> (PathBuf, String, u16) {
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = env.write_config(
        "s.toml",
        &env.config_text(broker.port, &[("adt", &listen)], ""),
    );
    (cfg, listen, port)
}

fn pending(env: &Env) -> u64 {
    let r = siterelay::outbox::Reader::open(&env.data_dir().join("outbox.sqlite")).unwrap();
    r.stats().unwrap().iter().map(|s| s.pending).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_message_survives_sigkill_and_is_delivered_after_restart() {
    let env = Env::new();
    let mut broker = Broker::down(Kind::InProcess, &env);
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = env.write_config(
        "s.toml",
        &env.config_text(broker.port, &[("adt", &listen)], ""),
    );
    let mut p = Proc::start(&cfg, env.dir.path().join("run1.log"));
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    let mut ids = HashSet::new();
    for i in 0..100 {
        let id = format!("K{i}");
        assert_eq!(c.send(&adt(&id), ACK_WAIT).await.unwrap().code, "AA");
        ids.insert(id);
    }
    p.kill9();
    assert_eq!(
        pending(&env),
        100,
        "all ACKed messages are in the file after SIGKILL"
    );

    broker.up(&env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let mut p = Proc::start(&cfg, env.dir.path().join("run2.log"));
    let got = sub.collect(100, Duration::from_secs(30)).await;
    let seen: HashSet<String> = got
        .iter()
        .map(|(_, pl, _)| json(pl)["hl7"]["control_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, ids);
    FaultRow {
        fault: "SIGKILL after 100 ACKs (broker down), then restart",
        sent: 100,
        acked: 100,
        delivered: seen.len(),
        duplicated: got.len() - seen.len(),
        lost: ids.difference(&seen).count(),
        recovered: seen == ids,
    }
    .print();
    assert!(wait_until(Duration::from_secs(10), || pending(&env) == 0).await);
    let status = p.sigterm().expect("exits within 10 s of SIGTERM");
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        p.log()
    );
    let log = p.log();
    assert!(log.contains("siterelay stopped"), "{log}");
    assert!(
        !log.contains("TEST^PATIENT") && !log.contains("9990000018"),
        "no patient data in logs"
    );
}

async fn refused_connection_is_logged(use_other_client: bool) {
    let env = Env::new();
    let other = Pki::generate(env.dir.path(), "other").unwrap();
    let mut broker = Broker::down(Kind::InProcess, &env);
    if !use_other_client {
        // The broker presents a certificate from a CA the appliance does not trust.
        let mut o = siterelay_testkit::broker::BrokerOptions::from_pki(&env.pki);
        o.cert_file = other.server_cert_file();
        o.key_file = other.server_key_file();
        o.port = broker.port;
        broker.inner = Inner::Test(
            siterelay_testkit::broker::TestBroker::start(o)
                .await
                .unwrap(),
        );
    } else {
        broker.up(&env).await;
    }
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut text = env.config_text(broker.port, &[("adt", &listen)], "");
    if use_other_client {
        text = text
            .replace(
                &env.pki.client_cert_file().display().to_string(),
                &other.client_cert_file().display().to_string(),
            )
            .replace(
                &env.pki.client_key_file().display().to_string(),
                &other.client_key_file().display().to_string(),
            );
    }
    let cfg = env.write_config("s.toml", &text);
    let p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(c.send(&adt("T1"), ACK_WAIT).await.unwrap().code, "AA");
    let ok = wait_until(Duration::from_secs(10), || {
        p.log().contains("MQTT connection failed")
    })
    .await;
    assert!(ok, "the failure is logged:\n{}", p.log());
    // Keeps retrying (backoff 0.5 s to 1 s here) without delivering anything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = p.log();
    let reason_named = if use_other_client {
        // The broker rejects our certificate: TLS 1.3 reports it as an alert after the handshake.
        log.contains("the broker refused this appliance's client certificate (UnknownCA)")
    } else {
        // In plain words (src/tls.rs), without rumqttc's or rustls's wrapping.
        log.contains("error=the broker's certificate does not chain to mqtt.ca_file")
    };
    assert!(reason_named, "the TLS reason is in the log:\n{log}");
    assert!(
        !log.contains("serialization/deserialization"),
        "no misleading prefix:\n{log}"
    );
    assert_eq!(pending(&env), 1, "the record stays pending");
    if use_other_client {
        assert!(broker.test_broker().handshake_failures() >= 1);
    }
    assert_eq!(broker.test_broker().publishes_received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused_and_the_reason_logged() {
    refused_connection_is_logged(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_certificate_from_another_ca_is_refused_and_the_reason_logged() {
    refused_connection_is_logged(false).await;
}

fn check_config(path: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_reports_each_problem_with_file_and_line() {
    let env = Env::new();
    let good = env.config_text(8883, &[("adt", "0.0.0.0:2575")], "");
    let p = env.write_config("good.toml", &good);
    let (ok, err) = check_config(&p);
    assert!(ok, "{err}");

    // Unknown key.
    let bad = good.replace(
        "reconnect_max_secs = 1",
        "reconnect_max_secs = 1\nreconect = 5",
    );
    let line = bad.lines().position(|l| l.starts_with("reconect")).unwrap() + 1;
    let p = env.write_config("unknown.toml", &bad);
    let (ok, err) = check_config(&p);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "unknown.toml:{line}: mqtt.reconect: unknown key: remove it or fix its spelling"
        )),
        "{err}"
    );

    // Bad address.
    let bad = good.replace("0.0.0.0:2575", "0.0.0.0:99999");
    let line = bad.lines().position(|l| l.starts_with("listen")).unwrap() + 1;
    let p = env.write_config("addr.toml", &bad);
    let (ok, err) = check_config(&p);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "addr.toml:{line}: mllp[0].listen: '0.0.0.0:99999' is not a socket address"
        )),
        "{err}"
    );

    // Missing certificate file.
    let missing = env.dir.path().join("nope/client.pem");
    let bad = good.replace(
        &env.pki.client_cert_file().display().to_string(),
        &missing.display().to_string(),
    );
    let line = bad
        .lines()
        .position(|l| l.starts_with("cert_file"))
        .unwrap()
        + 1;
    let p = env.write_config("cert.toml", &bad);
    let (ok, err) = check_config(&p);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "cert.toml:{line}: mqtt.cert_file: cannot read '{}'",
            missing.display()
        )),
        "{err}"
    );
    // One problem: the missing file (beside it, the warning that the feed is open to anyone).
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("cert.toml:") && !l.contains("warning:"))
            .count(),
        1,
        "one message: {err}"
    );
}

/// Run the binary with `args` (and `SITERELAY_CONFIG` set to `env_config`, or unset).
fn siterelay(args: &[&str], env_config: Option<&Path>) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("SITERELAY_CONFIG");
    if let Some(p) = env_config {
        c.env("SITERELAY_CONFIG", p);
    }
    c.output().unwrap()
}

#[test]
fn config_is_one_global_option_with_a_default_and_an_environment_variable() {
    let env = Env::new();
    let good = env.write_config(
        "good.toml",
        &env.config_text(8883, &[("adt", "0.0.0.0:2575")], ""),
    );
    let bad = env.write_config("bad.toml", "appliance_id = \"x\"\n");
    let g = good.to_str().unwrap();
    let stdout = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    // Before or after the subcommand, or from the environment: the same file.
    for (args, from_env) in [
        (vec!["check-config", "--config", g], None),
        (vec!["--config", g, "check-config"], None),
        (vec!["check-config"], Some(good.as_path())),
        // The flag wins over the environment.
        (vec!["check-config", "--config", g], Some(bad.as_path())),
    ] {
        let out = siterelay(&args, from_env);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout(&out).starts_with(&format!("{g}: OK")),
            "{}",
            stdout(&out)
        );
    }
    let out = siterelay(&["check-config"], Some(bad.as_path()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));
    // Neither: the default path.
    let out = siterelay(&["check-config"], None);
    let all = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("/etc/siterelay/siterelay.toml"), "{all}");
    // Every subcommand that reads the file takes --config where it always did (exit 2 would be
    // a usage error); they fail here only because this data_dir has no outbox or daemon.
    for args in [
        vec!["status", "--config", g],
        vec!["queue", "stats", "--config", g, "--json"],
        vec!["queue", "rejected", "--config", g, "list"],
        vec!["queue", "rejected", "list", "--config", g],
        vec!["queue", "--config", g, "rejected", "--json"],
    ] {
        let out = siterelay(&args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
    }
    let help = stdout(&siterelay(&["run", "--help"], None));
    assert!(
        help.contains("--config <FILE>")
            && help.contains("SITERELAY_CONFIG")
            && help.contains("/etc/siterelay/siterelay.toml"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_queue_stats_commands_work_against_a_running_daemon() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let (cfg, listen, port) = one_feed_config(&env, &broker);
    let _p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;

    // A file with two messages, LF line endings as an editor would save them.
    let mut file = String::new();
    for id in ["F1", "F2"] {
        file.push_str(&String::from_utf8(adt(id)).unwrap().replace('\r', "\n"));
    }
    let msgs = env.write_config("two.hl7", &file);
    let out = Command::new(BIN)
        .args(["send", "--to", &listen])
        .arg(&msgs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("#1: AA F1") && stdout.contains("#2: AA F2"),
        "{stdout}"
    );

    let junk = env.write_config("junk.hl7", "MSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.4\n");
    let out = Command::new(BIN)
        .args(["send", "--to", &listen])
        .arg(&junk)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a non-AA answer makes send fail");
    assert!(String::from_utf8_lossy(&out.stdout).contains("#1: AE"));

    // A batch file goes as one frame; the acknowledgement batch lists the one refused message.
    let batch = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hl7/lab_batch.hl7"
    );
    let out = Command::new(BIN)
        .args(["send", "--to", &listen, batch])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a refused batch member makes send fail"
    );
    assert!(
        stdout.contains("#1: batch of 3 message(s): 1 not accepted")
            && stdout.contains("  AE B0002 (required segment OBR is missing for ORU^R01)"),
        "{stdout}"
    );

    let out = Command::new(BIN)
        .args(["queue", "stats", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["feed"], "adt");
    assert_eq!(
        v[0]["pending"], 4,
        "two single messages and two batch members"
    );
    assert_eq!(v[0]["last_seq"], 4);
    assert!(v[0]["oldest_pending_age_secs"].as_f64().unwrap() >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_stderr_lines_carry_no_timestamps() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let text = env
        .config_text(broker.port, &[("adt", &listen)], "")
        .replace("[log]\n", "[log]\noutput = \"stderr\"\n");
    let cfg = env.write_config("s.toml", &text);
    let mut p = Proc::start_with_env(
        &cfg,
        env.dir.path().join("run.log"),
        &[("JOURNAL_STREAM", "8:12345")],
    );
    wait_listening(port).await;
    assert!(p.sigterm().expect("exits on SIGTERM").success());
    let log = p.log();
    assert!(log.contains("siterelay started"), "{log}");
    assert!(
        log.lines().all(|l| !l.starts_with("20")),
        "journald adds its own timestamps:\n{log}"
    );
}

/// systemd's notify protocol, with a real datagram socket standing in for systemd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_ready_watchdog_and_stopping() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let (cfg, listen, _port) = one_feed_config(&env, &broker);
    let sock_path = env.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sock_env = sock_path.display().to_string();
    let mut p = Proc::start_with_env(
        &cfg,
        env.dir.path().join("run.log"),
        &[
            ("NOTIFY_SOCKET", sock_env.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    while !(seen.contains("READY=1") && seen.matches("WATCHDOG=1").count() >= 2) {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    // READY only once the listener is bound.
    assert!(tokio::net::TcpStream::connect(&listen).await.is_ok());
    assert!(p.sigterm().unwrap().success());
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 before exit");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
}

/// Two daemons on one data directory: the second is refused at start, naming the first's pid,
/// and the first keeps working (its status socket is not taken away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_data_directory_is_refused_and_the_first_keeps_its_socket() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let (cfg, listen, port) = one_feed_config(&env, &broker);
    let first = Proc::start(&cfg, env.dir.path().join("run1.log"));
    wait_listening(port).await;
    // The second uses another port, so only the data directory is shared.
    let port2 = siterelay_testkit::free_port();
    let cfg2 = env.write_config(
        "s2.toml",
        &env.config_text(broker.port, &[("adt", &format!("127.0.0.1:{port2}"))], ""),
    );
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg2)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the second daemon must not run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}", first.child.id())) && err.contains("already running"),
        "names the holder: {err}"
    );
    // The first still answers on its status socket and still stores messages.
    let status = std::process::Command::new(BIN)
        .args(["status", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_ne!(
        status.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(c.send(&adt("L1"), ACK_WAIT).await.unwrap().code, "AA");
}

/// A vital part that dies (the sink, pruning, a listener, or a writer that stops answering)
/// makes the daemon stop cleanly and exit non-zero, so systemd's Restart=on-failure starts a
/// fresh one, instead of storing messages it will never forward. The death is injected with a
/// test-build-only variable: it cannot be caused from outside the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_vital_task_makes_the_daemon_exit_non_zero_for_systemd_to_restart_it() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let (cfg, listen, port) = one_feed_config(&env, &broker);
    let mut p = Proc::start_with_env(
        &cfg,
        env.dir.path().join("run.log"),
        &[("SITERELAY_TEST_VITAL_TASK_DIES_AFTER_MS", "1500")],
    );
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(c.send(&adt("V1"), ACK_WAIT).await.unwrap().code, "AA");
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = p.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("the daemon exits on its own");
    assert!(!status.success(), "exit status must tell systemd it failed");
    let log = p.log();
    assert!(log.contains("a vital part of siterelay stopped"), "{log}");
    assert!(log.contains("panicked"), "{log}");
    assert!(
        log.contains("siterelay stopped"),
        "it still stops cleanly: {log}"
    );
    // What it had acknowledged is still there for the next start.
    let out = std::process::Command::new(BIN)
        .args(["queue", "stats", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v[0]["feed"].as_str(), v[0]["pending"].as_u64()),
        (Some("adt"), Some(1))
    );
}

/// `siterelay status` exit codes, as a monitoring system reads them: 1 while the broker is not
/// connected (the text says why), 0 once it is, 3 when the daemon is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_codes_tell_healthy_degraded_and_down_apart() {
    let env = Env::new();
    let mut broker = Broker::down(Kind::InProcess, &env);
    let (cfg, _listen, port) = one_feed_config(&env, &broker);
    let mut p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;
    let status = || {
        let out = Command::new(BIN)
            .args(["status", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = status();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("health    DEGRADED: broker not connected"),
        "{text}"
    );

    broker.up(&env).await;
    let healthy = wait_until(Duration::from_secs(30), || status().0 == Some(0)).await;
    assert!(healthy, "{}\n{}", status().1, p.log());
    assert!(status().1.contains("health    OK"));

    assert!(p.sigterm().unwrap().success());
    let (code, text) = status();
    assert_eq!(code, Some(3), "{text}");
    broker.stop().await;
}

/// The help a person reads says what the commands do: status's exit codes, send's exit rule
/// (CA is an acceptance), and one --json taken before or after the subcommand.
#[test]
fn help_texts_give_exit_codes_and_one_json_flag_works_everywhere() {
    let help = |args: &[&str]| String::from_utf8_lossy(&siterelay(args, None).stdout).into_owned();
    let status = help(&["status", "--help"]);
    assert!(
        status.contains("0 healthy; 1 degraded")
            && status.contains("3 the daemon is not answering"),
        "{status}"
    );
    let send = help(&["send", "--help"]);
    assert!(
        send.contains("Exit 0 when every message is accepted: AA (application accept) or CA"),
        "{send}"
    );
    for args in [
        vec!["--json", "queue", "stats", "--help"],
        vec!["queue", "held", "list", "--json", "--help"],
        vec!["watch", "--json", "--help"],
        vec!["metrics", "--help"],
    ] {
        let out = siterelay(&args, None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
