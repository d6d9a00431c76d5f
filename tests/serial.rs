//! Serial devices over real pseudo-terminals: the daemon opens the pty by a stable symlink (as
//! it would `/dev/serial/by-id/...`), the test plays an ASTM analyser, an HL7 device or a
//! line-oriented monitor on the master side, and records arrive at a real mutual-TLS broker.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::analyser::analyser_send;
use common::*;
use siterelay::app::Daemon;
use siterelay::astm::link;
use siterelay::telemetry::PortState;
use siterelay_testkit::pty::Pty;

/// A chemistry result message, long enough (a 300-character comment) to need several frames.
fn astm_message(sample: &str) -> Vec<u8> {
    let comment = "Q".repeat(300);
    format!(
        "H|\\^&|||TESTCHEM^2.1^SN001|||||||P|1|20261130093000\r\
P|1||PAT{sample}||TEST^PATIENT||19800615|F\r\
O|1|{sample}||^^^NA\\^^^K\\^^^GLU|R||||||N\r\
R|1|^^^NA|139|mmol/L|133-146|N||F||OP1|20261130090000|20261130092000|TESTCHEM\r\
R|2|^^^K|6.1|mmol/L|3.5-5.3|H||F||OP1|20261130090000|20261130092000|TESTCHEM\r\
C|1|I|{comment}|G\r\
R|3|^^^GLU|5.40|mmol/L|3.0-7.8|N||F||OP1|20261130090000|20261130092000|TESTCHEM\r\
L|1|N\r"
    )
    .into_bytes()
}

struct SerialEnv {
    env: Env,
    link: PathBuf,
}

impl SerialEnv {
    fn new() -> SerialEnv {
        let env = Env::new();
        let link = env.dir.path().join("ttyANALYSER");
        SerialEnv { env, link }
    }

    fn config(&self, broker_port: u16, protocol: &str, extra: &str) -> siterelay::config::Config {
        let text = self.env.config_text(broker_port, &[], "")
            + &format!(
                "\n[[serial]]\nname = \"chem1\"\ndevice = \"{}\"\nprotocol = \"{protocol}\"\nbaud = 9600\nmodel = \"TEST-CHEM\"\nlocation = \"Blood sciences bench 2\"\nreopen_max_secs = 1\n{extra}\n",
                self.link.display()
            );
        siterelay::config::parse(Path::new("t.toml"), &text).expect("valid serial config")
    }
}

/// A broker, a records subscriber, a pty behind the configured symlink, and a daemon whose
/// serial port speaking `protocol` is open.
async fn connected(
    protocol: &str,
    extra: &str,
) -> (
    SerialEnv,
    Broker,
    siterelay_testkit::Subscriber,
    Pty,
    Daemon,
) {
    let s = SerialEnv::new();
    let broker = Broker::start(Kind::InProcess, &s.env).await;
    let sub = broker
        .subscribe(&s.env, "siterelay/test-box/records/#")
        .await;
    let pty = Pty::open().unwrap();
    pty.link_at(&s.link).unwrap();
    let d = Daemon::start(&s.config(broker.port, protocol, extra))
        .await
        .unwrap();
    wait_state(&d, "chem1", PortState::Connected).await;
    (s, broker, sub, pty, d)
}

async fn wait_state(d: &Daemon, feed: &str, want: PortState) {
    let c = d.telemetry().feed(feed);
    assert!(
        wait_until(Duration::from_secs(15), || c.port_state() == want).await,
        "port state {:?}, wanted {want:?} (last problem: {:?})",
        c.port_state(),
        c.port_problem()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn astm_messages_over_a_pty_arrive_once_complete_and_normalised() {
    let (s, _broker, mut sub, mut pty, d) = connected("astm", "").await;

    let msgs: Vec<Vec<u8>> = ["S1", "S2", "S3"].iter().map(|s| astm_message(s)).collect();
    let db = s.env.data_dir().join("outbox.sqlite");
    let replies = tokio::task::spawn_blocking(move || {
        let mut replies = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            // The second message has its second frame damaged on the line once.
            replies.push(analyser_send(&mut pty, m, (i == 1).then_some(2)));
            // The analyser has its final ACK: the message must already be committed.
            let stored = siterelay::outbox::Reader::open(&db)
                .unwrap()
                .feed_rows_from("chem1", 1, 10)
                .unwrap()
                .len();
            assert_eq!(stored, i + 1, "final ACK only after the commit");
        }
        (pty, replies)
    })
    .await
    .unwrap();
    let (_pty, replies) = replies;
    assert!(
        replies[1].contains(&link::NAK),
        "the damaged frame was refused"
    );
    assert!(!replies[0].contains(&link::NAK));

    let got = sub.collect(3, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 3);
    assert!(
        sub.recv(Duration::from_millis(800)).await.is_none(),
        "each message arrives once"
    );
    for (i, (topic, payload, _)) in got.iter().enumerate() {
        assert_eq!(topic, "siterelay/test-box/records/chem1");
        let r = json(payload);
        assert_eq!(r["seq"], i as u64 + 1);
        assert_eq!(r["format"], "astm");
        assert_eq!(r["source"]["kind"], "serial");
        assert_eq!(r["source"]["peer"], s.link.display().to_string());
        assert_eq!(r["complete"], true);
        assert_eq!(r["device"]["model"], "TEST-CHEM");
        assert_eq!(r["device"]["location"], "Blood sciences bench 2");
        let obs = &r["astm"]["patients"][0]["orders"][0]["observations"];
        assert_eq!(obs.as_array().unwrap().len(), 3, "{r}");
        assert_eq!(obs[0]["code"]["code"], "NA");
        assert_eq!(obs[0]["value"], 139);
        assert_eq!(obs[1]["abnormal_flags"], serde_json::json!(["H"]));
        assert_eq!(
            r["astm"]["patients"][0]["orders"][0]["specimen_id"],
            format!("S{}", i + 1)
        );
        assert_eq!(
            r["raw"].as_str().unwrap().as_bytes(),
            &astm_message(&format!("S{}", i + 1))[..],
            "reassembled across frames exactly"
        );
    }
    let h = d.telemetry().feed("chem1");
    assert_eq!(h.stored.load(std::sync::atomic::Ordering::Relaxed), 3);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugging_mid_message_never_forwards_the_partial_and_later_messages_flow() {
    let s = SerialEnv::new();
    let broker = Broker::start(Kind::InProcess, &s.env).await;
    let mut sub = broker
        .subscribe(&s.env, "siterelay/test-box/records/#")
        .await;
    // The device is missing at start: the port waits for it.
    let d = Daemon::start(&s.config(broker.port, "astm", ""))
        .await
        .unwrap();
    wait_state(&d, "chem1", PortState::Waiting).await;
    let mut pty = Pty::open().unwrap();
    pty.link_at(&s.link).unwrap();
    wait_state(&d, "chem1", PortState::Connected).await;

    let pty = tokio::task::spawn_blocking(move || {
        analyser_send(&mut pty, &astm_message("BEFORE"), None);
        // Start another message, get the first frame acknowledged, then pull the plug.
        pty.write(&[link::ENQ]).unwrap();
        assert_eq!(
            pty.read_timeout(Duration::from_secs(5)).unwrap(),
            [link::ACK]
        );
        pty.write(&link::encode_frame(
            1,
            b"H|\\^&|||TESTCHEM\rP|1||PARTIAL\r",
            false,
        ))
        .unwrap();
        assert_eq!(
            pty.read_timeout(Duration::from_secs(5)).unwrap(),
            [link::ACK]
        );
        pty
    })
    .await
    .unwrap();
    drop(pty); // unplugged
    wait_state(&d, "chem1", PortState::Waiting).await;

    // Plugged back in: a new pty behind the same stable name.
    let mut pty = Pty::open().unwrap();
    pty.link_at(&s.link).unwrap();
    wait_state(&d, "chem1", PortState::Connected).await;
    tokio::task::spawn_blocking(move || {
        analyser_send(&mut pty, &astm_message("AFTER"), None);
        pty
    })
    .await
    .unwrap();

    let got = sub.collect(2, Duration::from_secs(20)).await;
    assert!(
        sub.recv(Duration::from_millis(800)).await.is_none(),
        "nothing else arrives"
    );
    let ids: Vec<String> = got
        .iter()
        .map(|(_, p, _)| {
            let r = json(p);
            assert_eq!(r["complete"], true);
            r["astm"]["patients"][0]["orders"][0]["specimen_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["BEFORE", "AFTER"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn astm_transmission_ended_early_is_stored_flagged_incomplete() {
    let (_s, _broker, mut sub, mut pty, d) = connected("astm", "").await;
    tokio::task::spawn_blocking(move || {
        pty.write(&[link::ENQ]).unwrap();
        assert_eq!(
            pty.read_timeout(Duration::from_secs(5)).unwrap(),
            [link::ACK]
        );
        let text = b"H|\\^&|||TESTCHEM\rP|1||EARLY\rO|1|EARLY||^^^NA\rR|1|^^^NA|140|mmol/L\r";
        pty.write(&link::encode_frame(1, text, true)).unwrap();
        assert_eq!(
            pty.read_timeout(Duration::from_secs(5)).unwrap(),
            [link::ACK]
        );
        pty.write(&[link::EOT]).unwrap(); // no L record
        std::thread::sleep(Duration::from_millis(300));
        pty
    })
    .await
    .unwrap();
    let (_, payload, _) = sub
        .recv(Duration::from_secs(10))
        .await
        .expect("the partial message is kept");
    let r = json(&payload);
    assert_eq!(r["complete"], false);
    assert_eq!(
        r["astm"]["patients"][0]["orders"][0]["observations"][0]["value"],
        140
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windows_1252_port_reads_an_analysers_quotes_euro_and_dashes_and_masks_its_password() {
    let (_s, _broker, mut sub, mut pty, d) = connected("astm", "charset = \"windows-1252\"").await;
    // Bytes as a Windows PC beside the analyser writes them.
    let message = b"H|\\^&||PSWD|WINLAB^2.0|||||LIS||P|1|20261130093000\r\
P|1||PAT1||MUSTERMANN^TESTPERSON\rO|1|S1||^^^K|R\r\
R|1|^^^K|4.1|mmol/L|3.5\x965.0|N||F\rC|1|I|\x84Probe h\xe4molytisch\x93 \x80|G\rL|1|N\r"
        .to_vec();
    tokio::task::spawn_blocking(move || {
        analyser_send(&mut pty, &message, None);
        pty
    })
    .await
    .unwrap();
    let (_, payload, _) = sub.recv(Duration::from_secs(10)).await.expect("record");
    let r = json(&payload);
    assert_eq!(r["charset"], "windows-1252");
    let obs = &r["astm"]["patients"][0]["orders"][0]["observations"][0];
    assert_eq!(obs["reference_range"], "3.5–5.0");
    assert_eq!(obs["comments"][0]["text"], "„Probe hämolytisch“ €");
    assert!(r["raw"].as_str().unwrap().starts_with("H|\\^&||***|WINLAB"));
    assert!(!String::from_utf8_lossy(&payload).contains("PSWD"));
    d.stop().await;
}

/// Play an HL7 device: write `message` in an MLLP frame on the pty and read the framed ACK.
async fn hl7_device_send(pty: Pty, message: Vec<u8>) -> (Pty, siterelay::client::AckSummary) {
    let (pty, ack) = tokio::task::spawn_blocking(move || {
        let mut pty = pty;
        pty.write(&siterelay::sources::mllp::framing::encode(&message))
            .unwrap();
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while !got.ends_with(&[0x1c, 0x0d]) && Instant::now() < end {
            got.extend(pty.read_timeout(Duration::from_millis(200)).unwrap());
        }
        (pty, got)
    })
    .await
    .unwrap();
    let ack = siterelay::client::parse_ack(&ack[1..ack.len() - 2]).unwrap();
    (pty, ack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hl7_over_serial_is_acked_on_the_port_after_the_commit() {
    let (_s, _broker, mut sub, pty, d) = connected("hl7-mllp", "").await;
    let (_pty, ack) = hl7_device_send(pty, adt("SER1")).await;
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AA", "SER1"));
    let (_, payload, _) = sub.recv(Duration::from_secs(10)).await.expect("record");
    let r = json(&payload);
    assert_eq!(r["format"], "hl7v2");
    assert_eq!(r["source"]["kind"], "serial");
    assert_eq!(r["hl7"]["control_id"], "SER1");
    assert_eq!(r["device"]["protocol"], "hl7-mllp");
    // By default, as on an [[mllp]] feed, the record carries the demographics.
    let p = &r["patient"];
    assert_eq!(p["names"][0]["family"], "TEST", "{r}");
    assert_eq!(p["birth_date"]["value"], "1980-06-15", "{r}");
    assert_eq!(p["postcode"], "ZZ99 9ZZ", "{r}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_hl7_port_with_demographics_off_leaves_names_birth_date_and_address_out() {
    let (_s, _broker, mut sub, pty, d) = connected(
        "hl7-mllp",
        "demographics = false\nnhs_authorities = [\"NHS\"]",
    )
    .await;
    let (_pty, ack) = hl7_device_send(pty, adt("SER2")).await;
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AA", "SER2"));
    let (_, payload, _) = sub.recv(Duration::from_secs(10)).await.expect("record");
    let r = json(&payload);
    assert_eq!(r["hl7"]["control_id"], "SER2");
    let p = &r["patient"];
    assert_eq!(p["nhs_number"]["value"], "9990000018", "{r}");
    assert_eq!(p["sex"], "F", "identifiers and sex stay: {r}");
    assert!(
        p["identifiers"].as_array().is_some_and(|i| i.len() == 2),
        "{r}"
    );
    for gone in [
        "names",
        "birth_date",
        "birth_time",
        "death",
        "address",
        "postcode",
    ] {
        assert!(p.get(gone).is_none(), "{gone} in {r}");
    }
    let mut clinical = r.clone();
    clinical.as_object_mut().unwrap().remove("raw");
    let clinical = clinical.to_string();
    for personal in ["PATIENT", "1980", "TEST STREET", "TESTTOWN", "ZZ99"] {
        assert!(
            !clinical.contains(personal),
            "{personal} outside raw: {clinical}"
        );
    }
    d.stop().await;
}

async fn lines_case(extra: &str, input: &'static [u8], expect: &[&str]) {
    let (_s, _broker, mut sub, mut pty, d) = connected("lines", extra).await;
    let pty = tokio::task::spawn_blocking(move || {
        for chunk in input.split_inclusive(|&b| b == b'|') {
            let chunk = chunk.strip_suffix(b"|").unwrap_or(chunk);
            pty.write(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(400));
        }
        pty
    })
    .await
    .unwrap();
    let got = sub.collect(expect.len(), Duration::from_secs(10)).await;
    assert!(sub.recv(Duration::from_millis(800)).await.is_none());
    let raws: Vec<String> = got
        .iter()
        .map(|(_, p, _)| {
            let r = json(p);
            assert_eq!(r["format"], "lines");
            r["raw"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(raws, expect);
    drop(pty);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_line_is_a_message_whatever_its_ending() {
    // '|' marks a pause in what the device writes.
    lines_case(
        "",
        b"TEMP 36.6\r\nHR 72\n|SPO2 98\r|",
        &["TEMP 36.6", "HR 72", "SPO2 98"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_close_together_are_grouped_into_one_message() {
    lines_case(
        "group_gap_ms = 200",
        b"TEMP 36.6\r\nHR 72\r\n|SPO2 98\r\n|",
        &["TEMP 36.6\nHR 72\n", "SPO2 98\n"],
    )
    .await;
}

/// A line longer than `max_message_bytes` is stored as far as the limit and flagged: the record
/// says `complete: false` and how many bytes were dropped, and health counts it. The next line
/// is whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_cut_at_max_message_bytes_is_stored_flagged_incomplete_and_counted() {
    let (_s, _broker, mut sub, mut pty, d) =
        connected("lines", "max_message_bytes = \"1 KiB\"").await;
    let long: String = ('A'..='Z').cycle().take(1024 + 300).collect();
    let sent = long.clone();
    let pty = tokio::task::spawn_blocking(move || {
        pty.write(format!("{sent}\r\nHR 72\r\n").as_bytes())
            .unwrap();
        pty
    })
    .await
    .unwrap();
    let got = sub.collect(2, Duration::from_secs(10)).await;
    let cut = json(&got[0].1);
    assert_eq!(cut["raw"].as_str(), Some(&long[..1024]));
    assert_eq!(cut["complete"], false);
    assert_eq!(cut["truncated_bytes"], 300);
    let whole = json(&got[1].1);
    assert_eq!(whole["raw"], "HR 72");
    assert_eq!(whole["complete"], true);
    assert!(whole.get("truncated_bytes").is_none());
    let counters = d.telemetry().feed("chem1");
    assert_eq!(
        counters
            .truncated
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(pty);
    d.stop().await;
}

#[test]
fn permission_problems_name_the_dialout_group() {
    let e = tokio_serial::Error::new(
        tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied),
        "Permission denied",
    );
    let (state, text) =
        siterelay::sources::serial::describe_open_error(Path::new("/dev/ttyUSB0"), &e);
    assert_eq!(state, PortState::Error);
    assert!(text.contains("'dialout' group"), "{text}");
    let e = tokio_serial::Error::new(tokio_serial::ErrorKind::NoDevice, "gone");
    assert_eq!(
        siterelay::sources::serial::describe_open_error(Path::new("/dev/ttyUSB0"), &e).0,
        PortState::Waiting
    );
}

/// A serial-only appliance (no `[[mllp]]` feed) takes its MQTT packet limit from its ports'
/// `max_message_bytes`: a 70 KB line (over the 64 KiB that a limit computed from MLLP feeds alone
/// left such a box) is published. Over MQTT 3.1.1, where rumqttc itself refuses to send a packet
/// over the limit, so a limit too small would stop the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_only_box_publishes_a_70_kb_line() {
    let s = SerialEnv::new();
    let broker = Broker::start(Kind::InProcess, &s.env).await;
    let mut sub = broker
        .subscribe(&s.env, "siterelay/test-box/records/#")
        .await;
    let mut pty = Pty::open().unwrap();
    pty.link_at(&s.link).unwrap();
    let text = s.env.config_text(broker.port, &[], "protocol = \"3.1.1\"")
        + &format!(
            "\n[[serial]]\nname = \"monitor\"\ndevice = \"{}\"\nprotocol = \"lines\"\nreopen_max_secs = 1\n",
            s.link.display()
        );
    let cfg = siterelay::config::parse(Path::new("t.toml"), &text).expect("valid config");
    assert!(cfg.mllp.is_empty());
    let d = Daemon::start(&cfg).await.unwrap();
    wait_state(&d, "monitor", PortState::Connected).await;
    let line = "7".repeat(70_000);
    let sent = line.clone();
    let pty = tokio::task::spawn_blocking(move || {
        pty.write(format!("{sent}\r\n").as_bytes()).unwrap();
        pty
    })
    .await
    .unwrap();
    let (_, payload, _) = sub
        .recv(Duration::from_secs(20))
        .await
        .expect("the 70 KB line arrives");
    assert!(payload.len() > 70_000);
    let r = json(&payload);
    assert_eq!(
        (r["feed"].as_str(), r["format"].as_str()),
        (Some("monitor"), Some("lines"))
    );
    assert_eq!(r["raw"].as_str(), Some(line.as_str()));
    assert_eq!(
        d.telemetry()
            .sink
            .connects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(pty);
    d.stop().await;
}
