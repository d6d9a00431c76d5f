//! Bad input on a real MLLP socket: each case gets its defined outcome, and the listener keeps
//! serving everyone else.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use siterelay::app::Daemon;
use siterelay::client::parse_ack;

async fn daemon(env: &Env, extra_feed: &str) -> Daemon {
    let broker = Broker::down(Kind::InProcess, env);
    let text = env.config_text(broker.port, &[], "")
        + &format!("\n[[mllp]]\nname = \"adt\"\nlisten = \"127.0.0.1:0\"\n{extra_feed}\n");
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    Daemon::start(&cfg).await.unwrap()
}

/// After each bad case, a fresh connection still gets `AA`.
async fn still_serving(d: &Daemon, id: &str) {
    let mut c = connect(d.addr("adt").unwrap()).await;
    let ack = c.send(&adt(id), ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_a_start_block_is_discarded_and_counted_and_the_message_is_acked() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    c.write_raw(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let ack = c.send(&adt("G1"), ACK_WAIT).await.unwrap();
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AA", "G1"));
    let t = d.telemetry().feed("adt");
    assert_eq!(t.discarded_bytes.load(Ordering::Relaxed), 18);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_the_size_limit_is_refused_with_ae_and_the_connection_closed() {
    let env = Env::new();
    let d = daemon(&env, "max_message_bytes = 2048").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let mut big = vec![0x0b];
    big.extend(adt("BIG1"));
    big.extend(std::iter::repeat_n(b'X', 4096));
    c.write_raw(&big).await.unwrap();
    let frame = c.read_frame(ACK_WAIT).await.unwrap();
    let ack = parse_ack(&frame).unwrap();
    assert_eq!(ack.code, "AE");
    assert_eq!(ack.control_id, "BIG1");
    assert!(ack.text.contains("2048"), "{}", ack.text);
    assert!(
        c.closed_within(Duration::from_secs(5)).await,
        "connection closed"
    );
    assert_eq!(
        d.telemetry().feed("adt").oversized.load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        d.outbox().gauges().appended.load(Ordering::Relaxed),
        0,
        "nothing stored"
    );
    still_serving(&d, "after-big").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_without_an_end_block_is_never_acked_or_stored() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    {
        let mut c = connect(d.addr("adt").unwrap()).await;
        let mut partial = vec![0x0b];
        partial.extend(adt("P1"));
        c.write_raw(&partial).await.unwrap();
        assert!(
            c.read_frame(Duration::from_millis(500)).await.is_err(),
            "no ACK for a partial frame"
        );
        // Dropping the client closes the socket mid-frame.
    }
    let t = d.telemetry().feed("adt");
    assert!(
        wait_until(Duration::from_secs(5), || t
            .incomplete
            .load(Ordering::Relaxed)
            == 1)
        .await
    );
    assert_eq!(d.outbox().gauges().appended.load(Ordering::Relaxed), 0);
    still_serving(&d, "after-partial").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed_after_the_idle_timeout() {
    let env = Env::new();
    let d = daemon(&env, "idle_timeout_secs = 1").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    assert!(c.closed_within(Duration::from_secs(5)).await);
    still_serving(&d, "after-idle").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_hl7_payload_gets_an_ae_nak_and_is_not_stored() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let ack = c.send(b"hello, this is not HL7", ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AE");
    assert_eq!(ack.control_id, "");
    assert!(ack.raw.starts_with(b"MSH|^~\\&|SITERELAY|test-box|"));
    assert!(
        String::from_utf8_lossy(&ack.raw).contains("\rERR|"),
        "ERR segment present"
    );
    // Same connection keeps working.
    assert_eq!(c.send(&adt("OK1"), ACK_WAIT).await.unwrap().code, "AA");
    assert_eq!(d.outbox().gauges().appended.load(Ordering::Relaxed), 1);
    assert_eq!(d.telemetry().feed("adt").ack_ae.load(Ordering::Relaxed), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_frame_gets_an_ae_nak() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let ack = c.send(b"", ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AE");
    assert_eq!(c.send(&adt("OK2"), ACK_WAIT).await.unwrap().code, "AA");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_missing_its_control_id_gets_ae() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let msg = b"MSH|^~\\&|PAS|RXX|SR|HUB|20261130093000||ADT^A01||P|2.4\rPID|1\r";
    let ack = c.send(msg, ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AE");
    assert!(
        String::from_utf8_lossy(&ack.raw).contains("|101^"),
        "ERR code 101 (required field missing)"
    );
    assert_eq!(d.outbox().gauges().appended.load(Ordering::Relaxed), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mirrors_the_message_header() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let ack = c.send(&adt("MIRROR1"), ACK_WAIT).await.unwrap();
    let text = String::from_utf8(ack.raw.clone()).unwrap();
    let msh: Vec<&str> = text.split('\r').next().unwrap().split('|').collect();
    assert_eq!(
        &msh[2..6],
        ["SITERELAY", "HUB", "PAS", "RXX"],
        "sender and receiver swapped"
    );
    assert_eq!(msh[8], "ACK^A01^ACK");
    assert_ne!(msh[9], "MIRROR1", "fresh control id");
    assert_eq!((msh[10], msh[11]), ("P", "2.4"));
    assert!(text.contains("\rMSA|AA|MIRROR1"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_messages_on_one_connection_are_acked_in_order() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let mut burst = Vec::new();
    for i in 0..20 {
        burst.extend(siterelay::sources::mllp::framing::encode(&adt(&format!(
            "PL{i}"
        ))));
    }
    c.write_raw(&burst).await.unwrap();
    for i in 0..20 {
        let ack = parse_ack(&c.read_frame(ACK_WAIT).await.unwrap()).unwrap();
        assert_eq!(
            (ack.code.as_str(), ack.control_id.clone()),
            ("AA", format!("PL{i}"))
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_under_a_utf8_charset_gets_ae() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let mut msg = b"MSH|^~\\&|PAS|RXX|SR|HUB|20261130093000||ADT^A01|U1|P|2.4|||||||UNICODE UTF-8\rPID|1||||TEST^".to_vec();
    msg.extend([0xff, 0xfe]);
    msg.push(b'\r');
    let ack = c.send(&msg, ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AE");
    assert_eq!(ack.control_id, "U1");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_feed_serves_a_new_connection_by_closing_the_one_idle_longest() {
    let env = Env::new();
    let d = daemon(&env, "max_connections = 1").await;
    let addr = d.addr("adt").unwrap();
    let mut first = connect(addr).await;
    assert_eq!(first.send(&adt("CAP1"), ACK_WAIT).await.unwrap().code, "AA");
    // The only slot is taken and idle: a newcomer is served at once, not left in the backlog.
    let mut second = connect(addr).await;
    let ack = second.send(&adt("CAP2"), ACK_WAIT).await.unwrap();
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AA", "CAP2"));
    assert!(
        first.closed_within(ACK_WAIT).await,
        "the idle connection gave up its slot"
    );
    assert_eq!(d.outbox().gauges().appended.load(Ordering::Relaxed), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_mode_gets_the_commit_ack_msh_15_asks_for() {
    let env = Env::new();
    let d = daemon(&env, "").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let with_msh15 = |id: &str, mode: &str| {
        String::from_utf8(adt(id))
            .unwrap()
            .replacen("|P|2.4\r", &format!("|P|2.4|||{mode}|NE\r"), 1)
            .into_bytes()
    };
    let ack = c.send(&with_msh15("E1", "AL"), ACK_WAIT).await.unwrap();
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("CA", "E1"));
    // NE: stored, but nothing comes back; the next message is answered normally.
    c.write_raw(&siterelay::sources::mllp::framing::encode(&with_msh15(
        "E2", "NE",
    )))
    .await
    .unwrap();
    let ack = c.send(&with_msh15("E3", "SU"), ACK_WAIT).await.unwrap();
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("CA", "E3"));
    let stats = d.outbox().reader().unwrap().stats().unwrap();
    assert_eq!(stats[0].pending, 3, "all three committed");
    // Original mode when MSH-15 is empty.
    assert_eq!(c.send(&adt("E4"), ACK_WAIT).await.unwrap().code, "AA");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_policy_refuses_or_ignores_what_it_does_not_accept() {
    let env = Env::new();
    let d = daemon(
        &env,
        "accept = [\"ADT^A01\", \"ORU^*\"]\nprocessing_ids = [\"P\"]",
    )
    .await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    let retype = |from: &str, to: &str| {
        String::from_utf8(adt("P1"))
            .unwrap()
            .replace(from, to)
            .into_bytes()
    };
    let ack = c
        .send(&retype("ADT^A01^ADT_A01", "ADT^A08"), ACK_WAIT)
        .await
        .unwrap();
    assert_eq!(ack.code, "AR");
    assert!(
        String::from_utf8_lossy(&ack.raw).contains("|201^"),
        "ERR 201 for an unaccepted event"
    );
    let ack = c
        .send(&retype("ADT^A01^ADT_A01", "SIU^S12"), ACK_WAIT)
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ack.raw).contains("|200^"),
        "ERR 200 for an unaccepted type"
    );
    let ack = c.send(&retype("|P|2.4", "|T|2.4"), ACK_WAIT).await.unwrap();
    assert!(
        String::from_utf8_lossy(&ack.raw).contains("|202^"),
        "ERR 202 for a processing id"
    );
    assert_eq!(c.send(&adt("OK1"), ACK_WAIT).await.unwrap().code, "AA");
    assert_eq!(
        d.outbox().gauges().appended.load(Ordering::Relaxed),
        1,
        "only the accepted one stored"
    );
    d.stop().await;

    let env = Env::new();
    let d = daemon(&env, "accept = [\"ORU^R01\"]\nunaccepted = \"ignore\"").await;
    let mut c = connect(d.addr("adt").unwrap()).await;
    assert_eq!(c.send(&adt("IGN1"), ACK_WAIT).await.unwrap().code, "AA");
    assert_eq!(
        d.outbox().gauges().appended.load(Ordering::Relaxed),
        0,
        "acknowledged, not stored"
    );
    assert_eq!(d.telemetry().feed("adt").ignored.load(Ordering::Relaxed), 1);
    d.stop().await;
}
