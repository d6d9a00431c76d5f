//! siterelay: the edge of a regional HL7 information-sharing network.
//!
//! The pipeline, in the order a message travels:
//!
//! 1. [`sources`]: bytes arrive (MLLP over TCP/TLS, serial ports) and are framed into complete
//!    messages. Sources own sockets and ports, and write back what the intake answers.
//! 2. [`intake`]: the receive stage. Each complete message is decided (the pure checks in
//!    [`hl7::intake`]), stored as a row in the outbox or quarantined, counted, added to the
//!    inventory, and answered. **A frame becomes a row here**, and its `AA` is built only after
//!    the commit.
//! 3. [`outbox`]: the durable SQLite store (one writer thread, group commit, fsync). A row stays
//!    pending until the broker has confirmed its record.
//! 4. [`record`]: a row becomes the JSON record of the contract (`docs/contract.md`) at publish
//!    time, from the stored bytes ([`hl7::normalise`], [`astm::records`]).
//! 5. [`sink`]: records leave over mutual-TLS MQTT (QoS 1). **A row becomes delivered on the
//!    PUBACK of its publish**, never on `publish()` returning.
//!
//! Beside the pipeline: [`telemetry`] (counters and named events), [`health`] and [`inventory`], [`metrics`] (the health report as Prometheus text)
//! (what the appliance reports about itself), [`shutdown`] (stopping every task at a safe point), [`status`] (the local status socket and the
//! quarantine retry), [`watch`] (the central team's fleet view), [`config`], [`preflight`] (the checks `run` and `check-config` share), [`app`] (wiring),
//! [`client`] (an MLLP client for `siterelay send` and tests), [`enrol`] (the appliance's key, request and certificate), [`manpage`] (the manual pages). Protocol logic ([`hl7`],
//! [`astm`], MLLP framing, time) is the `siterelay-proto` crate in `proto/`, which owns no I/O
//! and cannot: it does not depend on tokio, tracing or rusqlite. See `docs/architecture.md`.

// libc calls and their `unsafe` blocks live in `sys.rs` alone (it allows them).
#![deny(unsafe_code)]

pub mod app;
pub mod client;
pub mod clock;
pub mod config;
pub mod enrol;
pub mod health;
pub mod intake;
pub mod inventory;
pub mod manpage;
pub mod metrics;
pub mod outbox;
pub mod preflight;
pub mod record;
pub mod shutdown;
pub mod sink;
pub mod sources;
pub mod status;
pub mod sys;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod units;
pub mod watch;

// The protocol logic lives in its own crate (proto/, no tokio, tracing or rusqlite); these
// paths keep naming it as part of the pipeline.
pub use siterelay_proto::{astm, hl7};
