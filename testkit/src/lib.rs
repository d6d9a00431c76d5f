//! Test and example support for siterelay.
//!
//! - [`pki`]: a throwaway CA with server and client certificates as PEM files.
//! - [`broker`]: [`TestBroker`], an in-process MQTT v3.1.1/v5 broker over mutual TLS with
//!   fault injection.
//! - [`subscriber`]: [`Subscriber`], a reconnecting MQTT v5 subscriber that collects messages.
//! - [`mosquitto`]: [`Mosquitto`], a launcher for a real Mosquitto with the same PKI.
//! - [`pty`]: real pseudo-terminals for serial-port tests.
//! - [`proxy`]: a TCP proxy a test controls between siterelay and a broker (refuse, cut,
//!   swallow, throttle).
//! - [`tmpfs`]: [`Tmpfs`], a small tmpfs to fill up (disk-full tests; needs root).
//! - [`tls`], [`client`]: rustls configs (always the `ring` provider) and rumqttc options.
//! - [`bench`]: the daemon binary, `/proc` figures and configuration the examples share.
//!
//! Typical use in a `#[tokio::test]`:
//!
//! ```text
//! let (_dir, pki) = Pki::generate_in_tempdir("t")?;
//! let broker = TestBroker::start(BrokerOptions::from_pki(&pki)).await?;
//! let mut sub = Subscriber::connect(broker.port(), &pki, None, "siterelay/#").await?;
//! // ... point siterelay at localhost:broker.port() with pki.ca_file(),
//! //     pki.client_cert_file(), pki.client_key_file() ...
//! let (topic, payload, retain) = sub.recv(Duration::from_secs(5)).await.unwrap();
//! broker.set_fault(Fault::NeverPuback);
//! ```

// libc calls and their `unsafe` blocks live in `sys.rs` alone (it allows them).
#![deny(unsafe_code)]

pub mod bench;
pub mod broker;
pub mod client;
pub mod mosquitto;
pub mod pki;
pub mod proxy;
pub mod pty;
pub mod subscriber;
pub mod sys;
pub mod tls;
pub mod tmpfs;

pub use broker::{BrokerOptions, Fault, Refusal, TestBroker};
pub use mosquitto::{Mosquitto, mosquitto_available, mosquitto_or_skip};
pub use pki::{Pki, PkiOptions};
pub use subscriber::{Received, Subscriber};
pub use tmpfs::Tmpfs;

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}
