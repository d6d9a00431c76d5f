//! HL7 v2 logic siterelay needs, as pure code (no I/O): MSH parsing ([`header`]), ACK building
//! ([`ack`]), charset decoding ([`charset`]), timestamps ([`time`]) and the receive decision
//! shared by every HL7 source ([`intake`]).
//!
//! Deliberately not here (yet): a full HL7 parser or validator (the body is stored and forwarded
//! as received), batch (FHS/BHS) support, MLLP framing (in `sources::mllp::framing`).

pub mod ack;
pub mod charset;
pub mod header;
pub mod intake;
pub mod time;
