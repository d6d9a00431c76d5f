//! The whole path, for real, on one machine:
//! sample HL7 messages -> MLLP -> siterelay (SQLite outbox) -> mutual-TLS MQTT -> central side.
//!
//! `cargo run --example quickstart` makes a throwaway CA, starts an in-process MQTT broker that
//! requires client certificates, subscribes as "the central side", writes a siterelay config
//! file with two feeds (`pas-adt` for ADT from the PAS, `lab-results` for ORU from the lab),
//! starts siterelay, sends each sample in `examples/samples/` to its feed, and prints each ACK
//! (and why it is `CA` or `AA`), each record as the central side receives it, a health report
//! and `siterelay status`. Its directory (config, certificates, outbox) is kept and printed;
//! on a terminal it waits for Enter so you can try `siterelay status` and `siterelay watch`
//! against the running pair.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use siterelay::client::{MllpClient, split_messages};
use siterelay_testkit::{BrokerOptions, Pki, Subscriber, TestBroker};

/// MSH-9's message type (`ADT`, `ORU`) and MSH-15 (accept acknowledgement type), if given.
fn msh_type_and_accept_ack(m: &[u8]) -> (String, String) {
    let msh = m.split(|&b| b == b'\r').next().unwrap_or_default();
    let text = String::from_utf8_lossy(msh);
    let fields: Vec<&str> = text.split('|').collect();
    let ty = fields
        .get(8)
        .and_then(|f| f.split('^').next())
        .unwrap_or("")
        .to_string();
    (ty, fields.get(14).copied().unwrap_or("").to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    // Kept after the run: the config, certificates and outbox are there to look at.
    let dir = tempfile::Builder::new()
        .prefix("siterelay-quickstart-")
        .tempdir()?
        .keep();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/samples");

    println!("1. Throwaway PKI in {}", dir.display());
    let pki = Pki::generate(&dir, "quickstart")?;
    // The appliance's certificate names the appliance; the central side has its own.
    let (cert, key) = pki.issue_client("quickstart-box")?;
    let (central_cert, central_key) = pki.issue_client("central")?;

    let broker = TestBroker::start(BrokerOptions::from_pki(&pki)).await?;
    println!(
        "2. MQTT broker (mutual TLS, client certificates required) on localhost:{}",
        broker.port()
    );

    let mut central = Subscriber::connect(
        broker.port(),
        &pki,
        Some((central_cert.clone(), central_key.clone())),
        "siterelay/+/records/#",
    )
    .await?;
    let mut health = Subscriber::connect(
        broker.port(),
        &pki,
        Some((central_cert.clone(), central_key.clone())),
        "siterelay/+/health",
    )
    .await?;
    println!("3. Central side subscribed to siterelay/+/records/# and siterelay/+/health");

    let config_path = dir.join("siterelay.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"appliance_id = "quickstart-box"
organisation = "RXX"
data_dir = "{data}"

[mqtt]
host = "localhost"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"

# Admissions, discharges and transfers from the PAS.
[[mllp]]
name = "pas-adt"
listen = "127.0.0.1:0"
accept = ["ADT^*"]

# Results from the laboratory system.
[[mllp]]
name = "lab-results"
listen = "127.0.0.1:0"
accept = ["ORU^*"]
"#,
            data = dir.join("data").display(),
            port = broker.port(),
            ca = pki.ca_file().display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )?;
    // The checks `siterelay run` makes at start (and `siterelay check-config` prints).
    let checked = siterelay::preflight::check_file(&config_path);
    for line in checked.lines() {
        println!("   {line}");
    }
    let cfg = checked
        .config
        .ok_or_else(|| anyhow::anyhow!("the generated configuration has errors"))?;
    let daemon = siterelay::app::Daemon::start(&cfg).await?;
    let adt_addr = daemon.addr("pas-adt").expect("feed bound");
    let lab_addr = daemon.addr("lab-results").expect("feed bound");
    println!(
        "4. siterelay running from {}:\n   feed pas-adt on {adt_addr}, feed lab-results on {lab_addr}, outbox {}",
        config_path.display(),
        cfg.outbox_path().display()
    );

    println!("5. Sending the samples over MLLP, each to its feed:");
    let mut adt = MllpClient::new(tokio::net::TcpStream::connect(adt_addr).await?);
    let mut lab = MllpClient::new(tokio::net::TcpStream::connect(lab_addr).await?);
    let mut files: Vec<_> = std::fs::read_dir(&samples)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut sent = 0;
    for f in &files {
        for m in split_messages(&std::fs::read(f)?) {
            let (ty, accept_ack) = msh_type_and_accept_ack(&m);
            let (feed, client) = if ty == "ORU" {
                ("lab-results", &mut lab)
            } else {
                ("pas-adt", &mut adt)
            };
            let ack = client.send(&m, Duration::from_secs(10)).await?;
            let why = match ack.code.as_str() {
                "CA" => format!(
                    "commit accept: its MSH-15 is \"{accept_ack}\" (enhanced mode), so siterelay confirms it is stored; the application answer is for the system downstream"
                ),
                "AA" => {
                    "application accept: no MSH-15 (original mode), the usual answer".to_string()
                }
                _ => "not accepted: see docs/contract.md".to_string(),
            };
            println!(
                "   {} ({ty}) -> {feed}: {} for control id {}, sent after the SQLite commit\n      {why}",
                f.file_name().unwrap().to_string_lossy(),
                ack.code,
                ack.control_id,
            );
            sent += 1;
        }
    }

    println!("6. Records as the central side receives them:");
    for (topic, payload, _) in central.collect(sent, Duration::from_secs(15)).await {
        let record: serde_json::Value = serde_json::from_slice(&payload)?;
        println!("--- {topic}");
        println!("{}", serde_json::to_string_pretty(&record)?);
    }

    // Give the delivered marks a moment to commit, then show the outbox's view.
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.outbox().flush().await;
    let stats = siterelay::outbox::Reader::open(&cfg.outbox_path())?.stats()?;
    println!("7. Outbox after delivery (what `siterelay queue stats` shows):");
    for s in stats {
        println!(
            "   feed {}: pending {}, delivered {} (kept for retain_delivered), last seq {}",
            s.feed, s.pending, s.delivered, s.last_seq
        );
    }

    println!(
        "8. A health report, as the central side receives it (sent on connect, then every 30 s):"
    );
    // The latest report received: one came on connect, others on significant changes.
    let latest = match health.drain().pop() {
        Some(h) => Some(h),
        None => health.recv(Duration::from_secs(15)).await,
    };
    match latest {
        Some((topic, payload, _)) => {
            let h: serde_json::Value = serde_json::from_slice(&payload)?;
            println!("--- {topic} (abridged)");
            let brief = serde_json::json!({
                "appliance": h["appliance"],
                "at": h["at"],
                "mqtt": {"connected": h["mqtt"]["connected"], "broker": h["mqtt"]["broker"]},
                "outbox": {"pending_count": h["outbox"]["pending_count"], "held_count": h["outbox"]["held_count"]},
                "feeds": h["feeds"].as_array().map(|f| f.iter().map(|f| serde_json::json!({
                    "name": f["name"], "state": f["state"], "received": f["received"], "acks": f["acks"],
                })).collect::<Vec<_>>()),
                "certificates": h["certificates"],
            });
            println!("{}", serde_json::to_string_pretty(&brief)?);
        }
        None => println!("   (no health report within 15 s)"),
    }

    println!("9. `siterelay status` (the same report, from the box's status socket):");
    let sock = siterelay::status::socket_path(&cfg.data_dir);
    match siterelay::status::query(&sock).await {
        Ok(h) => {
            for line in siterelay::status::render(&h).lines() {
                println!("   {line}");
            }
        }
        Err(e) => println!("   (the status socket did not answer: {e})"),
    }

    let watch = format!(
        "cargo run -- watch --broker mqtts://localhost:{} --ca {} --cert {} --key {}",
        broker.port(),
        pki.ca_file().display(),
        central_cert.display(),
        central_key.display()
    );
    let status = format!("cargo run -- status --config {}", config_path.display());
    println!("10. Try it yourself while both run:");
    println!("   the fleet as the central team sees it:  {watch}");
    println!("   this box as trust IT sees it:           {status}");
    if std::io::stdin().is_terminal() {
        println!("   Press Enter to stop siterelay and the broker.");
        let mut line = String::new();
        let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    }
    daemon.stop().await;
    broker.shutdown().await;
    println!(
        "Done. Everything above ran for real: sockets, TLS, SQLite, MQTT.\nKept for you in {}: the config (siterelay.toml), the certificates, the outbox (data/); `cargo run -- check-config --config {}` checks the config; delete the directory when done.",
        dir.display(),
        config_path.display()
    );
    Ok(())
}
