//! Durable ingest against the bound the hardware sets, measured side by side in one run.
//!
//! ```sh
//! pip install hl7    # python-hl7, the comparison point
//! cargo build --release && cargo run --release --example ingest_bound -- --messages 3000
//! ```
//!
//! One load client (this program: `--connections` stop-and-wait MLLP connections, each sending
//! `--messages` ~283-byte ORU^R01 and waiting for the ACK before the next, as HL7 senders do)
//! against, in turn:
//!
//! 1. a bare MLLP server that stores nothing (this program re-run with `--bare-server`, its own
//!    process): the upper bound of the client, the loopback and the framing;
//! 2. python-hl7's asyncio MLLP server (`scripts/bench/python_hl7_server.py`), which parses
//!    each message and answers its ACK, storing nothing;
//! 3. siterelay (the release binary beside this example, its own process), durable: every `AA`
//!    after the fsync of the commit holding the message; the broker unreachable;
//! 4. siterelay again, 8 connections, while its sink drains the backlog the runs before left,
//!    to a real Mosquitto.
//!
//! Before the receivers, the same run measures the two costs a durable ACK cannot avoid: an
//! `fdatasync` of a 4 KiB overwrite in the directory the outbox lives in, and a loopback TCP round
//! trip. With C senders each waiting for its ACK, at most C messages can share an fsync, so
//! C / (fsync + round trip) bounds durable ingest (the group-commit bound).

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use siterelay::client::MllpClient;
use siterelay_testkit::proxy::{Mode, Proxy};
use siterelay_testkit::{Mosquitto, Pki, Subscriber};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn message(c: usize, i: usize) -> Vec<u8> {
    format!(
        "MSH|^~\\&|LOADGEN|RXX|SITERELAY|HUB|20261203093000||ORU^R01^ORU_R01|L{c}-{i}|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^PATIENT||19800615|F\r\
OBR|1|ORD{i}|LAB{i}|UE^UREA AND ELECTROLYTES^L|||202612030800\r\
OBX|1|NM|NA^Sodium^L||139|mmol/L|133-146||||F\r\
OBX|2|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3||||F\r"
    )
    .into_bytes()
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

/// The bare receiver: frames, reads MSH-10, answers AA. Stores nothing.
async fn bare_server(port: u16) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening");
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(8192);
            let mut chunk = [0u8; 8192];
            loop {
                let n = match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
                    let frame = &buf[..end];
                    let start = frame.iter().position(|&b| b == 0x0b).map_or(0, |p| p + 1);
                    let msh = frame[start..].split(|&b| b == b'\r').next().unwrap_or(&[]);
                    let control = msh.split(|&b| b == b'|').nth(9).unwrap_or(b"");
                    let mut ack =
                        b"\x0bMSH|^~\\&|BARE|HUB|LOADGEN|RXX|20261203093000||ACK|".to_vec();
                    ack.extend_from_slice(control);
                    ack.extend_from_slice(b"|P|2.4\rMSA|AA|");
                    ack.extend_from_slice(control);
                    ack.extend_from_slice(b"\r\x1c\r");
                    if s.write_all(&ack).await.is_err() {
                        return;
                    }
                    buf.drain(..end + 2);
                }
            }
        });
    }
}

/// p50 of an fdatasync after a 4 KiB overwrite, and after a 4 KiB append, in `dir`.
fn fsync_costs(dir: &Path) -> anyhow::Result<(f64, f64)> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let page = [0x5au8; 4096];
    f.write_all(&page)?;
    f.sync_all()?;
    let mut over = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        f.write_all_at(&page, 0)?;
        f.sync_data()?;
        over.push(t.elapsed());
    }
    let mut append = Vec::new();
    f.seek(SeekFrom::End(0))?;
    for _ in 0..2000 {
        let t = Instant::now();
        f.write_all(&page)?;
        f.sync_data()?;
        append.push(t.elapsed());
    }
    std::fs::remove_file(&path)?;
    Ok((pct(&mut over, 0.5), pct(&mut append, 0.5)))
}

/// p50 of a 64-byte loopback TCP round trip (echo server on its own task).
async fn loopback_rtt() -> anyhow::Result<f64> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).ok();
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).await.is_ok() {
            if s.write_all(&b).await.is_err() {
                return;
            }
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let mut b = [7u8; 64];
    let mut v = Vec::new();
    for i in 0..6000 {
        let t = Instant::now();
        c.write_all(&b).await?;
        c.read_exact(&mut b).await?;
        if i >= 1000 {
            v.push(t.elapsed());
        }
    }
    Ok(pct(&mut v, 0.5))
}

struct Run {
    rate: f64,
    p50: f64,
    p99: f64,
}

/// `connections` stop-and-wait senders, `per` messages each; every answer must be AA.
async fn load(
    addr: std::net::SocketAddr,
    connections: usize,
    per: usize,
    tag: usize,
) -> anyhow::Result<Run> {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut cl = MllpClient::new(tokio::net::TcpStream::connect(addr).await?);
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let m = message(tag * 1000 + c, i);
                let s = Instant::now();
                let ack = cl.send(&m, Duration::from_secs(30)).await?;
                anyhow::ensure!(ack.code == "AA", "{} {}", ack.code, ack.text);
                lat.push(s.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let el = t.elapsed().as_secs_f64();
    let n = lat.len() as f64;
    Ok(Run {
        rate: n / el,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
    })
}

async fn wait_listening(addr: std::net::SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(child.try_wait()?.is_none(), "the receiver exited");
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn row(name: &str, eight: &Run, one: Option<&Run>) {
    println!(
        "| {name} | {:.0} msg/s (p50 {:.2} ms, p99 {:.2} ms) | {} |",
        eight.rate,
        eight.p50,
        eight.p99,
        one.map(|o| format!("{:.0} msg/s (p50 {:.2} ms)", o.rate, o.p50))
            .unwrap_or_default()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut per = 3000usize;
    let mut connections = 8usize;
    let mut python = true;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--bare-server" => return bare_server(v()?.parse()?).await,
            "--messages" => per = v()?.parse()?,
            "--connections" => connections = v()?.parse()?,
            "--no-python" => python = false,
            "-h" | "--help" => {
                println!(
                    "ingest_bound [--messages 3000 (per connection)] [--connections 8] [--no-python]"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let bin = siterelay_testkit::bench::daemon_binary();
    anyhow::ensure!(
        bin.exists(),
        "{} not found: cargo build --release",
        bin.display()
    );
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;

    let (fs_over, fs_append) = fsync_costs(&data)?;
    let rtt = loopback_rtt().await?;
    let c = connections as f64;
    let bound_n = c / ((fs_over + rtt) / 1e3);
    let bound_1 = 1.0 / ((fs_over + rtt) / 1e3);
    println!(
        "ingest_bound: {connections} connections x {per} messages; fdatasync p50 {fs_over:.3} ms (4 KiB overwrite), {fs_append:.3} ms (4 KiB append); loopback round trip p50 {rtt:.3} ms"
    );
    println!(
        "group-commit bound: {connections} / (fsync + round trip) = {bound_n:.0} msg/s; one connection: {bound_1:.0} msg/s"
    );
    println!("\n| Receiver | {connections} connections | 1 connection |\n|---|---|---|");

    // 1. Bare.
    let port = siterelay_testkit::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut bare = Command::new(std::env::current_exe()?)
        .args(["--bare-server", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()?;
    wait_listening(addr, &mut bare).await?;
    let b8 = load(addr, connections, per, 1).await?;
    let b1 = load(addr, 1, per, 2).await?;
    bare.kill()?;
    bare.wait()?;
    row(
        "a bare MLLP server that stores nothing (upper bound)",
        &b8,
        Some(&b1),
    );

    // 2. python-hl7.
    let mut py_rate = None;
    if python {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/python_hl7_server.py");
        let port = siterelay_testkit::free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut py = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .spawn()?;
        wait_listening(addr, &mut py).await?;
        let p8 = load(addr, connections, per, 3).await?;
        let p1 = load(addr, 1, per, 4).await?;
        py.kill()?;
        py.wait()?;
        row(
            "python-hl7's asyncio MLLP server, stores nothing",
            &p8,
            Some(&p1),
        );
        py_rate = Some((p8.rate, p1.rate));
    }

    // 3 and 4. siterelay.
    let pki = Pki::generate(dir.path(), "bound")?;
    let broker = Mosquitto::start_with(
        &pki,
        &dir.path().join("mosq"),
        None,
        0,
        "max_queued_messages 1000000",
    )
    .await?;
    let proxy = Proxy::start(broker.port(), Mode::Closed).await;
    let mut sub =
        Subscriber::connect(broker.port(), &pki, None, "siterelay/bound/records/#").await?;
    let arrived = Arc::new(AtomicU64::new(0));
    {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while sub.recv(Duration::from_secs(3600)).await.is_some() {
                arrived.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let port = siterelay_testkit::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let cfg = dir.path().join("siterelay.toml");
    std::fs::write(
        &cfg,
        siterelay_testkit::bench::config_text("bound", &data, proxy.port(), &pki, "lab", port),
    )?;
    let mut d = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .spawn()?;
    wait_listening(addr, &mut d).await?;
    let s1 = load(addr, 1, per, 5).await?;
    let s8 = load(addr, connections, per, 6).await?;
    row("siterelay, durable, broker down", &s8, Some(&s1));
    let backlog = (per * (connections + 1)) as u64;
    proxy.set(Mode::Pass).await;
    let drain_start = Instant::now();
    let sd = load(addr, connections, per, 7).await?;
    let during = arrived.load(Ordering::SeqCst);
    row(
        &format!("siterelay while draining {backlog} records to Mosquitto"),
        &sd,
        None,
    );
    let want = backlog + (per * connections) as u64;
    while arrived.load(Ordering::SeqCst) < want && drain_start.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = drain_start.elapsed().as_secs_f64();
    let _ = siterelay_testkit::sys::sigterm(d.id());
    d.wait()?;
    println!();
    println!(
        "siterelay / bound: {connections} connections {:.2}, one connection {:.2}",
        s8.rate / bound_n,
        s1.rate / bound_1
    );
    if let Some((p8, p1)) = py_rate {
        println!(
            "siterelay / python-hl7: {connections} connections {:.1}x, one connection {:.1}x",
            s8.rate / p8,
            s1.rate / p1
        );
    }
    println!(
        "ACKs while draining / broker down: {:.2} (a backlog of {backlog}; {during} records had reached the subscriber when that run ended, all {want} after {all:.1} s)",
        sd.rate / s8.rate
    );
    drop(broker);
    Ok(())
}
