//! HL7 v2 over MLLP: [`framing`] is the pure byte-level state machine, [`server`] the sockets.

pub mod framing;
pub mod server;
