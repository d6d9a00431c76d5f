//! Issue 13's "batch bomb", re-run against the real binary with the default feed limits: several
//! senders at once each send one batch frame (`FHS`/`BHS` ... `BTS`/`FTS`), and this prints what
//! each got back, how long it took, and the daemon's memory (resident before, peak after:
//! `VmRSS` and `VmHWM` from `/proc`). The broker is down, as in the issue's measurement, so
//! what is accepted stays in the outbox.
//!
//! Two rounds, each against a fresh daemon and store:
//! - **over the cap**: the issue's 4 MB batch, 97,832 messages of 41 bytes (an MSH only), from
//!   each sender: before issue 13 one became 97,832 records and +156 MB RSS, and eight at once
//!   reached 1.1 GB;
//! - **at the cap**: batches of exactly `max_batch_messages` (default 10,000) whole ADT^A08
//!   messages, the most a sender can make the daemon take in one frame.
//!
//! ```sh
//! cargo run --release --example batch_bomb                 # 8 senders, both rounds
//! cargo run --release --example batch_bomb -- --senders 1
//! ```
//!
//! `SITERELAY_BIN` runs another build of the daemon.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use siterelay::client::{MllpClient, parse_ack, parse_batch_ack};
use siterelay_testkit::Pki;
use siterelay_testkit::bench::{daemon_binary, proc_status_kib};

/// The default `max_batch_messages` (docs/configuration.md).
const CAP: usize = 10_000;

/// One batch frame's content: `n` messages, each from `one(sender, i)`.
fn batch(sender: usize, n: usize, one: fn(usize, usize) -> String) -> Vec<u8> {
    let mut b = String::from("FHS|^~\\&|BOMB|RXX\rBHS|^~\\&|BOMB|RXX\r");
    for i in 0..n {
        b.push_str(&one(sender, i));
    }
    b.push_str(&format!("BTS|{n}\rFTS|1\r"));
    b.into_bytes()
}

/// The issue's 41-byte message: an MSH and nothing else.
fn tiny(sender: usize, i: usize) -> String {
    format!(
        "MSH|^~\\&|A|B|C|D|||ADT^A01|{:07}|P|2.5\r",
        sender * 1_000_000 + i
    )
}

/// A whole ADT^A08 with a synthetic patient (NHS numbers from the never-issued 999 range).
fn adt(sender: usize, i: usize) -> String {
    let n = sender * 1_000_000 + i;
    format!(
        "MSH|^~\\&|PAS|RXX01|SITERELAY|HUB|20261203120000||ADT^A08^ADT_A01|B{n:09}|P|2.5.1\r\
         EVN|A08|20261203120000\r\
         PID|1||999{:07}^^^NHS^NH||TESTER^BATCH||19800101|F\r\
         PV1|1|O|OPD^^^RXX01\r",
        n % 10_000_000
    )
}

struct Round {
    name: &'static str,
    messages: usize,
    one: fn(usize, usize) -> String,
}

async fn round(pki: &Pki, r: &Round, senders: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data)?;
    let port = siterelay_testkit::free_port();
    // Nothing listens on this port: the broker is down for the whole round.
    let broker = siterelay_testkit::free_port();
    let cfg = dir.path().join("siterelay.toml");
    std::fs::write(
        &cfg,
        siterelay_testkit::bench::config_text("bomb-box", &data, broker, pki, "lab", port),
    )?;
    let mut d = Command::new(daemon_binary())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = d.id();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "daemon did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = proc_status_kib(pid, "VmRSS:");
    let frames: Vec<Vec<u8>> = (0..senders)
        .map(|s| siterelay::sources::mllp::framing::encode(&batch(s, r.messages, r.one)))
        .collect();
    let frame_bytes = frames[0].len();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for frame in frames {
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let mut c = MllpClient::new(s);
            c.write_raw(&frame).await?;
            let answer = c.read_frame(Duration::from_secs(300)).await?;
            anyhow::Ok((answer, t.elapsed()))
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await??);
    }
    let peak = proc_status_kib(pid, "VmHWM:");
    let after = proc_status_kib(pid, "VmRSS:");
    let (anon, file) = (
        proc_status_kib(pid, "RssAnon:"),
        proc_status_kib(pid, "RssFile:"),
    );
    // SIGTERM: the daemon's own orderly stop (and a profiler wrapped around it writes its file).
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = d.wait();
    println!(
        "{}: {senders} sender(s) at once, each one batch of {} messages ({} bytes framed)",
        r.name, r.messages, frame_bytes
    );
    for (i, (answer, took)) in answers.iter().enumerate() {
        let what = if answer.starts_with(b"FHS") || answer.starts_with(b"BHS") {
            match parse_batch_ack(answer) {
                Ok(acks) => format!(
                    "batch acknowledgement listing {} ACKs ({} AA)",
                    acks.len(),
                    acks.iter().filter(|a| a.code == "AA").count()
                ),
                Err(e) => format!("unreadable batch answer: {e:?}"),
            }
        } else {
            match parse_ack(answer) {
                Ok(a) => format!("{} \"{}\"", a.code, a.text),
                Err(e) => format!("unreadable answer: {e:?}"),
            }
        };
        println!(
            "  sender {i}: {what}; answer {} bytes after {:.2} s",
            answer.len(),
            took.as_secs_f64()
        );
    }
    println!(
        "  daemon RSS: {:.1} MiB before, peak {:.1} MiB (+{:.1}), {:.1} MiB after ({:.1} MiB anonymous, {:.1} MiB file-backed)",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak.saturating_sub(idle) as f64 / 1024.0,
        after as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut senders = 8;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--senders" => senders = args.next().expect("--senders N").parse()?,
            _ => anyhow::bail!("usage: batch_bomb [--senders N]"),
        }
    }
    let (_pki_dir, pki) = Pki::generate_in_tempdir("bomb")?;
    for r in [
        Round {
            name: "over the cap (the issue's 4 MB batch)",
            messages: 97_832,
            one: tiny,
        },
        Round {
            name: "at the cap (max_batch_messages = 10000)",
            messages: CAP,
            one: adt,
        },
    ] {
        round(&pki, &r, senders).await?;
    }
    Ok(())
}
