//! No patient data where it does not belong: the whole fixture corpus through the real daemon
//! at `debug` log level, the HL7 fixtures over MLLP and the ASTM fixtures from an emulated
//! analyser on a real pty; the log, health, inventory, status, reject notices and the
//! `status` / `queue` command replies must not contain any patient name, identifier, birth date
//! or postcode from it. The identifiers are extracted from the fixtures, not hand-picked: from
//! HL7 by the independent `hl7-parser` oracle (PID-3, PID-5, PID-7, PID-11 postcode, NK1-2),
//! from ASTM by a reading written here (P-3, P-4, P-5, P-6, P-8, P-11 postcode; the H record's
//! password too). Records themselves carry patient data by design (docs/contract.md) and are
//! not searched.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::analyser::analyser_send;
use common::*;
use hl7_parser::Message;
use siterelay_testkit::pty::Pty;

/// Every message of every HL7 fixture (batch envelopes dropped, files split at each MSH).
fn messages() -> Vec<String> {
    let dir = format!("{}/tests/fixtures/hl7", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "hl7"))
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    let mut out = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let text: String = if bytes.windows(6).any(|w| w == b"8859/1") {
            bytes.iter().map(|&b| char::from(b)).collect()
        } else {
            String::from_utf8(bytes).unwrap()
        };
        let mut current: Vec<&str> = Vec::new();
        for line in text.split(['\r', '\n']).filter(|l| !l.is_empty()) {
            if ["FHS", "BHS", "BTS", "FTS"]
                .iter()
                .any(|e| line.starts_with(e))
            {
                continue;
            }
            if line.starts_with("MSH") && !current.is_empty() {
                out.push(current.join("\r") + "\r");
                current.clear();
            }
            current.push(line);
        }
        if !current.is_empty() {
            out.push(current.join("\r") + "\r");
        }
    }
    out
}

/// Patient names, identifiers, birth dates and postcodes in `text`, by the oracle.
fn secrets(text: &str, into: &mut BTreeSet<String>) {
    let Ok(m) = Message::parse_with_lenient_newlines(text, true) else {
        return;
    };
    let mut add = |v: &str, min: usize| {
        let v = v.trim();
        if v.len() >= min && v != "\"\"" {
            into.insert(v.to_string());
        }
    };
    for seg in m.segments() {
        let fields: &[(usize, &[usize], usize)] = match seg.name {
            // (field, components, shortest value worth searching for)
            "PID" => &[(3, &[1], 5), (5, &[1, 2], 4), (7, &[1], 8), (11, &[5], 5)],
            "NK1" => &[(2, &[1, 2], 4)],
            _ => continue,
        };
        for &(n, comps, min) in fields {
            let Some(f) = seg.field(n) else { continue };
            for r in f.repeats() {
                for &c in comps {
                    if let Some(c) = r.component(c) {
                        let v = c.raw_value();
                        // A birth date's day, without the time that may follow.
                        let v = if n == 7 && seg.name == "PID" {
                            &v[..v.len().min(8)]
                        } else {
                            v
                        };
                        add(v, min);
                    }
                }
            }
        }
    }
}

/// Every ASTM fixture, as an analyser sends it (records ended by CR).
fn astm_messages() -> Vec<Vec<u8>> {
    let dir = format!("{}/tests/fixtures/astm", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "astm"))
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let mut out = Vec::new();
            for rec in bytes.split(|&b| b == b'\r' || b == b'\n') {
                if !rec.is_empty() {
                    out.extend_from_slice(rec);
                    out.push(b'\r');
                }
            }
            out
        })
        .collect()
}

/// Patient names, identifiers, birth dates and postcodes in an ASTM message (and the header's
/// password), by a reading independent of siterelay's parser: the H record's first four bytes
/// give the field, repeat and component delimiters (E1394 7.1.3); P-3, P-4 and P-5 are
/// identifiers, P-6 the name (last, first), P-8 the birth date, P-11 the address (postcode:
/// component 4); H-4 is the access password.
fn astm_secrets(message: &[u8], into: &mut BTreeSet<String>) {
    let text: String = message.iter().map(|&b| char::from(b)).collect();
    let Some(h) = text.split('\r').find(|r| r.starts_with('H')) else {
        return;
    };
    let d: Vec<char> = h.chars().skip(1).take(3).collect();
    let (field, repeat, component) = (d[0], d[1], d[2]);
    let mut add = |v: &str, min: usize| {
        let v = v.trim();
        if v.len() >= min {
            into.insert(v.to_string());
        }
    };
    if let Some(pw) = h.split(field).nth(3) {
        add(pw, 4);
    }
    for rec in text.split('\r').filter(|r| r.starts_with('P')) {
        let fields: Vec<&str> = rec.split(field).collect();
        let get = |n: usize| fields.get(n - 1).copied().unwrap_or("");
        for (n, comps, min) in [
            (3, &[1][..], 5),
            (4, &[1], 5),
            (5, &[1], 5),
            (6, &[1, 2], 4),
            (8, &[1], 8),
            (11, &[4], 5),
        ] {
            for r in get(n).split(repeat) {
                let parts: Vec<&str> = r.split(component).collect();
                for &c in comps {
                    let v = parts.get(c - 1).copied().unwrap_or("");
                    // A birth date's day, without the time that may follow.
                    add(if n == 8 { &v[..v.len().min(8)] } else { v }, min);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_patient_data_reaches_logs_health_inventory_notices_or_command_replies() {
    let corpus = messages();
    let mut secret = BTreeSet::new();
    for m in &corpus {
        secrets(m, &mut secret);
    }
    assert!(
        secret.len() >= 20,
        "the oracle found identifiers: {secret:?}"
    );
    let astm = astm_messages();
    let mut astm_secret = BTreeSet::new();
    for m in &astm {
        astm_secrets(m, &mut astm_secret);
    }
    assert!(
        astm_secret.len() >= 20,
        "the ASTM reading found identifiers: {astm_secret:?}"
    );
    eprintln!(
        "searching for {} HL7 and {} ASTM values",
        secret.len(),
        astm_secret.len()
    );

    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut all = broker.subscribe(&env, "siterelay/test-box/#").await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut pty = Pty::open().unwrap();
    let tty = env.dir.path().join("ttyANALYSER");
    pty.link_at(&tty).unwrap();
    let text = env
        .config_text(broker.port, &[], "health_interval = \"5s\"")
        .replace("level = \"info\"", "level = \"debug\"")
        + "\n[records]\npublish_rejects = true\n"
        + &format!("\n[[mllp]]\nname = \"adt\"\nlisten = \"{listen}\"\n")
        + &format!(
            "\n[[serial]]\nname = \"chem1\"\ndevice = \"{}\"\nprotocol = \"astm\"\nbaud = 9600\nreopen_max = \"1s\"\n",
            tty.display()
        );
    let cfg = env.write_config("s.toml", &text);
    let p = Proc::start_with_env(
        &cfg,
        env.dir.path().join("run.log"),
        &[("RUST_LOG", "debug")],
    );
    wait_listening(port).await;
    let mut unanswered = Vec::new();
    for (i, m) in corpus.iter().enumerate() {
        let mut c = connect(listen.parse().unwrap()).await;
        match c.send(m.as_bytes(), Duration::from_secs(3)).await {
            Ok(ack) => assert!(
                ["AA", "AE", "AR", "CA", "CE", "CR"].contains(&ack.code.as_str()),
                "{}",
                ack.code
            ),
            Err(_) => unanswered.push((i, m[..m.len().min(60)].to_string())),
        }
    }
    eprintln!("messages without an ACK: {unanswered:?}");
    // The ASTM fixtures from the analyser, one transmission each, once the port is open.
    assert!(
        wait_until(Duration::from_secs(15), || p
            .log()
            .contains("serial port open"))
        .await,
        "the daemon opened the pty"
    );
    let astm_count = astm.len();
    tokio::task::spawn_blocking(move || {
        for m in &astm {
            analyser_send(&mut pty, m, None);
        }
        pty
    })
    .await
    .unwrap();

    // What the box publishes besides records, until a health report shows everything sent.
    let mut published = String::new();
    let mut records = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut done = false;
    while tokio::time::Instant::now() < deadline && !done {
        let Some((topic, payload, _)) = all.recv(Duration::from_secs(10)).await else {
            break;
        };
        if topic.contains("/records/") {
            records.push_str(&String::from_utf8_lossy(&payload));
            continue;
        }
        let text = String::from_utf8_lossy(&payload).into_owned();
        if topic.ends_with("/health") {
            let h: serde_json::Value = serde_json::from_str(&text).unwrap();
            let received = |name: &str| {
                h["feeds"]
                    .as_array()
                    .and_then(|f| f.iter().find(|f| f["name"] == name))
                    .and_then(|f| f["received"].as_u64())
            };
            done = h["outbox"]["pending_count"] == 0
                && received("adt") >= Some(corpus.len() as u64)
                && received("chem1") >= Some(astm_count as u64);
        }
        published.push_str(&topic);
        published.push('\n');
        published.push_str(&text);
        published.push('\n');
    }
    assert!(done, "every message was handled and reported");
    // The search can find what it looks for: records (patient data by design) hold most of it.
    let in_records = secret
        .iter()
        .filter(|s| records.contains(s.as_str()))
        .count();
    assert!(
        in_records * 2 > secret.len(),
        "only {in_records} of {} identifiers found in the records",
        secret.len()
    );
    let astm_in_records = astm_secret
        .iter()
        .filter(|s| records.contains(s.as_str()))
        .count();
    assert!(
        astm_in_records * 2 > astm_secret.len(),
        "only {astm_in_records} of {} ASTM identifiers found in the records",
        astm_secret.len()
    );
    secret.extend(astm_secret);

    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let mut replies = String::new();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["queue", "stats"],
        &["queue", "stats", "--json"],
        &["queue", "rejected"],
        &["queue", "rejected", "--json"],
        &["queue", "held"],
    ] {
        replies.push_str(&cli(args));
    }
    let log = p.log();
    assert!(log.contains("DEBUG"), "the log is at debug level");
    for (what, text) in [
        ("log", &log),
        ("published", &published),
        ("command replies", &replies),
    ] {
        let found: Vec<&String> = secret
            .iter()
            .filter(|s| text.contains(s.as_str()))
            .collect();
        assert!(found.is_empty(), "patient data in the {what}: {found:?}");
    }
}
