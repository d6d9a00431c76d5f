//! A long outage's backlog: the real `siterelay` binary stores `--messages` (default 1,000,000)
//! messages with the broker unreachable, is restarted with that backlog and a full duplicate
//! window (the product default, 7 days, holds every one of them), then drains to a real
//! Mosquitto. The daemon's resident memory is sampled every 250 ms throughout.
//!
//! ```sh
//! cargo build --release && cargo run --release --example backlog -- --messages 1000000
//! ```
//!
//! Prints, per phase (build, restart, drain): duration, rate, and the daemon's RSS (min / max),
//! the time from `exec` to the MLLP port accepting a connection at the restart, the store's size,
//! and whether every record arrived at a subscriber. Writes `backlog.csv` (t, phase, RSS) into
//! `--out` (default `backlog-out`).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use siterelay::client::MllpClient;
use siterelay_testkit::bench::{daemon_binary, proc_status_kib};
use siterelay_testkit::proxy::{Mode, Proxy};
use siterelay_testkit::{Mosquitto, Pki, Subscriber};

fn message(i: u64) -> Vec<u8> {
    format!(
        "MSH|^~\\&|LAB|RXX|SITERELAY|HUB|20261203093000||ORU^R01^ORU_R01|B{i}|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^BACKLOG||19800615|F\r\
OBR|1|ORD{i}|LAB{i}|UE^UREA AND ELECTROLYTES^L|||202612030800\r\
OBX|1|NM|NA^Sodium^L||139|mmol/L|133-146||||F\r\
OBX|2|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3||||F\r"
    )
    .into_bytes()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Spawns the daemon and returns it with the time from spawn to its port accepting.
async fn start(bin: &Path, cfg: &Path, addr: std::net::SocketAddr) -> anyhow::Result<(Child, f64)> {
    let t = Instant::now();
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok((child, t.elapsed().as_secs_f64()));
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "never listened");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut total: u64 = 1_000_000;
    let mut connections: u64 = 8;
    let mut out = PathBuf::from("backlog-out");
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--messages" => total = v()?.parse()?,
            "--connections" => connections = v()?.parse()?,
            "--out" => out = PathBuf::from(v()?),
            "-h" | "--help" => {
                println!("backlog [--messages 1000000] [--connections 8] [--out DIR]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let bin = daemon_binary();
    anyhow::ensure!(
        bin.exists(),
        "{} not found: cargo build --release",
        bin.display()
    );
    std::fs::create_dir_all(&out)?;
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(dir.path(), "backlog")?;
    let broker = Mosquitto::start_with(
        &pki,
        &dir.path().join("mosq"),
        None,
        0,
        "max_queued_messages 2000000",
    )
    .await?;
    // The daemon reaches the broker only through this proxy: closed = a long outage.
    let proxy = Proxy::start(broker.port(), Mode::Closed).await;
    let mut sub =
        Subscriber::connect(broker.port(), &pki, None, "siterelay/backlog/records/#").await?;
    let listen = siterelay_testkit::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{listen}").parse()?;
    let data = dir.path().join("data");
    let cfg = dir.path().join("siterelay.toml");
    std::fs::write(
        &cfg,
        siterelay_testkit::bench::config_text("backlog", &data, proxy.port(), &pki, "lab", listen),
    )?;

    // RSS sampler: (seconds since start, phase, KiB) for whichever daemon pid is current.
    let pid = Arc::new(AtomicU64::new(0));
    let phase = Arc::new(Mutex::new("build"));
    let series: Arc<Mutex<Vec<(f64, &'static str, u64)>>> = Arc::default();
    let t0 = Instant::now();
    {
        let (pid, phase, series) = (pid.clone(), phase.clone(), series.clone());
        tokio::spawn(async move {
            loop {
                let p = pid.load(Ordering::SeqCst) as u32;
                if p != 0 {
                    let r = proc_status_kib(p, "VmRSS:");
                    if r > 0 {
                        let ph = *phase.lock().unwrap();
                        series
                            .lock()
                            .unwrap()
                            .push((t0.elapsed().as_secs_f64(), ph, r));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    // Phase 1: build the backlog, broker unreachable.
    let (mut child, first_start) = start(&bin, &cfg, addr).await?;
    pid.store(child.id() as u64, Ordering::SeqCst);
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let t1 = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..connections {
        let (next, acked) = (next.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            let mut c = MllpClient::new(tokio::net::TcpStream::connect(addr).await?);
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return anyhow::Ok(());
                }
                let ack = c.send(&message(i), Duration::from_secs(60)).await?;
                anyhow::ensure!(ack.code == "AA", "message {i}: {} {}", ack.code, ack.text);
                acked.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let mut last_report = Instant::now();
    for s in senders {
        while !s.is_finished() {
            if last_report.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "backlog: {} stored, rss {} KiB",
                    acked.load(Ordering::SeqCst),
                    proc_status_kib(child.id(), "VmRSS:")
                );
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        s.await??;
    }
    let build_secs = t1.elapsed().as_secs_f64();
    let stored = acked.load(Ordering::SeqCst);
    let build_rss_end = proc_status_kib(child.id(), "VmRSS:");

    // Phase 2: restart with the backlog and the full duplicate window.
    *phase.lock().unwrap() = "restart";
    siterelay_testkit::sys::sigterm(child.id())?;
    child.wait()?;
    pid.store(0, Ordering::SeqCst);
    let store_bytes = dir_bytes(&data);
    let (c2, restart_secs) = start(&bin, &cfg, addr).await?;
    child = c2;
    pid.store(child.id() as u64, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_restart = proc_status_kib(child.id(), "VmRSS:");

    // Phase 3: the broker comes back; drain.
    *phase.lock().unwrap() = "drain";
    let t3 = Instant::now();
    proxy.set(Mode::Pass).await;
    let mut got = HashSet::with_capacity(stored as usize);
    let mut last_at = t3;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while (got.len() as u64) < stored && Instant::now() < deadline {
        if let Some((_, payload, _)) = sub.recv(Duration::from_secs(30)).await {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            if let Some(c) = v["hl7"]["control_id"].as_str() {
                got.insert(c.to_owned());
                last_at = Instant::now();
            }
        } else {
            break;
        }
    }
    let drain_secs = last_at.duration_since(t3).as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_drain = proc_status_kib(child.id(), "VmRSS:");
    siterelay_testkit::sys::sigterm(child.id())?;
    child.wait()?;
    pid.store(0, Ordering::SeqCst);

    let series = series.lock().unwrap().clone();
    let mut csv = String::from("t_secs,phase,rss_kib\n");
    for (t, p, r) in &series {
        writeln!(csv, "{t:.2},{p},{r}")?;
    }
    std::fs::write(out.join("backlog.csv"), csv)?;
    let range = |ph: &str| {
        let v: Vec<u64> = series.iter().filter(|s| s.1 == ph).map(|s| s.2).collect();
        (
            v.iter().min().copied().unwrap_or(0) as f64 / 1024.0,
            v.iter().max().copied().unwrap_or(0) as f64 / 1024.0,
        )
    };
    let (b0, b1) = range("build");
    let (r0, r1) = range("restart");
    let (d0, d1) = range("drain");
    println!("backlog: {stored} messages, {connections} connections, default dedup_window (7d)");
    println!(
        "| phase | time | rate | daemon RSS min / max |\n|---|---|---|---|\n\
         | build (broker unreachable) | {build_secs:.1} s | {:.0} msg/s | {b0:.1} / {b1:.1} MiB (at the end {:.1}) |\n\
         | restart: exec to listening | {restart_secs:.3} s (empty store: {first_start:.3} s) | | {r0:.1} / {r1:.1} MiB (3 s after start {:.1}) |\n\
         | drain to Mosquitto | {drain_secs:.1} s | {:.0} records/s | {d0:.1} / {d1:.1} MiB (after {:.1}) |",
        stored as f64 / build_secs,
        build_rss_end as f64 / 1024.0,
        rss_after_restart as f64 / 1024.0,
        got.len() as f64 / drain_secs,
        rss_after_drain as f64 / 1024.0,
    );
    println!(
        "backlog: store {:.0} MB on disk before the restart; {} of {stored} records arrived",
        store_bytes as f64 / 1e6,
        got.len()
    );
    anyhow::ensure!(
        got.len() as u64 == stored,
        "records missing at the subscriber"
    );
    Ok(())
}
