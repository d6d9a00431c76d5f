//! Receive-to-subscriber latency at a paced rate: one MLLP sender sends at a fixed rate, the
//! daemon stores and forwards to a real broker, and a subscriber at the central side stamps each
//! record's arrival. The same broker and subscriber are then timed with a plain MQTT publisher
//! (rumqttc, QoS 1, its default socket options) sending the same number of messages at the same
//! rate: the broker's own share.
//!
//! ```sh
//! cargo run --release --example latency -- --rates 20,200,1000 --seconds 10 --broker mosquitto
//! ```
//!
//! Prints, per rate: p50 / p99 / max of send-to-arrival through siterelay, the same for the
//! plain publisher, and the difference of the p99s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use siterelay::client::MllpClient;
use siterelay_testkit::{BrokerOptions, Mosquitto, Pki, Subscriber, TestBroker};

struct Args {
    rates: Vec<u32>,
    seconds: u32,
    broker: String,
    /// Print every message slower than this (ms), with its send time from the start of its rate.
    show_slow: Option<f64>,
    /// Start Mosquitto with `set_tcp_nodelay true` (docs/broker/mosquitto.conf has it).
    broker_nodelay: bool,
}

fn args() -> Args {
    let mut a = Args {
        rates: vec![20, 200, 1000],
        seconds: 10,
        broker: "mosquitto".into(),
        show_slow: None,
        broker_nodelay: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().expect("value");
        match k.as_str() {
            "--rates" => a.rates = v().split(',').map(|r| r.parse().expect("rate")).collect(),
            "--seconds" => a.seconds = v().parse().expect("seconds"),
            "--broker" => a.broker = v(),
            "--broker-nodelay" => a.broker_nodelay = true,
            "--show-slow" => a.show_slow = Some(v().parse().expect("milliseconds")),
            "-h" | "--help" => {
                println!(
                    "latency [--rates 20,200,1000] [--seconds 10] [--broker mosquitto|inprocess] [--broker-nodelay] [--show-slow MS]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn message(rate: u32, i: u32) -> Vec<u8> {
    format!(
        "MSH|^~\\&|LATENCY|RXX|SITERELAY|HUB|20261202093000||ORU^R01^ORU_R01|T{rate}-{i}|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^PATIENT||19800615|F\r\
OBR|1|ORD{i}|LAB{i}|UE^UREA AND ELECTROLYTES^L|||202612020800\r\
OBX|1|NM|NA^Sodium^L||139|mmol/L|133-146||||F\r\
OBX|2|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3||||F\r"
    )
    .into_bytes()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Collect `n` arrivals (keyed by what `key` finds in the payload) and match them to send times.
async fn arrivals(
    sub: &mut Subscriber,
    n: usize,
    sent: &tokio::sync::Mutex<HashMap<String, Instant>>,
    key: impl Fn(&[u8]) -> String,
    show_slow: Option<(f64, &str, Instant)>,
) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match sub.recv(Duration::from_secs(30)).await {
            Some((_, payload, _)) => got.push((Instant::now(), key(&payload))),
            None => break,
        }
    }
    let sent = sent.lock().await;
    for (at, k) in got {
        if let Some(t) = sent.get(&k) {
            let d = at.saturating_duration_since(*t);
            if let Some((limit, who, start)) = show_slow {
                if ms(d) > limit {
                    eprintln!(
                        "slow ({who}): {k} sent at {:.3} s took {:.2} ms",
                        t.saturating_duration_since(start).as_secs_f64(),
                        ms(d)
                    );
                }
            }
            lat.push(d);
        }
    }
    lat.sort_unstable();
    lat
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let a = args();
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(dir.path(), "latency")?;
    let port = siterelay_testkit::free_port();
    let _broker: Box<dyn std::any::Any> = match a.broker.as_str() {
        "inprocess" => {
            Box::new(TestBroker::start(BrokerOptions::from_pki(&pki).with_port(port)).await?)
        }
        "mosquitto" => {
            let extra = if a.broker_nodelay {
                "set_tcp_nodelay true"
            } else {
                ""
            };
            Box::new(
                Mosquitto::start_with(&pki, &dir.path().join("mosq"), None, port, extra).await?,
            )
        }
        other => anyhow::bail!("--broker must be mosquitto or inprocess, not {other}"),
    };
    // Broker up for the whole run: the shared config's reconnect_max never comes into play.
    let cfg_text = siterelay_testkit::bench::config_text(
        "latency",
        &dir.path().join("data"),
        port,
        &pki,
        "lab",
        0,
    );
    let path = dir.path().join("siterelay.toml");
    std::fs::write(&path, cfg_text)?;
    let cfg = siterelay::config::load(&path)?;
    let mut records = Subscriber::connect(port, &pki, None, "siterelay/latency/records/#").await?;
    let mut plain = Subscriber::connect(port, &pki, None, "bench/plain").await?;
    let d = siterelay::app::Daemon::start(&cfg).await?;
    let addr = d.addr("lab").unwrap();

    // The plain publisher: rumqttc with its defaults, QoS 1, over the same TLS.
    let mut o = rumqttc::MqttOptions::new("latency-plain", "localhost", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(pki.client_tls_config()?),
    ));
    o.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut el) = rumqttc::AsyncClient::new(o, 1024);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });

    // Warm up: a few messages each way, not counted.
    let mut c = MllpClient::new(tokio::net::TcpStream::connect(addr).await?);
    for i in 0..20 {
        c.send(&message(0, i), Duration::from_secs(10)).await?;
    }
    let _ = records.collect(20, Duration::from_secs(20)).await;

    println!(
        "latency: broker {}{}, {} s per rate; send -> arrival at a subscriber, ms",
        a.broker,
        if a.broker_nodelay {
            " (set_tcp_nodelay true)"
        } else {
            ""
        },
        a.seconds
    );
    println!(
        "| Rate | siterelay p50 / p99 / max | plain publisher p50 / p99 / max | p99 difference |"
    );
    println!("|---|---|---|---|");
    for &rate in &a.rates {
        let n = rate * a.seconds;
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let sent = std::sync::Arc::new(tokio::sync::Mutex::new(HashMap::new()));

        // Through siterelay.
        let s2 = sent.clone();
        let sender = tokio::spawn(async move {
            let mut c = c;
            let start = tokio::time::Instant::now();
            for i in 0..n {
                tokio::time::sleep_until(start + period * i).await;
                let m = message(rate, i);
                s2.lock()
                    .await
                    .insert(format!("T{rate}-{i}"), Instant::now());
                let ack = c.send(&m, Duration::from_secs(10)).await.unwrap();
                assert_eq!(ack.code, "AA", "{}", ack.text);
            }
            c
        });
        let t0 = Instant::now();
        let ours = arrivals(
            &mut records,
            n as usize,
            &sent,
            |p| {
                let v: serde_json::Value = serde_json::from_slice(p).unwrap_or_default();
                v["hl7"]["control_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            },
            a.show_slow.map(|l| (l, "siterelay", t0)),
        )
        .await;
        c = sender.await?;

        // The broker alone.
        let sent = std::sync::Arc::new(tokio::sync::Mutex::new(HashMap::new()));
        let s2 = sent.clone();
        let p2 = publisher.clone();
        let t0 = Instant::now();
        let payload_len = 1_000;
        let sender = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                tokio::time::sleep_until(start + period * i).await;
                let id = format!("P{rate}-{i}");
                let mut body = format!("{id} ").into_bytes();
                body.resize(payload_len, b'x');
                s2.lock().await.insert(id, Instant::now());
                p2.publish("bench/plain", rumqttc::QoS::AtLeastOnce, false, body)
                    .await
                    .unwrap();
            }
        });
        let base = arrivals(
            &mut plain,
            n as usize,
            &sent,
            |p| {
                String::from_utf8_lossy(p)
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            },
            a.show_slow.map(|l| (l, "plain", t0)),
        )
        .await;
        sender.await?;
        println!(
            "| {rate} msg/s | {:.2} / {:.2} / {:.2} ({} of {n}) | {:.2} / {:.2} / {:.2} ({} of {n}) | {:+.2} |",
            ms(pct(&ours, 0.5)),
            ms(pct(&ours, 0.99)),
            ms(pct(&ours, 1.0)),
            ours.len(),
            ms(pct(&base, 0.5)),
            ms(pct(&base, 0.99)),
            ms(pct(&base, 1.0)),
            base.len(),
            ms(pct(&ours, 0.99)) - ms(pct(&base, 0.99)),
        );
    }
    d.stop().await;
    Ok(())
}
