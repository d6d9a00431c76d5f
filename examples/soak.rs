//! Long soak: the real `siterelay` binary under a steady paced load for an hour, with the broker
//! restarted every ten minutes, sampled every few seconds for what would show a leak: resident
//! memory, open file descriptors, the data directory's size, and send-to-subscriber latency.
//!
//! ```sh
//! cargo build --release && cargo run --release --example soak -- --minutes 60 --rate 500 \
//!     --restart-every 10 --out docs/soak
//! ```
//!
//! Parts: a mutual-TLS Mosquitto (testkit), the daemon as a child process (the binary beside this
//! example in the same target directory), one MLLP sender paced at `--rate` messages a second
//! (stop-and-wait, as HL7 senders are), and a subscriber at the central side that stamps each
//! record's arrival. Between the daemon and the broker sits a TCP proxy the soak controls. A
//! broker restart: the proxy stops admitting the daemon, Mosquitto is restarted, the subscriber
//! reconnects and resubscribes, and the daemon is kept away from the broker for `--outage`
//! seconds more (so a backlog builds and drains every time) before the proxy lets it through.
//! The subscriber is connected whenever the daemon can publish, so every record it misses is a
//! record the daemon lost.
//!
//! Writes `soak.csv` (one row per sample) and `soak.svg` (four panels over time) into `--out`,
//! and prints a summary. Retention is shortened (`retain_delivered = "5m"`, `dedup_window =
//! "10m"`) so that pruning, the duplicate window's expiry and the WAL checkpoints all run many
//! times within the hour: with the product defaults (7 days) the store and the duplicate index
//! would grow for a week by design, and a leak would hide in that growth.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use siterelay::client::MllpClient;
use siterelay_testkit::bench::{daemon_binary, proc_status_kib};
use siterelay_testkit::proxy::{Mode, Proxy};
use siterelay_testkit::{Mosquitto, Pki, Subscriber};

struct Args {
    minutes: f64,
    rate: u32,
    restart_every: f64,
    outage: u64,
    sample: u64,
    out: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        minutes: 60.0,
        rate: 500,
        restart_every: 10.0,
        outage: 10,
        sample: 10,
        out: PathBuf::from("soak-out"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--minutes" => a.minutes = v()?.parse()?,
            "--rate" => a.rate = v()?.parse()?,
            "--restart-every" => a.restart_every = v()?.parse()?,
            "--outage" => a.outage = v()?.parse()?,
            "--sample" => a.sample = v()?.parse()?,
            "--out" => a.out = PathBuf::from(v()?),
            "-h" | "--help" => {
                println!(
                    "soak [--minutes 60] [--rate 500] [--restart-every 10 (minutes)] \
                     [--outage 10 (seconds)] [--sample 10 (seconds)] [--out DIR]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn message(i: u64) -> Vec<u8> {
    format!(
        "MSH|^~\\&|SOAK|RXX|SITERELAY|HUB|20261203093000||ORU^R01^ORU_R01|S{i}|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^SOAK||19800615|F\r\
OBR|1|ORD{i}|LAB{i}|UE^UREA AND ELECTROLYTES^L|||202612030800\r\
OBX|1|NM|NA^Sodium^L||139|mmol/L|133-146||||F\r\
OBX|2|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3||||F\r"
    )
    .into_bytes()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                total += if m.is_dir() {
                    dir_bytes(&e.path())
                } else {
                    m.len()
                };
            }
        }
    }
    total
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Default)]
struct Shared {
    sent: HashMap<u64, Instant>,
    acked: u64,
    not_aa: u64,
    received: std::collections::HashSet<u64>,
    duplicates: u64,
    window_latency_ms: Vec<f64>,
    window_ack_ms: Vec<f64>,
}

struct Sample {
    t: f64,
    rss_kib: u64,
    fds: usize,
    store_bytes: u64,
    sent: u64,
    acked: u64,
    received: u64,
    lat_p50: f64,
    lat_p99: f64,
    ack_p99: f64,
    broker_up: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let bin = daemon_binary();
    anyhow::ensure!(
        bin.exists(),
        "{} not found: run `cargo build --release` first",
        bin.display()
    );
    std::fs::create_dir_all(&a.out)?;
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(dir.path(), "soak")?;
    let broker_port = siterelay_testkit::free_port();
    // Mosquitto's default `max_queued_messages` (1000) drops QoS 1 messages for a subscriber
    // that falls behind, as after every outage here: raised, as docs/broker/ tells the central
    // team to.
    let mut broker = Mosquitto::start_with(
        &pki,
        &dir.path().join("mosq"),
        None,
        broker_port,
        "max_queued_messages 1000000",
    )
    .await?;
    let proxy = Proxy::start(broker_port, Mode::Pass).await;
    let mut sub = Subscriber::connect(broker_port, &pki, None, "siterelay/soak/records/#").await?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let listen = siterelay_testkit::free_port();
    let data = dir.path().join("data");
    let cfg = dir.path().join("siterelay.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"appliance_id = "soak"
organisation = "RXX"
data_dir = "{data}"
[log]
level = "warn"
[store]
retain_delivered = "5m"
[mqtt]
host = "localhost"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
reconnect_max = "2s"
[[mllp]]
name = "lab"
listen = "127.0.0.1:{listen}"
dedup_window = "10m"
"#,
            data = data.display(),
            port = proxy.port(),
            ca = pki.ca_file().display(),
            cert = pki.client_cert_file().display(),
            key = pki.client_key_file().display(),
        ),
    )?;
    let mut child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{listen}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => anyhow::bail!("the daemon never listened: {e}"),
        }
    };
    let started = Instant::now();
    let total = Duration::from_secs_f64(a.minutes * 60.0);

    // The subscriber: arrival stamps. It also publishes how many SUBACKs it has had, so a broker
    // restart can wait for the central side to be back before the daemon may publish again.
    let s = shared.clone();
    let subacks = Arc::new(std::sync::atomic::AtomicU64::new(sub.subscribe_count()));
    let subacks_w = subacks.clone();
    tokio::spawn(async move {
        loop {
            subacks_w.store(sub.subscribe_count(), std::sync::atomic::Ordering::SeqCst);
            let Some((_, payload, _)) = sub.recv(Duration::from_millis(200)).await else {
                continue;
            };
            let at = Instant::now();
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            let Some(i) = v["hl7"]["control_id"]
                .as_str()
                .and_then(|c| c.strip_prefix('S'))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let mut g = s.lock().unwrap();
            if !g.received.insert(i) {
                g.duplicates += 1;
                continue;
            }
            if let Some(t) = g.sent.get(&i).copied() {
                g.window_latency_ms
                    .push(at.saturating_duration_since(t).as_secs_f64() * 1e3);
            }
        }
    });

    // The sender: paced, stop-and-wait.
    let s = shared.clone();
    let period = Duration::from_secs_f64(1.0 / a.rate as f64);
    let sender = tokio::spawn(async move {
        let mut c = MllpClient::new(stream);
        let start = tokio::time::Instant::now();
        let mut i = 0u64;
        while start.elapsed() < total {
            tokio::time::sleep_until(start + period * i as u32).await;
            let t = Instant::now();
            s.lock().unwrap().sent.insert(i, t);
            match c.send(&message(i), Duration::from_secs(30)).await {
                Ok(ack) => {
                    let mut g = s.lock().unwrap();
                    g.window_ack_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    if ack.code == "AA" {
                        g.acked += 1;
                    } else {
                        g.not_aa += 1;
                    }
                }
                Err(e) => {
                    eprintln!("soak: the sender's connection failed at message {i}: {e}");
                    return;
                }
            }
            i += 1;
        }
    });

    // Broker restarts, in their own task so that sampling goes on through them.
    let restart_every = Duration::from_secs_f64(a.restart_every * 60.0);
    let broker_up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let proxy = Arc::new(proxy);
    {
        let (broker_up, restarts, proxy, subacks) = (
            broker_up.clone(),
            restarts.clone(),
            proxy.clone(),
            subacks.clone(),
        );
        let outage = Duration::from_secs(a.outage);
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now() + restart_every;
            loop {
                tokio::time::sleep_until(next).await;
                broker_up.store(false, std::sync::atomic::Ordering::SeqCst);
                proxy.set(Mode::Closed).await;
                proxy.reset_all();
                let before = subacks.load(std::sync::atomic::Ordering::SeqCst);
                if let Err(e) = broker.restart().await {
                    eprintln!("soak: the broker did not restart: {e:#}");
                    return;
                }
                // The central side is back before the daemon may publish again.
                let deadline = Instant::now() + Duration::from_secs(30);
                while subacks.load(std::sync::atomic::Ordering::SeqCst) <= before
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(outage).await;
                proxy.set(Mode::Pass).await;
                broker_up.store(true, std::sync::atomic::Ordering::SeqCst);
                restarts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                next += restart_every;
            }
        });
    }
    let mut samples: Vec<Sample> = Vec::new();
    let sample_every = Duration::from_secs(a.sample);
    let mut next_sample = started + sample_every;
    println!(
        "soak: {} min at {} msg/s, broker restarted every {} min ({} s outage for the daemon), pid {pid}",
        a.minutes, a.rate, a.restart_every, a.outage
    );
    while started.elapsed() < total {
        if Instant::now() >= next_sample {
            let mut g = shared.lock().unwrap();
            let mut lat = std::mem::take(&mut g.window_latency_ms);
            let mut ack = std::mem::take(&mut g.window_ack_ms);
            lat.sort_by(|a, b| a.total_cmp(b));
            ack.sort_by(|a, b| a.total_cmp(b));
            let s = Sample {
                t: started.elapsed().as_secs_f64(),
                rss_kib: proc_status_kib(pid, "VmRSS:"),
                fds: open_fds(pid),
                store_bytes: dir_bytes(&data),
                sent: g.sent.len() as u64,
                acked: g.acked,
                received: g.received.len() as u64,
                lat_p50: pct(&lat, 0.5),
                lat_p99: pct(&lat, 0.99),
                ack_p99: pct(&ack, 0.99),
                broker_up: broker_up.load(std::sync::atomic::Ordering::SeqCst),
            };
            drop(g);
            eprintln!(
                "t={:>5.0}s rss={} KiB fds={} store={} B sent={} acked={} received={} p50={:.2} p99={:.2} ms ack_p99={:.2} ms",
                s.t,
                s.rss_kib,
                s.fds,
                s.store_bytes,
                s.sent,
                s.acked,
                s.received,
                s.lat_p50,
                s.lat_p99,
                s.ack_p99
            );
            samples.push(s);
            next_sample += sample_every;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sender.await;
    // Let the last backlog drain.
    let drain_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (acked, received) = {
            let g = shared.lock().unwrap();
            (g.acked, g.received.len() as u64)
        };
        if received >= acked || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let final_rss = proc_status_kib(pid, "VmRSS:");
    let final_fds = open_fds(pid);
    let final_store = dir_bytes(&data);
    let _ = siterelay_testkit::sys::sigterm(pid);
    let _ = child.wait();
    let g = shared.lock().unwrap();
    let lost = g.acked.saturating_sub(g.received.len() as u64);

    write_csv(&a.out.join("soak.csv"), &samples)?;
    write_svg(&a.out.join("soak.svg"), &samples, &a)?;
    let first = samples
        .iter()
        .find(|s| s.t >= 60.0)
        .or(samples.first())
        .map(|s| (s.rss_kib, s.fds, s.store_bytes));
    println!(
        "soak: {} broker restarts",
        restarts.load(std::sync::atomic::Ordering::SeqCst)
    );
    println!(
        "soak: sent {} acked {} not-AA {} received {} duplicates {} lost {}",
        g.sent.len(),
        g.acked,
        g.not_aa,
        g.received.len(),
        g.duplicates,
        lost
    );
    if let Some((rss, fds, store)) = first {
        println!(
            "soak: after 1 min rss {} KiB, fds {}, data dir {} B; at the end rss {} KiB, fds {}, data dir {} B",
            rss, fds, store, final_rss, final_fds, final_store
        );
    }
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let peak_store = samples.iter().map(|s| s.store_bytes).max().unwrap_or(0);
    println!("soak: peak rss {peak} KiB, peak fds {peak_fds}, peak data dir {peak_store} B");
    let mut p99s: Vec<f64> = samples
        .iter()
        .filter(|s| s.broker_up && s.lat_p99.is_finite())
        .map(|s| s.lat_p99)
        .collect();
    p99s.sort_by(|a, b| a.total_cmp(b));
    println!(
        "soak: per-sample latency p99 (samples with the broker up): median {:.2} ms, worst {:.2} ms",
        pct(&p99s, 0.5),
        p99s.last().copied().unwrap_or(f64::NAN)
    );
    println!("soak: wrote {}", a.out.join("soak.svg").display());
    anyhow::ensure!(lost == 0, "{lost} acknowledged messages never arrived");
    Ok(())
}

fn write_csv(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut s = String::from(
        "t_secs,rss_kib,open_fds,data_dir_bytes,sent,acked,received,latency_p50_ms,latency_p99_ms,ack_p99_ms,broker_up\n",
    );
    for x in samples {
        writeln!(
            s,
            "{:.1},{},{},{},{},{},{},{:.3},{:.3},{:.3},{}",
            x.t,
            x.rss_kib,
            x.fds,
            x.store_bytes,
            x.sent,
            x.acked,
            x.received,
            x.lat_p50,
            x.lat_p99,
            x.ack_p99,
            x.broker_up as u8
        )?;
    }
    std::fs::write(path, s)?;
    Ok(())
}

/// Four panels, time across: RSS (MiB), open fds, data directory (MiB), latency p50/p99 (ms,
/// log scale). Plain SVG, no plotting dependency.
fn write_svg(path: &Path, samples: &[Sample], a: &Args) -> anyhow::Result<()> {
    let (w, ph, left, top, gap) = (900.0, 170.0, 70.0, 40.0, 50.0);
    let plot_w = w - left - 30.0;
    let tmax = samples.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
    type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&Sample) -> f64 + 'a>);
    let panels: Vec<(&str, bool, Vec<Series>)> = vec![
        (
            "resident memory (MiB)",
            false,
            vec![(
                "rss",
                "#1f77b4",
                Box::new(|s: &Sample| s.rss_kib as f64 / 1024.0),
            )],
        ),
        (
            "open file descriptors",
            false,
            vec![("fds", "#2ca02c", Box::new(|s: &Sample| s.fds as f64))],
        ),
        (
            "data directory (MiB)",
            false,
            vec![(
                "store",
                "#9467bd",
                Box::new(|s: &Sample| s.store_bytes as f64 / 1048576.0),
            )],
        ),
        (
            "send to subscriber (ms, log scale): p50, p99",
            true,
            vec![
                ("p50", "#ff7f0e", Box::new(|s: &Sample| s.lat_p50)),
                ("p99", "#d62728", Box::new(|s: &Sample| s.lat_p99)),
            ],
        ),
    ];
    let h = top + panels.len() as f64 * (ph + gap) + 20.0;
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#)?;
    writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="14">siterelay soak: {} msg/s for {} min, broker restarted every {} min (shaded: daemon cut off from the broker)</text>"#,
        a.rate, a.minutes, a.restart_every
    )?;
    for (pi, (title, log, series)) in panels.iter().enumerate() {
        let y0 = top + pi as f64 * (ph + gap);
        let vals: Vec<f64> = samples
            .iter()
            .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let mut vmax = vals.iter().cloned().fold(0.0, f64::max);
        let mut vmin = if *log {
            vals.iter().cloned().fold(f64::INFINITY, f64::min).max(0.01)
        } else {
            0.0
        };
        if vmax <= vmin {
            vmax = vmin + 1.0;
        }
        if *log {
            vmin = 10f64.powf(vmin.log10().floor());
            vmax = 10f64.powf(vmax.log10().ceil());
        } else {
            vmax *= 1.15;
        }
        let y = |v: f64| -> f64 {
            let f = if *log {
                (v.log10() - vmin.log10()) / (vmax.log10() - vmin.log10())
            } else {
                (v - vmin) / (vmax - vmin)
            };
            y0 + ph - f * ph
        };
        let x = |t: f64| left + t / tmax * plot_w;
        // Outage shading.
        for s in samples.iter().filter(|s| !s.broker_up) {
            let sw = a.sample as f64 / tmax * plot_w;
            writeln!(
                svg,
                r##"<rect x="{:.1}" y="{y0}" width="{sw:.1}" height="{ph}" fill="#eeeeee"/>"##,
                x(s.t) - sw
            )?;
        }
        writeln!(
            svg,
            r#"<rect x="{left}" y="{y0}" width="{plot_w}" height="{ph}" fill="none" stroke="black"/>"#
        )?;
        writeln!(
            svg,
            r#"<text x="{left}" y="{}" font-size="13">{title}</text>"#,
            y0 - 6.0
        )?;
        // Axis labels: bottom, middle, top.
        let ticks: Vec<f64> = if *log {
            let mut t = vec![];
            let mut v = vmin;
            while v <= vmax * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            vec![vmin, (vmin + vmax) / 2.0, vmax]
        };
        for v in ticks {
            writeln!(
                svg,
                r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                y(v),
                y(v),
                left - 4.0,
                y(v) + 4.0,
                if v >= 10.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            )?;
        }
        for (name, colour, f) in series {
            let pts: Vec<String> = samples
                .iter()
                .filter(|s| f(s).is_finite() && (!log || f(s) > 0.0))
                .map(|s| format!("{:.1},{:.1}", x(s.t), y(f(s))))
                .collect();
            writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            )?;
            if series.len() > 1 {
                writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" fill="{colour}">{name}</text>"#,
                    left + plot_w - 40.0,
                    y0 + 14.0 + 14.0 * series.iter().position(|s| s.0 == *name).unwrap() as f64
                )?;
            }
        }
        // Time axis.
        for m in 0..=((tmax / 60.0) as u64) {
            if m % 10 == 0 {
                let tx = x(m as f64 * 60.0);
                writeln!(
                    svg,
                    r#"<text x="{tx:.1}" y="{:.1}" text-anchor="middle">{m} min</text>"#,
                    y0 + ph + 14.0
                )?;
            }
        }
    }
    writeln!(svg, "</svg>")?;
    std::fs::write(path, svg)?;
    Ok(())
}
