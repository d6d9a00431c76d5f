//! HL7 v2 over MLLP: [`framing`] is the pure byte-level state machine (in `siterelay-proto`),
//! [`server`] the sockets.

pub use siterelay_proto::mllp as framing;
pub mod server;
