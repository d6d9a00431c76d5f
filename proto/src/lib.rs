//! siterelay's protocol logic, as pure code: bytes and text in, decisions, answers and
//! normalised values out. Nothing here opens a socket or a port, sleeps, logs, spawns a task or
//! touches the database; the daemon (the `siterelay` crate) carries out what this code returns.
//! This crate has no tokio, tracing or rusqlite dependency, so that stays true.
//!
//! - [`mllp`]: the MLLP framing state machine (start block, end block, size limit);
//! - [`hl7`]: MSH parsing, the receive decision and ACKs, character sets, batches, and
//!   normalisation into the record's clinical sections;
//! - [`astm`]: the E1381 / LIS1-A link layer (a state machine returning actions) and the E1394
//!   / LIS2-A2 record parser;
//! - [`time`]: HL7 and ASTM timestamps with their precision and zone, and dates of birth.

// Pure protocol code: no unsafe code at all.
#![forbid(unsafe_code)]

pub mod astm;
pub mod hl7;
pub mod mllp;
pub mod time;
