//! SIGKILL soak: the real `siterelay` binary killed with SIGKILL at random moments, over and
//! over, while four senders send and the sink drains to a real mutual-TLS broker; at the end
//! every acknowledged message must have reached the central side.
//!
//! ```text
//! cargo build && cargo run --example sigkill_soak -- --cycles 50
//! ```
//!
//! The binary is taken from the same target directory as this example (`target/debug/siterelay`
//! for a debug run: build it first, as above). Prints one row of `docs/reliability.md`: cycles,
//! sent, acknowledged, delivered (distinct record ids), duplicated (resends with the same id),
//! lost (acknowledged and never delivered). Exits non-zero if anything was lost.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use siterelay::client::MllpClient;
use siterelay_testkit::{BrokerOptions, Pki, Subscriber, TestBroker};

const SENDERS: usize = 4;

fn message(id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20261130093000||ADT^A08^ADT_A01|{id}|P|2.4\r\
         PID|1||MRN{id}^^^RXX^MR||TEST^SOAK||19800615|F\r"
    )
    .into_bytes()
}

/// A small xorshift: random kill moments without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut cycles = 50usize;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--cycles" => cycles = it.next().expect("a number").parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let bin = siterelay_testkit::bench::daemon_binary();
    anyhow::ensure!(
        bin.exists(),
        "{} not found: run `cargo build` first",
        bin.display()
    );
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(dir.path(), "soak")?;
    let broker = TestBroker::start(BrokerOptions::from_pki(&pki)).await?;
    // The central side subscribes before anything is published and stays for the whole run.
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "siterelay/+/records/#").await?;
    let received: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let total = Arc::new(Mutex::new(0usize));
    {
        let (received, total) = (received.clone(), total.clone());
        tokio::spawn(async move {
            while let Some((_, payload, _)) = sub.recv(Duration::from_secs(3600)).await {
                let r: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
                let id = r["id"].as_str().unwrap_or_default().to_owned();
                let control = r["hl7"]["control_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                received.lock().unwrap().insert(control, id);
                *total.lock().unwrap() += 1;
            }
        });
    }
    let port = siterelay_testkit::free_port();
    let cfg = dir.path().join("siterelay.toml");
    std::fs::write(
        &cfg,
        siterelay_testkit::bench::config_text(
            "soak",
            &dir.path().join("data"),
            broker.port(),
            &pki,
            "adt",
            port,
        ),
    )?;
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sent = Arc::new(Mutex::new(0usize));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let started = Instant::now();
    for cycle in 0..=cycles {
        let mut child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // Wait until it listens.
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "cycle {cycle}: never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut senders = Vec::new();
        for s in 0..SENDERS {
            let (acked, sent) = (acked.clone(), sent.clone());
            senders.push(tokio::spawn(async move {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                let mut c = MllpClient::new(stream);
                for i in 0.. {
                    let id = format!("K{cycle}S{s}M{i}");
                    *sent.lock().unwrap() += 1;
                    match c.send(&message(&id), Duration::from_secs(5)).await {
                        Ok(a) if a.code == "AA" => {
                            acked.lock().unwrap().insert(id);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        if cycle < cycles {
            // Kill at a random moment, mid-ingest and mid-drain.
            let wait = 200 + next(&mut rng) % 1300;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            child.kill()?; // SIGKILL
            let _ = child.wait();
            for s in senders {
                let _ = s.await;
            }
        } else {
            // The last run: stop sending after a moment, then let everything drain.
            tokio::time::sleep(Duration::from_millis(500)).await;
            for s in &senders {
                s.abort();
            }
            let want = acked.lock().unwrap().clone();
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let all = {
                    let got = received.lock().unwrap();
                    want.iter().all(|id| got.contains_key(id))
                };
                if all || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // SIGTERM for a clean end.
            let _ = siterelay_testkit::sys::sigterm(child.id());
            let _ = child.wait();
        }
    }
    let acked = acked.lock().unwrap().clone();
    let received = received.lock().unwrap().clone();
    let delivered = acked.iter().filter(|id| received.contains_key(*id)).count();
    let lost = acked.len() - delivered;
    let distinct_ids: HashSet<&String> = received.values().collect();
    let total = *total.lock().unwrap();
    println!(
        "FAULT-ROW | SIGKILL at random moments, {cycles} cycles, {SENDERS} senders, sink draining | {} | {} | {} | {} | {} | {} |",
        *sent.lock().unwrap(),
        acked.len(),
        delivered,
        total.saturating_sub(distinct_ids.len()),
        lost,
        if lost == 0 { "yes" } else { "no" }
    );
    println!("({:.0} s)", started.elapsed().as_secs_f64());
    anyhow::ensure!(
        lost == 0,
        "{lost} acknowledged messages were never delivered"
    );
    Ok(())
}
