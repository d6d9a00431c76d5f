//! The test proxy does what fault tests rely on: passes bytes, refuses when closed, cuts open
//! connections, swallows bytes when blackholed.

use std::time::Duration;

use siterelay_testkit::proxy::{Mode, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on a free port.
async fn echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
    s.write_all(msg).await.ok()?;
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Some(buf),
        _ => None,
    }
}

#[tokio::test]
async fn bytes_pass_refusal_cut_and_blackhole_behave_like_the_network_faults_they_stand_for() {
    let p = Proxy::start(echo().await, Mode::Pass).await;
    let mut c = TcpStream::connect(("127.0.0.1", p.port())).await.unwrap();
    assert_eq!(
        round_trip(&mut c, b"hello").await.as_deref(),
        Some(&b"hello"[..])
    );

    // Closed: the open connection is cut and new ones are refused.
    p.set(Mode::Closed).await;
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("the cut is seen");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(TcpStream::connect(("127.0.0.1", p.port())).await.is_err());

    // Open again on the same port.
    p.set(Mode::Pass).await;
    let mut c = TcpStream::connect(("127.0.0.1", p.port())).await.unwrap();
    assert_eq!(
        round_trip(&mut c, b"again").await.as_deref(),
        Some(&b"again"[..])
    );

    // reset_all cuts without closing.
    p.reset_all();
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("the reset is seen");
    assert!(matches!(n, Ok(0) | Err(_)));

    // Blackhole: accepted, never answered.
    p.set(Mode::Blackhole).await;
    let mut c = TcpStream::connect(("127.0.0.1", p.port())).await.unwrap();
    assert_eq!(round_trip(&mut c, b"lost").await, None);
}
