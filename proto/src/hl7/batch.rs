//! HL7 v2 batch protocol: splitting an `FHS`/`BHS` ... `BTS`/`FTS` frame into its messages, and the
//! shape of the one acknowledgement a batch gets.
//!
//! A batch frame is `[FHS] { [BHS] { MSH ... } [BTS] } [FTS]`. [`split`] finds every message
//! (byte ranges into the frame, so each is stored exactly as received, segment separators
//! included), every batch, and the envelope fields an acknowledgement mirrors. The caller then
//! treats each message like a single message (assess, store, answer) and builds the batch
//! acknowledgement with [`crate::hl7::ack::build_batch_ack`]: an acknowledgement batch that lists
//! only the messages that were *not* accepted; an empty acknowledgement batch means every message
//! was accepted (HL7 v2.5 section 2.10.3).
//!
//! Tolerated, reported in [`Batch::notes`] (for logs; they never carry content): a missing `BTS` or
//! `FTS`, and a `BTS-1`/`FTS-1` count that does not match what the frame holds. The messages are
//! still handled: a frame ends at its MLLP end block, so nothing can be missing but the trailer.
//! Refused as a whole ([`BatchError`]): unusable delimiters in `FHS`/`BHS`, an `FHS` that is not
//! first, and segments that belong to no message (between `BHS` and the first `MSH`).
//!
//! Deliberately NOT done here: no I/O, no checks of `BTS-3` batch totals (site-defined), no
//! nested files, no decoding of envelope text (fields are kept as the bytes sent).

use std::ops::Range;

use crate::hl7::header::{Delimiters, HeaderError};

/// The header of a file (`FHS`) or batch (`BHS`): the fields an acknowledgement mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Delimiters from field 1 and 2.
    pub delimiters: Delimiters,
    /// Field 3, sending application, as sent.
    pub sending_application: Vec<u8>,
    /// Field 4, sending facility, as sent.
    pub sending_facility: Vec<u8>,
    /// Field 5, receiving application, as sent.
    pub receiving_application: Vec<u8>,
    /// Field 6, receiving facility, as sent.
    pub receiving_facility: Vec<u8>,
    /// Field 11, the batch or file control id, as sent.
    pub control_id: Vec<u8>,
}

/// One batch: its header and its messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchGroup {
    /// The `BHS`, when the batch had one (an `FHS` may hold messages directly).
    pub header: Option<Envelope>,
    /// Each message's bytes in the frame, in order.
    pub messages: Vec<Range<usize>>,
}

/// A batch frame, split.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// The `FHS`, when the frame had one.
    pub file: Option<Envelope>,
    /// The batches, in order (at least one).
    pub groups: Vec<BatchGroup>,
    /// Tolerated irregularities (fixed texts, never content).
    pub notes: Vec<&'static str>,
}

impl Batch {
    /// How many messages the frame holds.
    pub fn message_count(&self) -> usize {
        self.groups.iter().map(|g| g.messages.len()).sum()
    }
}

/// Why a batch frame cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// `FHS` or `BHS` delimiters unusable.
    #[error("{segment} delimiters are invalid: {reason}")]
    BadDelimiters {
        /// `FHS` or `BHS`.
        segment: &'static str,
        /// Fixed description.
        reason: &'static str,
    },
    /// `FHS` somewhere other than first.
    #[error("FHS is only allowed as the first segment of a batch file")]
    MisplacedFileHeader,
    /// A segment that is not part of any message.
    #[error("segment {position} is outside any message (batches hold MSH-headed messages only)")]
    StraySegment {
        /// 1-based segment position in the frame.
        position: usize,
    },
}

impl BatchError {
    /// HL7 table 0357 code and location for the ERR segment.
    pub fn ack_error(&self) -> crate::hl7::ack::AckError {
        let (code, location) = match self {
            BatchError::BadDelimiters { segment, .. } => (102, Some((*segment, 2))),
            BatchError::MisplacedFileHeader => (100, Some(("FHS", 0))),
            BatchError::StraySegment { .. } => (100, None),
        };
        crate::hl7::ack::AckError::new(code, location, self.to_string())
    }
}

/// True when `frame` is a batch: its first segment (after a BOM and blank space) is `FHS` or `BHS`.
pub fn is_batch(frame: &[u8]) -> bool {
    let body = skip_noise(frame);
    body.starts_with(b"FHS") || body.starts_with(b"BHS")
}

fn skip_noise(frame: &[u8]) -> &[u8] {
    let mut s = frame.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(frame);
    while let Some((b' ' | b'\t' | b'\r' | b'\n', rest)) = s.split_first() {
        s = rest;
    }
    s
}

/// Segments of `frame`: (start, end) byte offsets of each non-blank line, CR, LF or CRLF
/// separated; `end` excludes the separator.
fn lines(frame: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        loop {
            if pos >= frame.len() {
                return None;
            }
            let start = pos;
            let end =
                memchr::memchr2(b'\r', b'\n', &frame[start..]).map_or(frame.len(), |i| start + i);
            pos = end + 1;
            let line = &frame[start..end];
            if !line
                .iter()
                .all(|b| matches!(b, b' ' | b'\t' | 0xEF | 0xBB | 0xBF))
            {
                return Some((start, end));
            }
        }
    })
}

/// Splits a batch frame (see the module doc).
pub fn split(frame: &[u8]) -> Result<Batch, BatchError> {
    let mut batch = Batch::default();
    // The open message's start, and whether a batch is open (not yet closed by BTS).
    let mut open_msg: Option<usize> = None;
    let mut group_open = false;
    let mut fts_count: Option<Option<u64>> = None;
    let mut batches_seen = 0u64;

    fn close_msg(batch: &mut Batch, open_msg: &mut Option<usize>, end: usize) {
        if let Some(start) = open_msg.take() {
            batch
                .groups
                .last_mut()
                .expect("a message is always inside a group")
                .messages
                .push(start..end);
        }
    }

    for (position, (start, end)) in lines(frame).enumerate() {
        let seg = &frame[start..end];
        // Offsets into the frame skip a leading BOM on the first line.
        let (start, seg) = match seg.strip_prefix(b"\xEF\xBB\xBF") {
            Some(rest) => (start + 3, rest),
            None => (start, seg),
        };
        let id = seg.get(..3).unwrap_or(seg);
        match id {
            b"FHS" => {
                if position != 0 {
                    return Err(BatchError::MisplacedFileHeader);
                }
                batch.file = Some(envelope(seg, "FHS")?);
            }
            b"BHS" => {
                close_msg(&mut batch, &mut open_msg, start);
                if group_open && batch.groups.last().is_some_and(|g| g.header.is_some()) {
                    batch.notes.push("a batch has no BTS trailer");
                }
                batch.groups.push(BatchGroup {
                    header: Some(envelope(seg, "BHS")?),
                    messages: Vec::new(),
                });
                group_open = true;
                batches_seen += 1;
            }
            b"MSH" => {
                close_msg(&mut batch, &mut open_msg, start);
                if !group_open {
                    // Messages straight inside FHS (or after a BTS): an implicit batch.
                    batch.groups.push(BatchGroup::default());
                    group_open = true;
                    batches_seen += 1;
                }
                open_msg = Some(start);
            }
            b"BTS" => {
                close_msg(&mut batch, &mut open_msg, start);
                if !group_open {
                    batch.groups.push(BatchGroup::default());
                    batches_seen += 1;
                }
                let count = field_number(seg, 1, batch_field_sep(&batch));
                let held = batch.groups.last().map_or(0, |g| g.messages.len() as u64);
                if count.is_some_and(|c| c != held) {
                    batch.notes.push("BTS-1 message count does not match");
                }
                group_open = false;
            }
            b"FTS" => {
                close_msg(&mut batch, &mut open_msg, start);
                if group_open && batch.groups.last().is_some_and(|g| g.header.is_some()) {
                    batch.notes.push("a batch has no BTS trailer");
                }
                group_open = false;
                fts_count = Some(field_number(seg, 1, batch_field_sep(&batch)));
            }
            _ if open_msg.is_some() => {}
            _ => {
                return Err(BatchError::StraySegment {
                    position: position + 1,
                });
            }
        }
    }
    close_msg(&mut batch, &mut open_msg, frame.len());
    if group_open && batch.groups.last().is_some_and(|g| g.header.is_some()) {
        batch.notes.push("a batch has no BTS trailer");
    }
    if batch.file.is_some() {
        match fts_count {
            None => batch.notes.push("the file has no FTS trailer"),
            Some(Some(n)) if n != batches_seen => {
                batch.notes.push("FTS-1 batch count does not match")
            }
            Some(_) => {}
        }
    }
    if batch.groups.is_empty() {
        // An empty file or batch (sent to meet a schedule): one empty batch to acknowledge.
        batch.groups.push(BatchGroup::default());
    }
    Ok(batch)
}

/// The field separator of the frame's envelope (for reading trailers).
fn batch_field_sep(batch: &Batch) -> u8 {
    batch
        .groups
        .iter()
        .rev()
        .find_map(|g| g.header.as_ref())
        .or(batch.file.as_ref())
        .map_or(b'|', |e| e.delimiters.field)
}

/// Field `n` (1-based, after the segment id) of a trailer, as a count.
fn field_number(seg: &[u8], n: usize, sep: u8) -> Option<u64> {
    let field = seg.split(|&b| b == sep).nth(n)?;
    let text = std::str::from_utf8(field).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    text.parse().ok()
}

fn envelope(seg: &[u8], which: &'static str) -> Result<Envelope, BatchError> {
    let (d, mut pos) = Delimiters::from_header_segment(seg).map_err(|e| match e {
        HeaderError::BadDelimiters { reason, .. } => BatchError::BadDelimiters {
            segment: which,
            reason,
        },
        _ => BatchError::BadDelimiters {
            segment: which,
            reason: "unreadable",
        },
    })?;
    let mut fields: [&[u8]; 12] = [&[]; 12];
    let mut n = 3;
    while pos < seg.len() && n < fields.len() {
        let start = pos + 1;
        let end = memchr::memchr(d.field, &seg[start..]).map_or(seg.len(), |i| start + i);
        fields[n] = &seg[start..end];
        n += 1;
        pos = end;
    }
    Ok(Envelope {
        delimiters: d,
        sending_application: fields[3].to_vec(),
        sending_facility: fields[4].to_vec(),
        receiving_application: fields[5].to_vec(),
        receiving_facility: fields[6].to_vec(),
        control_id: fields[11].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG1: &str =
        "MSH|^~\\&|LAB|RXX|HUB|HUB|20260601120000||ORU^R01|L1|P|2.4\rPID|||123\rOBR|1\r";
    const MSG2: &str =
        "MSH|^~\\&|LAB|RXX|HUB|HUB|20260601120001||ORU^R01|L2|P|2.4\rPID|||456\rOBR|1\r";

    fn msgs<'a>(frame: &'a [u8], b: &Batch) -> Vec<&'a str> {
        b.groups
            .iter()
            .flat_map(|g| g.messages.iter())
            .map(|r| std::str::from_utf8(&frame[r.clone()]).unwrap())
            .collect()
    }

    #[test]
    fn full_file_splits_into_messages_exactly_as_sent() {
        let frame = format!(
            "FHS|^~\\&|LAB|RXX|HUB|HUB|20260601120000||||F77\rBHS|^~\\&|LAB|RXX|HUB|HUB|20260601120000||||B12\r{MSG1}{MSG2}BTS|2\rFTS|1\r"
        );
        let b = split(frame.as_bytes()).unwrap();
        assert_eq!(msgs(frame.as_bytes(), &b), vec![MSG1, MSG2]);
        assert_eq!(b.file.as_ref().unwrap().control_id, b"F77");
        let bhs = b.groups[0].header.as_ref().unwrap();
        assert_eq!(bhs.control_id, b"B12");
        assert_eq!(bhs.sending_application, b"LAB");
        assert_eq!(bhs.receiving_facility, b"HUB");
        assert!(b.notes.is_empty(), "{:?}", b.notes);
        assert_eq!(b.message_count(), 2);
    }

    #[test]
    fn batch_without_file_header_and_lf_separators() {
        let m1 = MSG1.replace('\r', "\n");
        let frame = format!("BHS|^~\\&|LAB|RXX\n{m1}BTS|1\n");
        let b = split(frame.as_bytes()).unwrap();
        assert!(b.file.is_none());
        assert_eq!(msgs(frame.as_bytes(), &b), vec![m1.as_str()]);
        assert!(b.notes.is_empty(), "{:?}", b.notes);
    }

    #[test]
    fn several_batches_in_one_file() {
        let frame = format!(
            "FHS|^~\\&\rBHS|^~\\&|||||||||A\r{MSG1}BTS|1\rBHS|^~\\&|||||||||B\r{MSG2}BTS|1\rFTS|2\r"
        );
        let b = split(frame.as_bytes()).unwrap();
        assert_eq!(b.groups.len(), 2);
        assert_eq!(b.groups[0].header.as_ref().unwrap().control_id, b"A");
        assert_eq!(b.groups[1].header.as_ref().unwrap().control_id, b"B");
        assert_eq!(msgs(frame.as_bytes(), &b), vec![MSG1, MSG2]);
        assert!(b.notes.is_empty(), "{:?}", b.notes);
    }

    #[test]
    fn empty_batch_is_one_empty_group() {
        let b = split(b"BHS|^~\\&|LAB\rBTS|0\r").unwrap();
        assert_eq!(b.groups.len(), 1);
        assert_eq!(b.message_count(), 0);
        assert!(b.notes.is_empty(), "{:?}", b.notes);
    }

    #[test]
    fn wrong_counts_and_missing_trailers_are_noted_not_fatal() {
        let frame = format!("FHS|^~\\&\rBHS|^~\\&\r{MSG1}{MSG2}BTS|3\rFTS|4\r");
        let b = split(frame.as_bytes()).unwrap();
        assert_eq!(b.message_count(), 2);
        assert_eq!(
            b.notes,
            vec![
                "BTS-1 message count does not match",
                "FTS-1 batch count does not match"
            ]
        );
        let frame = format!("FHS|^~\\&\rBHS|^~\\&\r{MSG1}");
        let b = split(frame.as_bytes()).unwrap();
        assert_eq!(msgs(frame.as_bytes(), &b), vec![MSG1]);
        assert_eq!(
            b.notes,
            vec!["a batch has no BTS trailer", "the file has no FTS trailer"]
        );
    }

    #[test]
    fn unusable_batches_are_refused_with_a_reason() {
        assert_eq!(
            split(b"BHS|^~\rBTS|0\r").unwrap_err(),
            BatchError::BadDelimiters {
                segment: "BHS",
                reason: "encoding characters must be 4 or 5 characters"
            }
        );
        assert_eq!(
            split(format!("BHS|^~\\&\rPID|||1\r{MSG1}").as_bytes()).unwrap_err(),
            BatchError::StraySegment { position: 2 }
        );
        assert_eq!(
            split(format!("BHS|^~\\&\r{MSG1}FHS|^~\\&\r").as_bytes()).unwrap_err(),
            BatchError::MisplacedFileHeader
        );
        assert!(is_batch(b"\xEF\xBB\xBF\r\nFHS|^~\\&"));
        assert!(!is_batch(MSG1.as_bytes()));
    }

    #[test]
    fn never_panics_on_mutations() {
        let frame = format!("FHS|^~\\&\rBHS|^~\\&\r{MSG1}{MSG2}BTS|2\rFTS|1\r").into_bytes();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..5_000 {
            let mut f = frame.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % f.len();
                match seed % 3 {
                    0 => f[i] = (seed >> 32) as u8,
                    1 => {
                        f.remove(i);
                    }
                    _ => f.insert(i, b"\r|^\\~&MSHBTS"[(seed >> 40) as usize % 12]),
                }
                if f.is_empty() {
                    break;
                }
            }
            if let Ok(b) = split(&f) {
                for r in b.groups.iter().flat_map(|g| g.messages.iter()) {
                    assert!(r.start <= r.end && r.end <= f.len());
                }
            }
        }
    }
}
