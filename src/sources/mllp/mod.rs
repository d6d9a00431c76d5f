//! HL7 v2 over MLLP: [`framing`] is the pure byte-level state machine (in `siterelay-proto`),
//! [`server`] the sockets; [`allow`] and [`limits`] decide who may connect and how much of the
//! feed one sender may use (pure); [`certs`] is the feed's reloadable TLS.

pub mod allow;
pub mod certs;
pub use siterelay_proto::mllp as framing;
pub mod limits;
pub mod server;
