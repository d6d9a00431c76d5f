//! Load generator: measures durable-ACK throughput and latency, broker drain rate, and
//! end-to-end (receive -> PUBACK) latency, with siterelay, a real broker and real sockets on
//! this machine.
//!
//! ```text
//! cargo run --release --example loadgen -- --connections 8 --messages 100000
//! cargo run --release --example loadgen -- --connections 8 --messages 100000 --broker mosquitto
//! cargo run --release --example loadgen -- --connections 8 --messages 100000 --broker none
//! cargo run --release --example loadgen -- --connections 8 --messages 100000 --no-normalise
//! cargo run --release --example loadgen -- --connections 8 --messages 100000 --broker none --dedup-window 7d
//! ```
//!
//! Phases:
//! 1. Broker down: `--messages` over `--connections`, each connection sending one message and
//!    waiting for its ACK (as HL7 senders do). Prints ACK throughput and latency p50/p99. Every
//!    ACK here is durable: written after the SQLite commit (synchronous=FULL, WAL).
//! 2. Broker up (unless `--broker none`): time until the backlog of phase 1 is delivered (every
//!    PUBACK received and recorded) -> drain rate.
//! 3. Broker up: the same load again while records flow; prints ACK figures and end-to-end
//!    latency (receive -> delivered mark, from the outbox's own timestamps).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use siterelay::client::MllpClient;
use siterelay_testkit::{BrokerOptions, Mosquitto, Pki, TestBroker};

struct Args {
    connections: usize,
    messages: usize,
    size: usize,
    broker: String,
    normalise: bool,
    dedup_window: Option<String>,
    dedup_prefill: usize,
    /// `store.secure_delete` for each run, in order (`ab`: off, on, off, on).
    secure_delete: Vec<bool>,
}

fn args() -> Args {
    let mut a = Args {
        connections: 8,
        messages: 100_000,
        size: 0,
        broker: "inprocess".into(),
        normalise: true,
        dedup_window: None,
        dedup_prefill: 0,
        secure_delete: vec![true],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().expect("missing value");
        match k.as_str() {
            "--connections" => a.connections = v().parse().expect("number"),
            "--messages" => a.messages = v().parse().expect("number"),
            "--pad-bytes" => a.size = v().parse().expect("number"),
            "--broker" => a.broker = v(),
            "--no-normalise" => a.normalise = false,
            "--dedup-window" => a.dedup_window = Some(v()),
            "--dedup-prefill" => a.dedup_prefill = v().parse().expect("number"),
            "--secure-delete" => {
                a.secure_delete = match v().as_str() {
                    "on" => vec![true],
                    "off" => vec![false],
                    "ab" => vec![false, true, false, true],
                    other => panic!("--secure-delete on|off|ab, not {other}"),
                }
            }
            "-h" | "--help" => {
                println!(
                    "loadgen [--connections N] [--messages N] [--pad-bytes N] [--broker inprocess|mosquitto|none] [--no-normalise] [--dedup-window 7d [--dedup-prefill KEYS]] [--secure-delete on|off|ab]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn message(conn: usize, i: usize, pad: usize) -> Vec<u8> {
    let mut m = format!(
        "MSH|^~\\&|LOADGEN|RXX|SITERELAY|HUB|20261130093000||ORU^R01^ORU_R01|L{conn}-{i}|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^PATIENT||19800615|F\r\
OBR|1|ORD{i}|LAB{i}|UE^UREA AND ELECTROLYTES^L|||202611300800\r\
OBX|1|NM|NA^Sodium^L||139|mmol/L|133-146||||F\r\
OBX|2|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3||||F\r"
    )
    .into_bytes();
    if pad > 0 {
        m.extend(b"NTE|1||");
        m.extend(std::iter::repeat_n(b'x', pad));
        m.push(b'\r');
    }
    m
}

/// A week of duplicate-detection keys as a busy appliance would have logged them: the outbox is
/// created by siterelay itself, then its `dedup_log` is filled in one transaction.
fn prefill_dedup_log(
    path: &std::path::Path,
    keys: usize,
    secure_delete: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    let (ob, w) = siterelay::outbox::Outbox::open(
        path,
        siterelay::outbox::OutboxOptions {
            max_bytes: u64::MAX,
            quarantine_max_bytes: u64::MAX / 10,
            retain_delivered: Duration::from_secs(3600),
            retain_rejected: Duration::from_secs(3600),
            dedup_keep: Duration::ZERO,
            secure_delete,
        },
    )?;
    drop(ob);
    w.join();
    let mut c = rusqlite::Connection::open(path)?;
    let tx = c.transaction()?;
    {
        let mut ins = tx.prepare(
            "INSERT INTO dedup_log (key, hash, row_id, seq, received_at_us) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let week_us = 7 * 86_400 * 1_000_000i64;
        let start = siterelay::outbox::now_us() - week_us;
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for i in 0..keys {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = start + (i as i64) * (week_us / keys as i64);
            ins.execute(rusqlite::params![
                x as i64,
                (x >> 1) as i64,
                i as i64,
                i as i64,
                at
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn load(addr: std::net::SocketAddr, a: &Args, phase: usize) -> (Duration, Vec<Duration>) {
    let per = a.messages / a.connections;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let pad = a.size;
        tasks.push(tokio::spawn(async move {
            let mut cl = MllpClient::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let m = message(c, phase * 10_000_000 + i, pad);
                let t = Instant::now();
                let ack = cl.send(&m, Duration::from_secs(30)).await.unwrap();
                lat.push(t.elapsed());
                assert_eq!(ack.code, "AA", "{}", ack.text);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    (start.elapsed(), lat)
}

fn report(label: &str, elapsed: Duration, mut lat: Vec<Duration>) {
    lat.sort_unstable();
    println!(
        "{label}: {} messages in {:.2} s = {:.0} msg/s durably ACKed; ACK latency p50 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let a = args();
    for &secure_delete in &a.secure_delete {
        println!("=== store.secure_delete = {secure_delete}");
        run(&a, secure_delete).await?;
    }
    Ok(())
}

async fn run(a: &Args, secure_delete: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(dir.path(), "loadgen")?;
    let port = siterelay_testkit::free_port();
    let cfg_text = format!(
        r#"appliance_id = "loadgen"
organisation = "RXX"
data_dir = "{data}"
[log]
level = "warn"
[store]
secure_delete = {secure_delete}
[mqtt]
host = "localhost"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
reconnect_max_secs = 1
[[mllp]]
name = "load"
listen = "127.0.0.1:0"
normalise = {normalise}
{dedup}
"#,
        normalise = a.normalise,
        secure_delete = secure_delete,
        dedup = a
            .dedup_window
            .as_ref()
            .map(|w| format!("dedup_window = \"{w}\""))
            .unwrap_or_default(),
        data = dir.path().join("data").display(),
        ca = pki.ca_file().display(),
        cert = pki.client_cert_file().display(),
        key = pki.client_key_file().display(),
    );
    let path = dir.path().join("siterelay.toml");
    std::fs::write(&path, cfg_text)?;
    let cfg = siterelay::config::load(&path)?;
    if a.dedup_prefill > 0 {
        prefill_dedup_log(&cfg.outbox_path(), a.dedup_prefill, secure_delete)?;
    }
    let rss_before = rss_kib();
    let started = Instant::now();
    let d = siterelay::app::Daemon::start(&cfg).await?;
    let start_time = started.elapsed();
    if a.dedup_prefill > 0 {
        println!(
            "dedup prefill: {} keys from the last 7 days; index loaded at start in {:.2} s; RSS grew {} MiB",
            a.dedup_prefill,
            start_time.as_secs_f64(),
            (rss_kib() - rss_before) / 1024
        );
    }
    let addr = d.addr("load").unwrap();
    let gauges = d.outbox().gauges();
    println!(
        "loadgen: {} connections x {} messages (~{} bytes each), outbox {}, broker {}, normalise {}, dedup_window {}, daemon started in {:.2} s",
        a.connections,
        a.messages / a.connections,
        message(0, 0, a.size).len(),
        cfg.outbox_path().display(),
        a.broker,
        a.normalise,
        a.dedup_window.as_deref().unwrap_or("default (7d)"),
        start_time.as_secs_f64()
    );

    let commits0 = gauges.commits.load(Ordering::Relaxed);
    let (el, lat) = load(addr, a, 1).await;
    let commits = gauges.commits.load(Ordering::Relaxed) - commits0;
    report("phase 1 (broker down)", el, lat);
    println!(
        "  {} commits (fsyncs) for {} messages: {:.1} messages per commit",
        commits,
        a.messages,
        a.messages as f64 / commits.max(1) as f64
    );

    let _broker_guard: Box<dyn std::any::Any> = match a.broker.as_str() {
        "none" => {
            d.stop().await;
            return Ok(());
        }
        "inprocess" => {
            Box::new(TestBroker::start(BrokerOptions::from_pki(&pki).with_port(port)).await?)
        }
        "mosquitto" => {
            let m = Mosquitto::start_on(&pki, &dir.path().join("mosq"), None, port).await?;
            Box::new(m)
        }
        other => anyhow::bail!("--broker must be inprocess, mosquitto or none, not {other}"),
    };
    let backlog = gauges.pending_count.load(Ordering::Relaxed);
    let t = Instant::now();
    while gauges.pending_count.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("backlog not drained in 10 minutes");
        }
    }
    let drain = t.elapsed();
    println!(
        "phase 2 (broker up): backlog of {backlog} delivered (PUBACK recorded) in {:.2} s = {:.0} records/s drain rate (includes connect and backoff wait)",
        drain.as_secs_f64(),
        backlog as f64 / drain.as_secs_f64()
    );

    let phase3_start = siterelay::outbox::now_us();
    let (el, lat) = load(addr, a, 2).await;
    report("phase 3 (broker up, records flowing)", el, lat);
    while gauges.pending_count.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.outbox().flush().await;
    let reader = siterelay::outbox::Reader::open(&cfg.outbox_path())?;
    let mut e2e: Vec<Duration> = reader
        .delivery_latencies_since_us(phase3_start)?
        .into_iter()
        .map(|us| Duration::from_micros(us.max(0) as u64))
        .collect();
    e2e.sort_unstable();
    println!(
        "  end-to-end (receive -> PUBACK recorded) over {} records: p50 {:.2} ms, p99 {:.2} ms",
        e2e.len(),
        pct(&e2e, 0.5).as_secs_f64() * 1e3,
        pct(&e2e, 0.99).as_secs_f64() * 1e3
    );
    d.stop().await;

    // Phase 4: prune every delivered row (as retention does once they are old enough), with
    // the same secure_delete setting.
    let (ob, w) = siterelay::outbox::Outbox::open(
        &cfg.outbox_path(),
        siterelay::outbox::OutboxOptions {
            max_bytes: u64::MAX,
            quarantine_max_bytes: u64::MAX / 10,
            retain_delivered: Duration::ZERO,
            retain_rejected: Duration::from_secs(3600),
            dedup_keep: Duration::ZERO,
            secure_delete,
        },
    )?;
    let rows = ob
        .reader()?
        .stats()?
        .iter()
        .map(|f| f.delivered)
        .sum::<u64>();
    let t = Instant::now();
    ob.prune().await;
    ob.flush().await;
    println!(
        "phase 4 (prune): {rows} delivered rows pruned in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    drop(ob);
    w.join();
    Ok(())
}
