//! Sources: where messages arrive. Each source frames bytes, asks [`crate::hl7::intake`] what to
//! do, commits to the [`crate::outbox`] and only then acknowledges.

pub mod mllp;
pub mod serial;
