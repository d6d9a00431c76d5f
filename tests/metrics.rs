//! `siterelay metrics` against the real daemon: every line is valid Prometheus exposition
//! format (0.0.4, what node_exporter's textfile collector reads), and the values are those
//! `siterelay status --json` and `siterelay queue stats --json` give.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn siterelay(cfg: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parse exposition text strictly: HELP and TYPE once per family and before its samples,
/// known types, valid names, quoted and escaped label values, numeric values, no series twice.
/// Returns each series (`name{labels}` as written) and its value.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut series = HashMap::new();
    assert!(text.ends_with('\n'), "the text ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            assert!(helps.insert(name.to_string()), "HELP twice: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "{line}");
            assert!(
                ["gauge", "counter", "untyped", "summary", "histogram"].contains(&kind),
                "{line}"
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "a counter is named _total: {line}"
                );
            }
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        assert!(!line.is_empty(), "no blank lines");
        // name{labels} value
        let (key, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = match key.split_once('{') {
            None => key,
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels end with }");
                // k="v" pairs, values with \\, \" and \n escapes only.
                let mut rest = labels;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").expect("label=\"value\"");
                    assert!(valid_name(k), "label name: {line}");
                    let mut end = None;
                    let mut escaped = false;
                    for (i, c) in after.char_indices() {
                        match (escaped, c) {
                            (true, '\\' | '"' | 'n') => escaped = false,
                            (true, _) => panic!("bad escape: {line}"),
                            (false, '\\') => escaped = true,
                            (false, '"') => {
                                end = Some(i);
                                break;
                            }
                            (false, '\n') => panic!("raw newline: {line}"),
                            _ => {}
                        }
                    }
                    let end = end.expect("closing quote");
                    rest = &after[end + 1..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
                name
            }
        };
        assert!(valid_name(name), "{line}");
        assert!(types.contains_key(name), "a sample after its TYPE: {line}");
        assert!(helps.contains(name), "a sample after its HELP: {line}");
        assert!(
            series.insert(key.to_string(), value).is_none(),
            "series twice: {line}"
        );
    }
    series
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_exposition_text_with_the_figures_status_gives() {
    let env = Env::new();
    let mut broker = Broker::down(Kind::InProcess, &env);
    broker.up(&env).await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = env.write_config(
        "m.toml",
        &env.config_text(broker.port, &[("adt", &listen), ("lab", "127.0.0.1:0")], ""),
    );
    let mut p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    for i in 0..3 {
        assert_eq!(
            c.send(&adt(&format!("M{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    assert_eq!(c.send(b"not HL7", ACK_WAIT).await.unwrap().code, "AE");
    drop(c);
    // Wait until the three are delivered and the figures are still.
    let settled = wait_until(Duration::from_secs(30), || {
        let (_, out) = siterelay(&cfg, &["status", "--json"]);
        serde_json::from_str::<Value>(&out).is_ok_and(|h| {
            h["outbox"]["pending_count"] == 0 && h["mqtt"]["acked"].as_u64() >= Some(3)
        })
    })
    .await;
    assert!(settled, "{}", p.log());

    let (code, text) = siterelay(&cfg, &["metrics"]);
    assert_eq!(code, Some(0), "{text}");
    let m = parse_exposition(&text);
    let (_, status) = siterelay(&cfg, &["status", "--json"]);
    let h: Value = serde_json::from_str(&status).unwrap();
    let (_, stats) = siterelay(&cfg, &["queue", "stats", "--json"]);
    let stats: Value = serde_json::from_str(&stats).unwrap();

    let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("a number: {v}"));
    let bool_num = |v: &Value| if v == true { 1.0 } else { 0.0 };
    for (series, expected) in [
        ("siterelay_up", 1.0),
        ("siterelay_degraded", 0.0),
        (
            "siterelay_outbox_pending_records",
            num(&h["outbox"]["pending_count"]),
        ),
        (
            "siterelay_outbox_held_records",
            num(&h["outbox"]["held_count"]),
        ),
        (
            "siterelay_outbox_store_max_bytes",
            num(&h["outbox"]["store_max_bytes"]),
        ),
        (
            "siterelay_outbox_refused_full_total",
            num(&h["outbox"]["refused_full"]),
        ),
        (
            "siterelay_mqtt_connected",
            bool_num(&h["mqtt"]["connected"]),
        ),
        ("siterelay_mqtt_connects_total", num(&h["mqtt"]["connects"])),
        ("siterelay_mqtt_delivered_total", num(&h["mqtt"]["acked"])),
        ("siterelay_mqtt_refused_total", num(&h["mqtt"]["refused"])),
        (
            "siterelay_certificate_days_left{certificate=\"client\"}",
            num(&h["certificates"]["client_days_left"]),
        ),
        (
            "siterelay_certificate_days_left{certificate=\"ca\"}",
            num(&h["certificates"]["ca_days_left"]),
        ),
    ] {
        assert_eq!(m.get(series), Some(&expected), "{series}\n{text}");
    }
    assert_eq!(m["siterelay_mqtt_delivered_total"], 3.0);
    assert_eq!(
        m["siterelay_outbox_store_bytes"] > 0.0,
        num(&h["outbox"]["store_bytes"]) > 0.0
    );
    for f in h["feeds"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let s = |metric: &str| m[&format!("{metric}{{feed=\"{name}\"}}")];
        assert_eq!(s("siterelay_feed_received_total"), num(&f["received"]));
        assert_eq!(
            s("siterelay_feed_quarantined_total"),
            num(&f["quarantined"])
        );
        assert_eq!(s("siterelay_feed_held_records"), num(&f["held"]));
        for code in ["AA", "AE", "AR"] {
            assert_eq!(
                m[&format!("siterelay_feed_acks_total{{feed=\"{name}\",code=\"{code}\"}}")],
                num(&f["acks"][code]),
                "{name} {code}"
            );
        }
    }
    assert_eq!(
        m["siterelay_feed_acks_total{feed=\"adt\",code=\"AA\"}"],
        3.0
    );
    assert_eq!(
        m["siterelay_feed_acks_total{feed=\"adt\",code=\"AE\"}"],
        1.0
    );
    for s in stats.as_array().unwrap() {
        let feed = s["feed"].as_str().unwrap();
        assert_eq!(
            m[&format!("siterelay_feed_pending_records{{feed=\"{feed}\"}}")],
            num(&s["pending"])
        );
        assert_eq!(
            m[&format!("siterelay_feed_delivered_records{{feed=\"{feed}\"}}")],
            num(&s["delivered"])
        );
    }
    assert_eq!(m["siterelay_feed_delivered_records{feed=\"adt\"}"], 3.0);

    // --out writes the same kind of file, atomically, for the textfile collector.
    let file = env.dir.path().join("textfile/siterelay.prom");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let (code, _) = siterelay(&cfg, &["metrics", "--out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    let written = parse_exposition(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(written["siterelay_mqtt_delivered_total"], 3.0);
    assert_eq!(
        std::fs::read_dir(file.parent().unwrap()).unwrap().count(),
        1,
        "no temporary file left behind"
    );

    // Down: siterelay_up 0, exit 3, still valid text.
    assert!(p.sigterm().unwrap().success());
    let (code, text) = siterelay(&cfg, &["metrics"]);
    assert_eq!(code, Some(3));
    assert_eq!(parse_exposition(&text)["siterelay_up"], 0.0);
    broker.stop().await;
}
