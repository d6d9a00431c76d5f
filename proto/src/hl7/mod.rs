//! HL7 v2 logic siterelay needs, as pure code (no I/O): MSH parsing ([`header`]), ACK building
//! ([`ack`]), charset decoding ([`charset`]), timestamps ([`time`], shared with ASTM) and the
//! receive decision shared by every HL7 source ([`intake`]).
//!
//! [`normalise`] turns a message into the record's clinical sections (patient, visit, event,
//! merge, orders, observations, appointment, document) with three-state fields ([`tri`]) and
//! NHS number checks ([`nhs`]); it reads segments with `fields`, a borrowed field reader that
//! finds repetitions, components and subcomponents without allocating.
//!
//! [`batch`] splits `FHS`/`BHS` batch frames into their messages.
//!
//! Deliberately not here: an HL7 validator (the body is stored and forwarded as received; only
//! the segments a record cannot be read without are required, see [`intake`]), MLLP framing (in
//! [`crate::mllp`]).

pub mod ack;
pub mod batch;
pub mod charset;
mod fields;
pub use fields::segment_ids;
pub mod header;
pub mod intake;
pub mod nhs;
pub mod normalise;
pub use crate::time;
pub mod tri;
