//! siterelay: the edge of a regional HL7 information-sharing network.
//!
//! The pipeline is drawn by the modules:
//! - [`sources`]: where bytes arrive (MLLP over TCP/TLS; serial ports later) and become messages;
//! - [`hl7`]: pure HL7 v2 logic (MSH, ACKs, charsets, timestamps);
//! - [`outbox`]: the durable SQLite store every message passes through before it is acknowledged;
//! - [`sink`]: where records leave (mutual-TLS MQTT), each marked delivered only on its PUBACK;
//! - [`record`]: the JSON record contract; [`telemetry`]: counters and named events;
//! - [`health`], [`inventory`]: what the appliance reports about itself (fleet monitoring);
//! - [`config`], [`app`] (wiring), [`client`] (an MLLP client for `siterelay send` and tests).

pub mod app;
pub mod astm;
pub mod client;
pub mod config;
pub mod health;
pub mod hl7;
pub mod inventory;
pub mod outbox;
pub mod record;
pub mod sink;
pub mod sources;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod units;
pub mod watch;
