//! ASTM lab-analyser protocols, pure logic: the E1381 / CLSI LIS1-A low-level link ([`link`])
//! and E1394 / CLSI LIS2-A2 message records ([`records`]).
//!
//! Nothing here does I/O, keeps time or spawns tasks: the serial-port source feeds bytes and
//! instants into a [`link::Link`], carries out the actions it returns (write, arm a timer, store a
//! delivered message and report the outcome), and turns stored message text into the JSON
//! record's `astm` object with [`records::parse_message`]. Character-set decoding of the
//! delivered bytes into `&str` is the caller's job.

pub mod link;
pub mod records;
