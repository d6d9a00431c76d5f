//! MLLP framing as a pure, incremental state machine.
//!
//! A frame is `0x0B <message bytes> 0x1C 0x0D`. Bytes are fed in with
//! [`Framer::push`] as they arrive and [`Framer::next_event`] hands out
//! [`FrameEvent`]s one at a time until more input is needed; [`Framer::finish`]
//! reports what is left at end of stream. [`encode`] wraps a message in a frame.
//!
//! Deliberately NOT done here: no I/O, no timers, no async, no knowledge of
//! HL7 (the bytes between the block characters are returned untouched, never
//! parsed, decoded or validated), no ACKs. The size limit applies to the
//! message content only; once it is exceeded the framer stops for good and
//! the caller must close the connection.

use memchr::{memchr, memchr2};

/// MLLP start block character (VT).
pub const START_BLOCK: u8 = 0x0B;
/// MLLP end block character (FS).
pub const END_BLOCK: u8 = 0x1C;
/// Carriage return that normally follows the end block.
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Longest prefix of an oversized frame that is kept in [`FrameEvent::TooLarge`].
pub const TOO_LARGE_HEAD_BYTES: usize = 4096;

/// Above this capacity an emptied buffer is shrunk back, so one huge message
/// does not pin memory for the life of a connection.
const SHRINK_ABOVE: usize = 1 << 20;
const SHRINK_TO: usize = 64 << 10;

/// Something the framer found in the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEvent {
    /// A complete frame: exactly the bytes between `0x0B` and `0x1C`.
    Message(Vec<u8>),
    /// Bytes seen outside any frame, counted per contiguous run; reported when
    /// the next start block arrives or at [`Framer::finish`].
    Discarded {
        /// Number of bytes dropped.
        bytes: usize,
    },
    /// The frame content grew beyond `max_message_bytes`. The framer is now
    /// poisoned: every later call returns `None` and the caller should close
    /// the connection (after answering, using `head` to read the MSH).
    TooLarge {
        /// The first `min(seen, 4096)` bytes of the frame content.
        head: Vec<u8>,
        /// Content bytes received for this frame when the limit was detected
        /// (always more than the limit; depends on how input was chunked).
        seen: usize,
    },
    /// An unfinished frame was dropped: a new `0x0B` arrived inside it, or the
    /// stream ended ([`Framer::finish`]) before its end block.
    Abandoned {
        /// Content bytes of the dropped frame (start block not counted).
        bytes: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames; `discarded` bytes of garbage counted so far in this run.
    Outside { discarded: usize },
    /// Inside a frame whose content starts at `Framer::pos`; the first
    /// `scanned` content bytes are known to hold no block character.
    InFrame { scanned: usize },
    /// Just after an end block: a directly following CR is swallowed.
    AfterEnd,
    /// A frame exceeded the limit; nothing more is produced.
    Poisoned,
}

/// Incremental MLLP deframer; see the module docs.
#[derive(Debug)]
pub struct Framer {
    max_message_bytes: usize,
    /// Received bytes; everything before `pos` is consumed.
    buf: Vec<u8>,
    pos: usize,
    state: State,
}

impl Framer {
    /// Creates a framer that accepts messages of at most `max_message_bytes`
    /// content bytes (block characters not counted).
    pub fn new(max_message_bytes: usize) -> Self {
        Framer {
            max_message_bytes,
            buf: Vec::new(),
            pos: 0,
            state: State::Outside { discarded: 0 },
        }
    }

    /// Appends received bytes; call [`Framer::next_event`] until it returns
    /// `None` afterwards. Ignored once the framer is poisoned.
    pub fn push(&mut self, data: &[u8]) {
        if self.state == State::Poisoned || data.is_empty() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Returns the next event, or `None` when more bytes are needed (or the
    /// framer is poisoned).
    pub fn next_event(&mut self) -> Option<FrameEvent> {
        loop {
            match self.state {
                State::Poisoned => return None,
                State::AfterEnd => match self.buf.get(self.pos) {
                    None => return None,
                    Some(&b) => {
                        if b == CARRIAGE_RETURN {
                            self.pos += 1;
                        }
                        self.state = State::Outside { discarded: 0 };
                    }
                },
                State::Outside { discarded } => {
                    let avail = &self.buf[self.pos..];
                    match memchr(START_BLOCK, avail) {
                        None => {
                            // Garbage is counted, never kept.
                            self.state = State::Outside {
                                discarded: discarded + avail.len(),
                            };
                            self.pos = self.buf.len();
                            return None;
                        }
                        Some(i) => {
                            self.pos += i + 1;
                            self.state = State::InFrame { scanned: 0 };
                            let total = discarded + i;
                            if total > 0 {
                                return Some(FrameEvent::Discarded { bytes: total });
                            }
                        }
                    }
                }
                State::InFrame { scanned } => {
                    let content = &self.buf[self.pos..];
                    let Some(i) = memchr2(END_BLOCK, START_BLOCK, &content[scanned..]) else {
                        if content.len() > self.max_message_bytes {
                            return Some(self.poison(content.len()));
                        }
                        // Remember how far we looked so the next push does not rescan.
                        self.state = State::InFrame {
                            scanned: content.len(),
                        };
                        return None;
                    };
                    let len = scanned + i;
                    if len > self.max_message_bytes {
                        return Some(self.poison(len));
                    }
                    let block = content[len];
                    if block == START_BLOCK {
                        self.pos += len + 1;
                        self.state = State::InFrame { scanned: 0 };
                        return Some(FrameEvent::Abandoned { bytes: len });
                    }
                    let message = content[..len].to_vec();
                    self.pos += len + 1;
                    self.state = State::AfterEnd;
                    return Some(FrameEvent::Message(message));
                }
            }
        }
    }

    /// End of stream. First returns any event still pending (as
    /// [`Framer::next_event`] would), then `Abandoned` for an unfinished frame
    /// or `Discarded` for trailing garbage, then `None`; call it until it
    /// returns `None`. Afterwards the framer is empty and idle.
    pub fn finish(&mut self) -> Option<FrameEvent> {
        if let Some(event) = self.next_event() {
            return Some(event);
        }
        let event = match self.state {
            State::Poisoned => return None,
            State::InFrame { .. } => Some(FrameEvent::Abandoned {
                bytes: self.buf.len() - self.pos,
            }),
            State::Outside { discarded } if discarded > 0 => {
                Some(FrameEvent::Discarded { bytes: discarded })
            }
            State::Outside { .. } | State::AfterEnd => None,
        };
        self.reset_buffer();
        self.state = State::Outside { discarded: 0 };
        event
    }

    /// Bytes held in the buffer and not yet consumed (discarded garbage is
    /// counted, not buffered, so it does not show here).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True inside an unfinished frame (a start block was seen, no end block
    /// yet): an idle timeout now means an incomplete frame.
    pub fn in_frame(&self) -> bool {
        matches!(self.state, State::InFrame { .. })
    }

    fn poison(&mut self, seen: usize) -> FrameEvent {
        let keep = seen.min(TOO_LARGE_HEAD_BYTES);
        let head = self.buf[self.pos..self.pos + keep].to_vec();
        self.state = State::Poisoned;
        self.buf = Vec::new();
        self.pos = 0;
        FrameEvent::TooLarge { head, seen }
    }

    /// Drops consumed bytes. Called once per push, so every byte is moved at
    /// most once while it waits for its frame to complete.
    fn compact(&mut self) {
        if self.pos == 0 {
            return;
        }
        if self.pos == self.buf.len() {
            self.reset_buffer();
        } else {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    fn reset_buffer(&mut self) {
        self.buf.clear();
        self.pos = 0;
        if self.buf.capacity() > SHRINK_ABOVE {
            self.buf.shrink_to(SHRINK_TO);
        }
    }
}

/// Wraps `message` in an MLLP frame: `0x0B message 0x1C 0x0D`.
pub fn encode(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(message);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

#[cfg(test)]
mod tests {
    use super::FrameEvent::{Abandoned, Discarded, Message, TooLarge};
    use super::*;

    const MAX: usize = 128;

    /// Pushes every chunk, drains events after each push, then drains finish().
    fn run(max: usize, chunks: &[&[u8]]) -> Vec<FrameEvent> {
        let mut framer = Framer::new(max);
        let mut events = Vec::new();
        for chunk in chunks {
            framer.push(chunk);
            while let Some(event) = framer.next_event() {
                events.push(event);
            }
        }
        while let Some(event) = framer.finish() {
            events.push(event);
        }
        events
    }

    fn run_whole(max: usize, input: &[u8]) -> Vec<FrameEvent> {
        run(max, &[input])
    }

    fn run_bytewise(max: usize, input: &[u8]) -> Vec<FrameEvent> {
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        run(max, &chunks)
    }

    fn msg(bytes: &[u8]) -> FrameEvent {
        Message(bytes.to_vec())
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    struct Case {
        name: &'static str,
        input: Vec<u8>,
        expected: Vec<FrameEvent>,
    }

    fn cases() -> Vec<Case> {
        let adt: &[u8] =
            b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.4\rPID|||9990000018||TEST^PATIENT\r";
        vec![
            Case {
                name: "empty frame yields an empty message",
                input: b"\x0b\x1c\x0d".to_vec(),
                expected: vec![msg(b"")],
            },
            Case {
                name: "typical frame yields its content exactly",
                input: encode(adt),
                expected: vec![msg(adt)],
            },
            Case {
                name: "embedded carriage returns are content",
                input: b"\x0bMSH|x\rPID|y\r\rZ\x1c\x0d".to_vec(),
                expected: vec![msg(b"MSH|x\rPID|y\r\rZ")],
            },
            Case {
                name: "garbage before the start block is discarded and counted",
                input: b"junk\r\n\x0bMSH\x1c\x0d".to_vec(),
                expected: vec![Discarded { bytes: 6 }, msg(b"MSH")],
            },
            Case {
                name: "missing start block discards everything at finish",
                input: b"MSH|^~\\&|no start\x1c\x0d".to_vec(),
                expected: vec![Discarded { bytes: 19 }],
            },
            Case {
                name: "missing end block abandons the frame at finish",
                input: b"\x0bMSH|partial".to_vec(),
                expected: vec![Abandoned { bytes: 11 }],
            },
            Case {
                name: "missing trailing carriage return still completes the frame",
                input: b"\x0bMSH|a\x1c".to_vec(),
                expected: vec![msg(b"MSH|a")],
            },
            Case {
                name: "missing trailing carriage return between frames is fine",
                input: b"\x0bA\x1c\x0bB\x1c\x0d".to_vec(),
                expected: vec![msg(b"A"), msg(b"B")],
            },
            Case {
                name: "start block inside a frame abandons it and starts a new frame",
                input: b"\x0bfirst\x0bsecond\x1c\x0d".to_vec(),
                expected: vec![Abandoned { bytes: 5 }, msg(b"second")],
            },
            Case {
                name: "several messages in one push come out in order",
                input: cat(&[&encode(b"one"), &encode(b""), &encode(b"three")]),
                expected: vec![msg(b"one"), msg(b""), msg(b"three")],
            },
            Case {
                name: "byte after end block other than cr is discarded",
                input: b"\x0bA\x1c\n\x0bB\x1c\x0d".to_vec(),
                expected: vec![msg(b"A"), Discarded { bytes: 1 }, msg(b"B")],
            },
            Case {
                name: "only one cr after the end block is swallowed",
                input: b"\x0bA\x1c\x0d\x0d\x0bB\x1c\x0d".to_vec(),
                expected: vec![msg(b"A"), Discarded { bytes: 1 }, msg(b"B")],
            },
            Case {
                name: "trailing garbage is discarded at finish",
                input: b"\x0bA\x1c\x0dxyz".to_vec(),
                expected: vec![msg(b"A"), Discarded { bytes: 3 }],
            },
            Case {
                name: "stray end block outside a frame is garbage",
                input: b"\x1c\x0d\x0bA\x1c\x0d".to_vec(),
                expected: vec![Discarded { bytes: 2 }, msg(b"A")],
            },
            Case {
                name: "message of exactly the maximum size is accepted",
                input: encode(&[b'x'; MAX]),
                expected: vec![msg(&[b'x'; MAX])],
            },
            Case {
                name: "empty input yields nothing",
                input: Vec::new(),
                expected: vec![],
            },
        ]
    }

    #[test]
    fn frame_cases_fed_in_one_push_yield_expected_events() {
        for case in cases() {
            assert_eq!(run_whole(MAX, &case.input), case.expected, "{}", case.name);
        }
    }

    #[test]
    fn frame_split_across_every_byte_yields_same_events() {
        for case in cases() {
            assert_eq!(
                run_bytewise(MAX, &case.input),
                case.expected,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn frame_split_at_every_position_yields_same_events() {
        for case in cases() {
            for cut in 0..=case.input.len() {
                let (a, b) = case.input.split_at(cut);
                assert_eq!(
                    run(MAX, &[a, b]),
                    case.expected,
                    "{} cut at {cut}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn message_one_byte_over_maximum_is_too_large_and_poisons() {
        let content = vec![b'x'; MAX + 1];
        for (how, events) in [
            (
                "whole",
                run_whole(MAX, &cat(&[&encode(&content), &encode(b"next")])),
            ),
            (
                "bytewise",
                run_bytewise(MAX, &cat(&[&encode(&content), &encode(b"next")])),
            ),
        ] {
            assert_eq!(
                events,
                vec![TooLarge {
                    head: content.clone(),
                    seen: MAX + 1
                }],
                "{how}"
            );
        }
    }

    #[test]
    fn too_large_is_reported_before_the_end_block_arrives() {
        let mut framer = Framer::new(MAX);
        framer.push(b"\x0b");
        framer.push(&[b'y'; MAX]);
        assert_eq!(framer.next_event(), None);
        assert!(framer.in_frame());
        framer.push(b"yy");
        assert_eq!(
            framer.next_event(),
            Some(TooLarge {
                head: vec![b'y'; MAX + 2],
                seen: MAX + 2
            })
        );
        // Poisoned: nothing more, whatever arrives.
        framer.push(&encode(b"MSH"));
        assert_eq!(framer.next_event(), None);
        assert_eq!(framer.finish(), None);
        assert_eq!(framer.buffered_bytes(), 0);
        assert!(!framer.in_frame());
    }

    #[test]
    fn too_large_head_is_capped_at_4096_bytes() {
        let max = 10_000;
        // Printable bytes only, so no block character can appear.
        let content: Vec<u8> = (0..20_000u32).map(|i| (i % 90) as u8 + 0x20).collect();
        let events = run_whole(max, &encode(&content));
        assert_eq!(
            events,
            vec![TooLarge {
                head: content[..TOO_LARGE_HEAD_BYTES].to_vec(),
                seen: 20_000
            }]
        );
    }

    #[test]
    fn one_mebibyte_message_in_4k_chunks_comes_out_intact() {
        let content: Vec<u8> = (0..(1usize << 20))
            .map(|i| b"MSH|PID|OBX|\r"[i % 13])
            .collect();
        let framed = cat(&[&encode(&content), &encode(b"after")]);
        let chunks: Vec<&[u8]> = framed.chunks(4096).collect();
        let events = run(2 << 20, &chunks);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], Message(content));
        assert_eq!(events[1], msg(b"after"));
    }

    #[test]
    fn one_mebibyte_message_fed_byte_by_byte_is_not_rescanned() {
        // Quadratic rescanning would make this take minutes instead of milliseconds.
        let content = vec![b'q'; 1 << 20];
        let events = run_bytewise(1 << 20, &encode(&content));
        assert_eq!(events, vec![Message(content)]);
    }

    #[test]
    fn one_mebibyte_message_fits_an_exact_one_mebibyte_limit() {
        let content = vec![b'z'; 1 << 20];
        assert_eq!(
            run_whole(1 << 20, &encode(&content)),
            vec![Message(content)]
        );
    }

    #[test]
    fn in_frame_and_buffered_bytes_track_the_state() {
        let mut framer = Framer::new(MAX);
        assert!(!framer.in_frame());
        framer.push(b"xx");
        assert_eq!(framer.next_event(), None);
        assert!(!framer.in_frame());
        assert_eq!(framer.buffered_bytes(), 0, "garbage is counted, not kept");
        framer.push(b"\x0bMSH");
        assert_eq!(framer.next_event(), Some(Discarded { bytes: 2 }));
        assert_eq!(framer.next_event(), None);
        assert!(framer.in_frame());
        assert_eq!(framer.buffered_bytes(), 3);
        framer.push(b"|\x1c");
        assert_eq!(framer.next_event(), Some(msg(b"MSH|")));
        assert!(!framer.in_frame());
        assert_eq!(framer.next_event(), None);
        framer.push(b"\x0d");
        assert_eq!(framer.next_event(), None);
        assert_eq!(framer.buffered_bytes(), 0);
    }

    #[test]
    fn finish_drains_pending_events_then_reports_the_unfinished_frame() {
        let mut framer = Framer::new(MAX);
        framer.push(b"\x0bA\x1c\x0d\x0bBC");
        assert_eq!(framer.finish(), Some(msg(b"A")));
        assert_eq!(framer.finish(), Some(Abandoned { bytes: 2 }));
        assert_eq!(framer.finish(), None);
        assert!(!framer.in_frame());
        // Reusable after finish.
        framer.push(&encode(b"D"));
        assert_eq!(framer.next_event(), Some(msg(b"D")));
    }

    #[test]
    fn encode_wraps_message_in_block_characters() {
        assert_eq!(encode(b"MSH|x"), b"\x0bMSH|x\x1c\x0d".to_vec());
        assert_eq!(encode(b""), vec![0x0b, 0x1c, 0x0d]);
    }
}
