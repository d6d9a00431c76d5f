//! A fleet on one broker: N appliances, each with its own certificate (CN = its appliance id),
//! its own outbox and its own MQTT connection, against one Mosquitto with the broker kit's
//! per-appliance ACL (docs/broker/siterelay.acl) and a central subscriber. Measures how long
//! the fleet takes to come online, how fast one burst of records from every appliance reaches
//! the central side, and what the broker costs (memory, CPU time): the evidence for the sizing
//! notes in docs/broker/README.md.
//!
//! ```sh
//! cargo run --release --example fleet -- --appliances 100,250,500,1000 --records 10
//! ```
//!
//! The appliances run in this one process (each a whole `siterelay::app::Daemon`: its SQLite
//! outbox and writer thread, MLLP listener, sink, telemetry), which lets one machine hold a
//! thousand of them; the broker cannot tell them from separate boxes. Mosquitto runs with
//! `max_queued_messages` raised (docs/broker/) and the file-descriptor limit this process has.
//! Exits non-zero if any record did not arrive.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use siterelay::client::MllpClient;
use siterelay_testkit::bench::proc_status_kib;
use siterelay_testkit::{Mosquitto, Pki, Subscriber};

const ACL: &str = include_str!("../docs/broker/siterelay.acl");

fn message(app: usize, i: usize) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20261203093000||ADT^A08^ADT_A01|F{app}-{i}|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^FLEET||19800615|F\r\
PV1|1|I|WARD1^BED2\r"
    )
    .into_bytes()
}

/// The pid of the Mosquitto whose command line names `config` (testkit keeps its child private).
fn mosquitto_pid(config: &Path) -> Option<u32> {
    let want = config.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("mosquitto") && cmd.contains(&want)).then_some(pid)
    })
}

/// utime + stime of a process, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let u: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let s: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (u + s) / tick
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut sizes = vec![100usize];
    let mut records = 10usize;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--appliances" => {
                sizes = it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--appliances needs a list"))?
                    .split(',')
                    .map(|n| n.parse())
                    .collect::<Result<_, _>>()?
            }
            "--records" => {
                records = it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--records needs a number"))?
                    .parse()?
            }
            "-h" | "--help" => {
                println!("fleet [--appliances 100,250,500,1000] [--records 10 (per appliance)]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    println!(
        "| Appliances | all online | {records} records each: all at the central side | records/s | Mosquitto RSS | Mosquitto CPU | this process RSS per appliance | lost |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    for n in sizes {
        failed |= !run(n, records).await?;
    }
    anyhow::ensure!(!failed, "records were lost");
    Ok(())
}

async fn run(n: usize, records: usize) -> anyhow::Result<bool> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(dir.path(), "fleet")?;
    let broker = Mosquitto::start_with(
        &pki,
        &dir.path().join("mosq"),
        Some(ACL),
        0,
        "max_queued_messages 1000000",
    )
    .await?;
    let mosq = mosquitto_pid(broker.config_file())
        .ok_or_else(|| anyhow::anyhow!("Mosquitto's pid not found"))?;
    let central = pki.issue_client("central")?;
    let mut status = Subscriber::connect(
        broker.port(),
        &pki,
        Some(central.clone()),
        "siterelay/+/status",
    )
    .await?;
    let mut recs =
        Subscriber::connect(broker.port(), &pki, Some(central), "siterelay/+/records/#").await?;
    let own_before = proc_status_kib(std::process::id(), "VmRSS:");
    let mosq_rss_before = proc_status_kib(mosq, "VmRSS:");
    let mosq_cpu_before = cpu_secs(mosq);

    let t0 = Instant::now();
    let mut daemons = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("fleet-{i:04}");
        let (cert, key) = pki.issue_client(&id)?;
        let d = dir.path().join(&id);
        std::fs::create_dir_all(&d)?;
        let cfg = d.join("siterelay.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"appliance_id = "{id}"
organisation = "RXX"
data_dir = "{data}"
[log]
level = "error"
[mqtt]
host = "localhost"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
[[mllp]]
name = "adt"
listen = "127.0.0.1:0"
"#,
                data = d.join("data").display(),
                port = broker.port(),
                ca = pki.ca_file().display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )?;
        let cfg = siterelay::config::load(&cfg)?;
        daemons.push(siterelay::app::Daemon::start(&cfg).await?);
    }
    // Online: a birth from every appliance.
    let mut online = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 5);
    while online.len() < n && Instant::now() < deadline {
        if let Some((topic, payload, _)) = status.recv(Duration::from_secs(5)).await {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            if v["state"] == "online" {
                online.insert(topic);
            }
        }
    }
    let online_secs = t0.elapsed().as_secs_f64();
    let online_n = online.len();

    // One burst: every appliance sends `records` messages at once (one connection each).
    let addrs: Vec<_> = daemons.iter().map(|d| d.addr("adt").unwrap()).collect();
    let t1 = Instant::now();
    let mut senders = Vec::new();
    for (a, addr) in addrs.into_iter().enumerate() {
        senders.push(tokio::spawn(async move {
            let mut c = MllpClient::new(tokio::net::TcpStream::connect(addr).await?);
            let mut acked: usize = 0;
            for i in 0..records {
                if c.send(&message(a, i), Duration::from_secs(60)).await?.code == "AA" {
                    acked += 1;
                }
            }
            anyhow::Ok(acked)
        }));
    }
    let mut acked: usize = 0;
    for s in senders {
        acked += s.await??;
    }
    let want = n * records;
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120 + want as u64 / 100);
    while got.len() < want && Instant::now() < deadline {
        if let Some((_, payload, _)) = recs.recv(Duration::from_secs(5)).await {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            if let Some(c) = v["hl7"]["control_id"].as_str() {
                got.insert(c.to_owned());
            }
        }
    }
    let deliver_secs = t1.elapsed().as_secs_f64();
    let mosq_rss = proc_status_kib(mosq, "VmRSS:");
    let mosq_cpu = cpu_secs(mosq) - mosq_cpu_before;
    let own = proc_status_kib(std::process::id(), "VmRSS:").saturating_sub(own_before);
    let lost = acked.saturating_sub(got.len());
    println!(
        "| {n} | {online_n}/{n} in {online_secs:.1} s | {}/{want} ({acked} ACKed) in {deliver_secs:.1} s | {:.0} | {:.1} MiB (idle {:.1} MiB) | {mosq_cpu:.1} s | {:.2} MiB | {lost} |",
        got.len(),
        got.len() as f64 / deliver_secs,
        mosq_rss as f64 / 1024.0,
        mosq_rss_before as f64 / 1024.0,
        own as f64 / 1024.0 / n as f64,
    );
    for d in daemons {
        d.stop().await;
    }
    Ok(lost == 0 && acked == want && online_n == n)
}
