//! ASTM E1381 / CLSI LIS1-A low-level protocol as a pure state machine.
//!
//! [`Link`] is fed what happens (bytes read from the line, a timer tick, a message to send, the
//! outcome of storing a received message) and answers with [`Action`]s for the caller to carry
//! out in order: bytes to write, a timer to (re)arm or cancel, a message to store, a warning to
//! log, a send that was given up or accepted. Every entry point takes `now: Instant`; there is no
//! clock, no I/O, no thread and no sleep in here, so tests drive hours of protocol time instantly.
//!
//! What it does:
//! - the receiver side (the analyser sends, we receive): ENQ/ACK establishment, frame checks
//!   (checksum, frame number sequence, size), reassembly of frames into messages (`H` .. `L`),
//!   duplicate frames, the 30 s receiver timeout, EOT;
//! - durability: the ACK to the frame that completes a message (the one carrying the `L` record)
//!   is held back until the caller reports the message stored ([`Link::on_store_result`]);
//! - the sender side (used to emulate analysers in tests and to send to an instrument): ENQ with
//!   retry after NAK, contention, framing, per-frame retries, timeouts, receiver interrupts.
//!
//! What it deliberately does not do: read or write the serial port, keep time, parse records
//! (see `crate::astm::records`), decode character sets, de-duplicate whole messages (a message
//! whose final ACK is lost is sent again in full by the analyser and delivered again: the
//! protocol is at-least-once; see [`Action::Deliver`]), or persist anything across restarts.
//!
//! Framing choice when sending: every record starts a new frame; a record longer than
//! `max_frame_text` (its CR included) is cut into intermediate frames (ETB) and ends in an end
//! frame (ETX). One message is sent per establishment (ENQ .. EOT); frames are numbered 1, 2, ..
//! 7, 0, 1 .. within it. When receiving, any framing is accepted: several records per frame,
//! records split across frames at any byte, one record per frame, several messages per session.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Start of heading (restricted in message text).
pub const SOH: u8 = 0x01;
/// Start of frame.
pub const STX: u8 = 0x02;
/// End of an end frame (the last frame of a record or message).
pub const ETX: u8 = 0x03;
/// End of transmission: the termination phase, or a receiver interrupt in reply to a frame.
pub const EOT: u8 = 0x04;
/// Enquiry: a request to send.
pub const ENQ: u8 = 0x05;
/// Positive acknowledgement.
pub const ACK: u8 = 0x06;
/// Data link escape (restricted in message text).
pub const DLE: u8 = 0x10;
/// Negative acknowledgement.
pub const NAK: u8 = 0x15;
/// Synchronous idle (restricted in message text).
pub const SYN: u8 = 0x16;
/// End of an intermediate frame.
pub const ETB: u8 = 0x17;
/// Carriage return: ends every record, and precedes LF at the end of every frame.
pub const CR: u8 = 0x0D;
/// Line feed: ends every frame.
pub const LF: u8 = 0x0A;

/// Largest frame text accepted in lenient mode, whatever `max_frame_text` says (bounds memory).
pub const LENIENT_FRAME_TEXT_CAP: usize = 64 * 1024;

/// Bytes that E1381 forbids inside message text (CR is allowed: it separates records).
const RESTRICTED: [u8; 15] = [
    SOH, STX, ETX, EOT, ENQ, ACK, DLE, NAK, SYN, ETB, LF, 0x11, 0x12, 0x13, 0x14,
];

/// Which end of the line this link plays; it decides who yields when both send ENQ at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// The computer system (siterelay): yields to the instrument on contention.
    #[default]
    Computer,
    /// The instrument (tests and emulated analysers): has priority on contention.
    Instrument,
}

/// Protocol timers. The defaults are the CLSI LIS1-A figures except where noted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timers {
    /// Receiver: no frame or EOT within this long after our last reply ends the session (30 s).
    pub receiver_timeout: Duration,
    /// Sender: no reply to ENQ or to a frame within this long aborts the send (15 s).
    pub sender_reply_timeout: Duration,
    /// Sender: after a NAK to our ENQ, wait this long before the next ENQ (10 s).
    pub enq_retry_after_nak: Duration,
    /// Computer after contention: wait this long for the instrument's next ENQ, and send no ENQ
    /// of our own before it has passed (20 s).
    pub contention_backoff: Duration,
    /// Instrument after contention: wait this long before sending ENQ again (1 s).
    pub instrument_contention_retry: Duration,
    /// Sender after honouring a receiver interrupt: no ENQ before this has passed (15 s).
    pub interrupt_holdoff: Duration,
    /// Sender after an abort: wait this long before starting the full resend. Not a CLSI figure:
    /// siterelay's choice (30 s).
    pub retry_after_abort: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            receiver_timeout: Duration::from_secs(30),
            sender_reply_timeout: Duration::from_secs(15),
            enq_retry_after_nak: Duration::from_secs(10),
            contention_backoff: Duration::from_secs(20),
            instrument_contention_retry: Duration::from_secs(1),
            interrupt_holdoff: Duration::from_secs(15),
            retry_after_abort: Duration::from_secs(30),
        }
    }
}

/// Configuration of a [`Link`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Which end we are (default: the computer).
    pub role: Role,
    /// Most text bytes in one frame, FN and framing excluded, record CR included (CLSI: 240).
    /// Used to cut outgoing frames and to refuse longer incoming ones.
    pub max_frame_text: usize,
    /// Accept (with a warning) incoming frames longer than `max_frame_text`, up to
    /// [`LENIENT_FRAME_TEXT_CAP`]; also accept a frame number 1 at the start of a new message
    /// where 1 is out of sequence (instruments that restart numbering per message).
    pub lenient: bool,
    /// Largest reassembled message accepted; a frame that would make it larger is refused.
    pub max_message_len: usize,
    /// The sender aborts after this many refusals of the same frame (CLSI: 6).
    pub max_frame_retries: u32,
    /// Protocol timers.
    pub timers: Timers,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            role: Role::Computer,
            max_frame_text: 240,
            lenient: false,
            max_message_len: 16 * 1024 * 1024,
            max_frame_retries: 6,
            timers: Timers::default(),
        }
    }
}

/// Why the sender side gave up a message. The message stays queued and is sent again in full
/// (from ENQ, frames renumbered from 1) after `Timers::retry_after_abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// No reply to our ENQ within `sender_reply_timeout`.
    EnqTimeout,
    /// No reply to a frame within `sender_reply_timeout`.
    FrameTimeout,
    /// The same frame was refused `max_frame_retries` times.
    FrameRefused,
}

/// Why an incoming frame was refused (answered with NAK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFault {
    /// The checksum did not match.
    Checksum,
    /// Not of the form `FN text ETB|ETX C1 C2 CR LF`, or FN not a digit 0-7.
    Malformed,
    /// The frame number was neither the expected one nor a repeat of the last.
    Sequence {
        /// The frame number expected.
        expected: u8,
        /// The frame number received.
        got: u8,
    },
    /// The text was longer than allowed.
    TooLong {
        /// Text bytes in the frame.
        text_len: usize,
    },
    /// Accepting the frame would make the message longer than `max_message_len`.
    MessageTooLarge,
}

/// Something worth logging. Carries counts and frame numbers only, never message content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkWarning {
    /// An incoming frame was answered with NAK.
    FrameRefused {
        /// Its frame number, when it could be read.
        frame_number: Option<u8>,
        /// Why.
        fault: FrameFault,
    },
    /// Lenient mode accepted a frame with more text than `max_frame_text`.
    OversizeFrameAccepted {
        /// Text bytes in the frame.
        text_len: usize,
    },
    /// A repeated frame (our ACK was lost) was acknowledged again and not stored twice.
    DuplicateFrame {
        /// Its frame number.
        frame_number: u8,
    },
    /// STX arrived inside a frame; the partial frame was dropped and a new one started.
    FrameRestarted,
    /// The receiver timed out; a partial message of this many bytes was discarded.
    ReceiveTimeout {
        /// Bytes of the partial message discarded (0 if none).
        discarded_bytes: usize,
    },
    /// The session ended (EOT, timeout or a new ENQ) before the caller reported the store result
    /// of a delivered message, so its ACK was never sent; the sender will send it again.
    StoreOutlivedSession,
    /// A frame arrived while we still owed the reply to a final frame; it was ignored.
    FrameWhileStoring,
    /// The sender sent ENQ in the middle of a session: the session was ended as if by EOT.
    SenderRestarted,
    /// Our ENQ was refused with NAK.
    EnqRefused,
    /// Both sides sent ENQ; the computer yields.
    Contention,
    /// The receiver answered a frame with EOT (receiver interrupt).
    ReceiverInterrupt,
    /// A message given to `send_message` was empty or held restricted control characters;
    /// it was not queued.
    OutgoingRejected,
}

impl fmt::Display for LinkWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkWarning::FrameRefused {
                frame_number,
                fault,
            } => {
                write!(f, "frame ")?;
                match frame_number {
                    Some(n) => write!(f, "{n} ")?,
                    None => write!(f, "(number unreadable) ")?,
                }
                match fault {
                    FrameFault::Checksum => write!(f, "refused: bad checksum"),
                    FrameFault::Malformed => write!(f, "refused: malformed"),
                    FrameFault::Sequence { expected, got } => {
                        write!(
                            f,
                            "refused: number {got} out of sequence (expected {expected})"
                        )
                    }
                    FrameFault::TooLong { text_len } => {
                        write!(f, "refused: {text_len} bytes of text is over the limit")
                    }
                    FrameFault::MessageTooLarge => write!(f, "refused: message too large"),
                }
            }
            LinkWarning::OversizeFrameAccepted { text_len } => {
                write!(
                    f,
                    "accepted an oversize frame of {text_len} text bytes (lenient)"
                )
            }
            LinkWarning::DuplicateFrame { frame_number } => {
                write!(
                    f,
                    "frame {frame_number} repeated (ACK lost?); acknowledged again"
                )
            }
            LinkWarning::FrameRestarted => write!(f, "STX inside a frame; partial frame dropped"),
            LinkWarning::ReceiveTimeout { discarded_bytes } => write!(
                f,
                "receiver timeout; partial message of {discarded_bytes} bytes discarded"
            ),
            LinkWarning::StoreOutlivedSession => write!(
                f,
                "session ended before the store result; final ACK not sent, sender will resend"
            ),
            LinkWarning::FrameWhileStoring => {
                write!(f, "frame received while the final ACK was pending; ignored")
            }
            LinkWarning::SenderRestarted => write!(f, "ENQ in the middle of a session"),
            LinkWarning::EnqRefused => write!(f, "our ENQ was refused (NAK)"),
            LinkWarning::Contention => write!(f, "line contention; yielding to the instrument"),
            LinkWarning::ReceiverInterrupt => write!(f, "receiver interrupt (EOT to a frame)"),
            LinkWarning::OutgoingRejected => {
                write!(
                    f,
                    "outgoing message empty or with restricted characters; not queued"
                )
            }
        }
    }
}

/// What the caller must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the line.
    Write(Vec<u8>),
    /// Arm the single timer for this instant, replacing any earlier one; when it passes, call
    /// [`Link::on_tick`].
    SetTimer(Instant),
    /// No timer is needed any more.
    CancelTimer,
    /// A received message: the text of its frames joined (records end with CR).
    ///
    /// `complete: true`: the text runs from the start of the message through its `L` record;
    /// the ACK of the frame that completed it is held until [`Link::on_store_result`] is called
    /// (once per such `Deliver`). If the analyser never sees that ACK (store too slow, line
    /// fault) it sends the whole message again and it is delivered again.
    ///
    /// `complete: false`: the sender ended the session (EOT, or a new ENQ) before the `L`
    /// record; this is what arrived. Nothing waits on it; store it flagged as incomplete.
    Deliver {
        /// The reassembled text.
        message: Vec<u8>,
        /// Whether the `L` record was received.
        complete: bool,
    },
    /// Log-worthy event (never message content).
    Warning(LinkWarning),
    /// Sender side: the message at the head of the queue was given up for now; it stays queued
    /// and is sent again in full later.
    Aborted {
        /// Why.
        reason: AbortReason,
    },
    /// Sender side: the last frame of the message at the head of the queue was acknowledged;
    /// the message has left the queue.
    SentMessageAccepted,
}

/// Checksum of a frame: the sum of the bytes from FN through ETB/ETX inclusive, modulo 256, as
/// two uppercase hexadecimal ASCII digits. Pass exactly those bytes.
pub fn checksum(fn_and_text_and_terminator: &[u8]) -> [u8; 2] {
    let sum = fn_and_text_and_terminator
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b));
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [HEX[(sum >> 4) as usize], HEX[(sum & 0x0F) as usize]]
}

/// Encode one frame: `STX FN text ETB|ETX C1 C2 CR LF`. `frame_number` is taken modulo 8 and
/// written as its ASCII digit; `last` selects ETX (end frame) over ETB (intermediate frame).
/// The text is not checked for restricted characters.
pub fn encode_frame(frame_number: u8, text: &[u8], last: bool) -> Vec<u8> {
    let mut frame = Vec::with_capacity(text.len() + 7);
    frame.push(STX);
    frame.push(b'0' + frame_number % 8);
    frame.extend_from_slice(text);
    frame.push(if last { ETX } else { ETB });
    let sum = checksum(&frame[1..]);
    frame.extend_from_slice(&sum);
    frame.push(CR);
    frame.push(LF);
    frame
}

/// Cut a message into encoded frames the way [`Link`] sends it: records are separated by CR, LF
/// or CRLF (empty ones dropped), each record ends with CR and starts a new frame, a record longer
/// than `max_frame_text` is cut into ETB frames ending with an ETX frame; numbers run 1, 2, ..
/// 7, 0, 1 ...
pub fn frame_message(message: &[u8], max_frame_text: usize) -> Vec<Vec<u8>> {
    let max = max_frame_text.max(1);
    let mut frames = Vec::new();
    let mut number: u8 = 1;
    for record in message.split(|b| *b == CR || *b == LF) {
        if record.is_empty() {
            continue;
        }
        let mut text = record.to_vec();
        text.push(CR);
        let chunks: Vec<&[u8]> = text.chunks(max).collect();
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            frames.push(encode_frame(number, chunk, i + 1 == count));
            number = (number + 1) % 8;
        }
    }
    frames
}

/// `now + d`, saturating far in the future instead of panicking on absurd timer settings.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(1 << 30)))
        .unwrap_or(now)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Collects the bytes of one incoming frame after its STX.
#[derive(Debug, Default)]
struct FrameParser {
    in_frame: bool,
    /// Bytes after STX, up to the cap.
    bytes: Vec<u8>,
    /// All bytes after STX, stored or not.
    len: usize,
    /// Position of the first ETB/ETX.
    term_at: Option<usize>,
}

/// One byte's worth of parsing.
enum Parsed {
    /// Nothing complete yet.
    Pending,
    /// A byte outside any frame.
    Outside(u8),
    /// STX inside a frame: the old partial frame was dropped.
    Restarted,
    /// A frame ended (at LF, or four bytes after ETB/ETX).
    Frame,
}

impl FrameParser {
    fn push(&mut self, b: u8, cap: usize) -> Parsed {
        if !self.in_frame {
            if b == STX {
                self.start();
                return Parsed::Pending;
            }
            return Parsed::Outside(b);
        }
        if b == STX {
            self.start();
            return Parsed::Restarted;
        }
        if self.len < cap {
            self.bytes.push(b);
        }
        self.len += 1;
        if self.term_at.is_none() && (b == ETB || b == ETX) {
            self.term_at = Some(self.len - 1);
        }
        let trailer_done = matches!(self.term_at, Some(t) if self.len >= t + 5);
        if b == LF || trailer_done {
            self.in_frame = false;
            return Parsed::Frame;
        }
        Parsed::Pending
    }

    fn start(&mut self) {
        self.in_frame = true;
        self.bytes.clear();
        self.len = 0;
        self.term_at = None;
    }
}

/// A frame that passed the checks.
struct GoodFrame {
    number: u8,
    text_start: usize,
    text_end: usize,
    last: bool,
}

/// Check the frame just collected by `p`.
fn check_frame(p: &FrameParser, cfg: &LinkConfig) -> Result<GoodFrame, (Option<u8>, FrameFault)> {
    let text_cap = if cfg.lenient {
        LENIENT_FRAME_TEXT_CAP.max(cfg.max_frame_text)
    } else {
        cfg.max_frame_text
    };
    let fn_digit = p
        .bytes
        .first()
        .filter(|b| (b'0'..=b'7').contains(*b))
        .map(|b| b - b'0');
    if p.len > p.bytes.len() || p.len > text_cap + 6 {
        return Err((
            fn_digit,
            FrameFault::TooLong {
                text_len: p.len.saturating_sub(6),
            },
        ));
    }
    let b = &p.bytes;
    let Some(t) = p.term_at else {
        return Err((fn_digit, FrameFault::Malformed));
    };
    if t == 0 || b.len() != t + 5 || b[t + 3] != CR || b[t + 4] != LF {
        return Err((fn_digit, FrameFault::Malformed));
    }
    let expected = checksum(&b[..=t]);
    let got = (hex_value(b[t + 1]), hex_value(b[t + 2]));
    let (Some(hi), Some(lo)) = got else {
        return Err((fn_digit, FrameFault::Checksum));
    };
    let exp_hi = hex_value(expected[0]).unwrap_or(0);
    let exp_lo = hex_value(expected[1]).unwrap_or(0);
    if (hi, lo) != (exp_hi, exp_lo) {
        return Err((fn_digit, FrameFault::Checksum));
    }
    let Some(number) = fn_digit else {
        return Err((None, FrameFault::Malformed));
    };
    Ok(GoodFrame {
        number,
        text_start: 1,
        text_end: t,
        last: b[t] == ETX,
    })
}

/// The final frame of one or more messages, delivered and awaiting store results.
#[derive(Debug)]
struct Held {
    number: u8,
    /// Sequence numbers of the complete deliveries made for this frame.
    first_seq: u64,
    last_seq: u64,
    failed: bool,
    /// `buf` length and record start before the frame was appended (for a NAK).
    prev_len: usize,
    prev_rec_start: usize,
    /// Bytes of `buf` making up the delivered messages (dropped on ACK).
    consumed: usize,
}

/// Receiver state for one session.
#[derive(Debug)]
struct Rx {
    deadline: Instant,
    last_fn: Option<u8>,
    /// Text of the message in progress (no delivered message ever stays at its front).
    buf: Vec<u8>,
    /// Start in `buf` of the record not yet ended by CR.
    rec_start: usize,
    held: Option<Held>,
    parser: FrameParser,
}

impl Rx {
    fn new(deadline: Instant) -> Self {
        Rx {
            deadline,
            last_fn: None,
            buf: Vec::new(),
            rec_start: 0,
            held: None,
            parser: FrameParser::default(),
        }
    }

    /// Accept the held frame: drop the delivered messages from the buffer.
    fn commit(&mut self) {
        if let Some(h) = self.held.take() {
            self.buf.drain(..h.consumed);
            self.rec_start -= h.consumed;
            self.last_fn = Some(h.number);
        }
    }

    /// Refuse the held frame: forget its text as if it never arrived.
    fn rollback(&mut self) {
        if let Some(h) = self.held.take() {
            self.buf.truncate(h.prev_len);
            self.rec_start = h.prev_rec_start;
        }
    }
}

/// Sender state for one message.
#[derive(Debug)]
struct Tx {
    frames: Vec<Vec<u8>>,
    idx: usize,
    refusals: u32,
    deadline: Instant,
    interrupted: bool,
}

#[derive(Debug)]
enum State {
    Idle,
    Receiving(Rx),
    /// We sent ENQ and wait for the reply.
    AwaitEnqReply {
        deadline: Instant,
    },
    /// Computer after contention: waiting for the instrument's next ENQ.
    ContentionWait {
        deadline: Instant,
    },
    /// Instrument after contention: ENQ again at `at`.
    ContentionRetry {
        at: Instant,
    },
    Sending(Tx),
}

/// One end of an ASTM E1381 link. See the module documentation.
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    state: State,
    busy: bool,
    outbox: VecDeque<Vec<u8>>,
    /// No ENQ of ours before this instant.
    hold_off: Option<Instant>,
    /// The timer last announced to the caller.
    announced: Option<Instant>,
    /// Complete deliveries made so far, and store results received so far.
    delivered_seq: u64,
    answered_seq: u64,
}

impl Link {
    /// A link in the idle (neutral) state.
    pub fn new(cfg: LinkConfig) -> Self {
        Link {
            cfg,
            state: State::Idle,
            busy: false,
            outbox: VecDeque::new(),
            hold_off: None,
            announced: None,
            delivered_seq: 0,
            answered_seq: 0,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    /// While busy, an ENQ is answered with NAK (the sender retries after 10 s). Sessions already
    /// under way are not affected.
    pub fn set_busy(&mut self, busy: bool) {
        self.busy = busy;
    }

    /// True when neither sending nor receiving (the neutral state).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Messages queued by [`Link::send_message`] and not yet accepted.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The instant of the timer currently needed, if any (the last `SetTimer` announced).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.announced
    }

    /// Bytes read from the line, in order; any split into calls is fine.
    pub fn on_bytes(&mut self, now: Instant, data: &[u8]) -> Vec<Action> {
        let mut out = Vec::new();
        self.expire(now, &mut out);
        for &b in data {
            self.byte(now, b, &mut out);
        }
        self.finish(now, out)
    }

    /// A timer set by `SetTimer` may have passed. Calling it early or often is harmless.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.expire(now, &mut out);
        self.finish(now, out)
    }

    /// Queue a message (records separated by CR, LF or CRLF) to send to the other end. It is sent
    /// when the line is idle; the queue is sent in order, one message per session.
    pub fn send_message(&mut self, now: Instant, message: Vec<u8>) -> Vec<Action> {
        let mut out = Vec::new();
        self.expire(now, &mut out);
        let has_record = message.iter().any(|b| *b != CR && *b != LF);
        let restricted = message.iter().any(|b| *b != LF && RESTRICTED.contains(b));
        if !has_record || restricted {
            out.push(Action::Warning(LinkWarning::OutgoingRejected));
        } else {
            self.outbox.push_back(message);
        }
        self.finish(now, out)
    }

    /// The caller's answer to a `Deliver { complete: true }`: `ok` once the message is committed
    /// to durable storage (then the held ACK is written), or `!ok` if storing failed (then NAK is
    /// written and the analyser sends the frame again). Ignored when nothing is awaiting it (for
    /// example after the session timed out). Results are matched to deliveries in order: call it
    /// exactly once per complete delivery, in delivery order, and not for incomplete ones. The
    /// result of a delivery whose session has since ended is absorbed without writing anything,
    /// even if a newer delivery is waiting.
    pub fn on_store_result(&mut self, now: Instant, ok: bool) -> Vec<Action> {
        let mut out = Vec::new();
        self.expire(now, &mut out);
        let timeout = self.cfg.timers.receiver_timeout;
        if self.answered_seq >= self.delivered_seq {
            // Nothing awaits a result.
            return self.finish(now, out);
        }
        self.answered_seq += 1;
        let seq = self.answered_seq;
        if let State::Receiving(rx) = &mut self.state
            && let Some(h) = &mut rx.held
            && (h.first_seq..=h.last_seq).contains(&seq)
        {
            h.failed |= !ok;
            if seq == h.last_seq {
                if h.failed {
                    rx.rollback();
                    out.push(Action::Write(vec![NAK]));
                } else {
                    rx.commit();
                    out.push(Action::Write(vec![ACK]));
                }
                rx.deadline = later(now, timeout);
            }
        }
        self.finish(now, out)
    }

    /// Announce timer changes and start sending if the line allows.
    fn finish(&mut self, now: Instant, mut out: Vec<Action>) -> Vec<Action> {
        if matches!(self.state, State::Idle)
            && !self.outbox.is_empty()
            && self.hold_off.is_none_or(|h| h <= now)
        {
            self.hold_off = None;
            out.push(Action::Write(vec![ENQ]));
            self.state = State::AwaitEnqReply {
                deadline: later(now, self.cfg.timers.sender_reply_timeout),
            };
        }
        let wanted = match &self.state {
            State::Idle => {
                if self.outbox.is_empty() {
                    None
                } else {
                    self.hold_off
                }
            }
            State::Receiving(rx) => Some(rx.deadline),
            State::AwaitEnqReply { deadline } | State::ContentionWait { deadline } => {
                Some(*deadline)
            }
            State::ContentionRetry { at } => Some(*at),
            State::Sending(tx) => Some(tx.deadline),
        };
        if wanted != self.announced {
            self.announced = wanted;
            out.push(match wanted {
                Some(at) => Action::SetTimer(at),
                None => Action::CancelTimer,
            });
        }
        out
    }

    /// Handle a timer that has passed.
    fn expire(&mut self, now: Instant, out: &mut Vec<Action>) {
        let t = self.cfg.timers.clone();
        match &mut self.state {
            State::Idle => {}
            State::Receiving(rx) => {
                if rx.deadline <= now {
                    if rx.held.is_some() {
                        out.push(Action::Warning(LinkWarning::StoreOutlivedSession));
                        rx.commit();
                    }
                    out.push(Action::Warning(LinkWarning::ReceiveTimeout {
                        discarded_bytes: rx.buf.len(),
                    }));
                    self.state = State::Idle;
                }
            }
            State::AwaitEnqReply { deadline } => {
                if *deadline <= now {
                    out.push(Action::Write(vec![EOT]));
                    out.push(Action::Aborted {
                        reason: AbortReason::EnqTimeout,
                    });
                    self.hold_off = Some(later(now, t.retry_after_abort));
                    self.state = State::Idle;
                }
            }
            State::ContentionWait { deadline } => {
                if *deadline <= now {
                    self.state = State::Idle;
                }
            }
            State::ContentionRetry { at } => {
                if *at <= now {
                    out.push(Action::Write(vec![ENQ]));
                    self.state = State::AwaitEnqReply {
                        deadline: later(now, t.sender_reply_timeout),
                    };
                }
            }
            State::Sending(tx) => {
                if tx.deadline <= now {
                    out.push(Action::Write(vec![EOT]));
                    out.push(Action::Aborted {
                        reason: AbortReason::FrameTimeout,
                    });
                    self.hold_off = Some(later(now, t.retry_after_abort));
                    self.state = State::Idle;
                }
            }
        }
    }

    /// Answer an ENQ received while neutral.
    fn answer_enq(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.busy {
            out.push(Action::Write(vec![NAK]));
            self.state = State::Idle;
        } else {
            out.push(Action::Write(vec![ACK]));
            self.state = State::Receiving(Rx::new(later(now, self.cfg.timers.receiver_timeout)));
        }
    }

    fn byte(&mut self, now: Instant, b: u8, out: &mut Vec<Action>) {
        let t = &self.cfg.timers;
        match &mut self.state {
            State::Idle | State::ContentionWait { .. } => {
                if b == ENQ {
                    self.answer_enq(now, out);
                }
            }
            State::ContentionRetry { .. } => {}
            State::AwaitEnqReply { .. } => match b {
                ACK => {
                    let frames = self
                        .outbox
                        .front()
                        .map(|m| frame_message(m, self.cfg.max_frame_text))
                        .unwrap_or_default();
                    if let Some(first) = frames.first() {
                        out.push(Action::Write(first.clone()));
                        self.state = State::Sending(Tx {
                            frames,
                            idx: 0,
                            refusals: 0,
                            deadline: later(now, t.sender_reply_timeout),
                            interrupted: false,
                        });
                    } else {
                        out.push(Action::Write(vec![EOT]));
                        self.state = State::Idle;
                    }
                }
                NAK => {
                    out.push(Action::Warning(LinkWarning::EnqRefused));
                    self.hold_off = Some(later(now, t.enq_retry_after_nak));
                    self.state = State::Idle;
                }
                ENQ => match self.cfg.role {
                    Role::Computer => {
                        out.push(Action::Warning(LinkWarning::Contention));
                        self.hold_off = Some(later(now, t.contention_backoff));
                        self.state = State::ContentionWait {
                            deadline: later(now, t.contention_backoff),
                        };
                    }
                    Role::Instrument => {
                        self.state = State::ContentionRetry {
                            at: later(now, t.instrument_contention_retry),
                        };
                    }
                },
                _ => {}
            },
            State::Sending(tx) => {
                let accepted = b == ACK || b == EOT;
                if b == EOT && !tx.interrupted {
                    tx.interrupted = true;
                    out.push(Action::Warning(LinkWarning::ReceiverInterrupt));
                }
                if accepted {
                    tx.idx += 1;
                    tx.refusals = 0;
                    if let Some(next) = tx.frames.get(tx.idx) {
                        out.push(Action::Write(next.clone()));
                        tx.deadline = later(now, t.sender_reply_timeout);
                    } else {
                        let interrupted = tx.interrupted;
                        out.push(Action::Write(vec![EOT]));
                        self.outbox.pop_front();
                        out.push(Action::SentMessageAccepted);
                        if interrupted {
                            self.hold_off = Some(later(now, t.interrupt_holdoff));
                        }
                        self.state = State::Idle;
                    }
                } else {
                    tx.refusals += 1;
                    if tx.refusals >= self.cfg.max_frame_retries {
                        out.push(Action::Write(vec![EOT]));
                        out.push(Action::Aborted {
                            reason: AbortReason::FrameRefused,
                        });
                        self.hold_off = Some(later(now, t.retry_after_abort));
                        self.state = State::Idle;
                    } else {
                        out.push(Action::Write(tx.frames[tx.idx].clone()));
                        tx.deadline = later(now, t.sender_reply_timeout);
                    }
                }
            }
            State::Receiving(_) => self.rx_byte(now, b, out),
        }
    }

    fn rx_byte(&mut self, now: Instant, b: u8, out: &mut Vec<Action>) {
        let cfg = &self.cfg;
        let State::Receiving(rx) = &mut self.state else {
            return;
        };
        let cap = if cfg.lenient {
            LENIENT_FRAME_TEXT_CAP.max(cfg.max_frame_text)
        } else {
            cfg.max_frame_text
        } + 6;
        match rx.parser.push(b, cap) {
            Parsed::Pending => {}
            Parsed::Restarted => out.push(Action::Warning(LinkWarning::FrameRestarted)),
            Parsed::Outside(EOT) => self.end_session(out),
            Parsed::Outside(ENQ) => {
                out.push(Action::Warning(LinkWarning::SenderRestarted));
                self.end_session(out);
                self.answer_enq(now, out);
            }
            Parsed::Outside(_) => {}
            Parsed::Frame => {
                let timeout = cfg.timers.receiver_timeout;
                if rx.held.is_some() {
                    out.push(Action::Warning(LinkWarning::FrameWhileStoring));
                    return;
                }
                let verdict = check_frame(&rx.parser, cfg);
                rx.deadline = later(now, timeout);
                match verdict {
                    Err((frame_number, fault)) => {
                        out.push(Action::Write(vec![NAK]));
                        out.push(Action::Warning(LinkWarning::FrameRefused {
                            frame_number,
                            fault,
                        }));
                    }
                    Ok(frame) => Self::rx_frame(cfg, rx, frame, &mut self.delivered_seq, out),
                }
            }
        }
    }

    /// A frame passed its checks: sequence, store, deliver or acknowledge.
    fn rx_frame(
        cfg: &LinkConfig,
        rx: &mut Rx,
        frame: GoodFrame,
        delivered_seq: &mut u64,
        out: &mut Vec<Action>,
    ) {
        let n = frame.number;
        if rx.last_fn == Some(n) {
            out.push(Action::Write(vec![ACK]));
            out.push(Action::Warning(LinkWarning::DuplicateFrame {
                frame_number: n,
            }));
            return;
        }
        let expected = rx.last_fn.map_or(1, |l| (l + 1) % 8);
        let restart_ok = cfg.lenient && n == 1 && rx.buf.is_empty() && rx.last_fn.is_some();
        if n != expected && !restart_ok {
            out.push(Action::Write(vec![NAK]));
            out.push(Action::Warning(LinkWarning::FrameRefused {
                frame_number: Some(n),
                fault: FrameFault::Sequence { expected, got: n },
            }));
            return;
        }
        let text = &rx.parser.bytes[frame.text_start..frame.text_end];
        if rx.buf.len() + text.len() + 1 > cfg.max_message_len {
            out.push(Action::Write(vec![NAK]));
            out.push(Action::Warning(LinkWarning::FrameRefused {
                frame_number: Some(n),
                fault: FrameFault::MessageTooLarge,
            }));
            return;
        }
        if text.len() > cfg.max_frame_text {
            out.push(Action::Warning(LinkWarning::OversizeFrameAccepted {
                text_len: text.len(),
            }));
        }
        let prev_len = rx.buf.len();
        let prev_rec_start = rx.rec_start;
        rx.buf.extend_from_slice(text);
        if frame.last && !rx.buf.is_empty() && rx.buf.last() != Some(&CR) {
            // An end frame ends a record even when the sender left out its CR.
            rx.buf.push(CR);
        }
        // Find records ended by this frame; an `L` record ends a message.
        let mut msg_start = 0;
        let mut ends = Vec::new();
        for i in prev_len..rx.buf.len() {
            if rx.buf[i] == CR {
                if rx.rec_start < i && rx.buf[rx.rec_start] == b'L' {
                    ends.push((msg_start, i + 1));
                    msg_start = i + 1;
                }
                rx.rec_start = i + 1;
            }
        }
        if ends.is_empty() {
            rx.last_fn = Some(n);
            out.push(Action::Write(vec![ACK]));
            return;
        }
        for (start, end) in &ends {
            out.push(Action::Deliver {
                message: rx.buf[*start..*end].to_vec(),
                complete: true,
            });
        }
        let first_seq = *delivered_seq + 1;
        *delivered_seq += ends.len() as u64;
        rx.held = Some(Held {
            number: n,
            first_seq,
            last_seq: *delivered_seq,
            failed: false,
            prev_len,
            prev_rec_start,
            consumed: msg_start,
        });
    }

    /// The sender ended the session (EOT, or ENQ): deliver what arrived, go neutral.
    fn end_session(&mut self, out: &mut Vec<Action>) {
        if let State::Receiving(rx) = &mut self.state {
            if rx.held.is_some() {
                out.push(Action::Warning(LinkWarning::StoreOutlivedSession));
                rx.commit();
            }
            if rx.buf.iter().any(|b| *b != CR) {
                out.push(Action::Deliver {
                    message: std::mem::take(&mut rx.buf),
                    complete: false,
                });
            }
        }
        self.state = State::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link::new(LinkConfig::default())
    }

    /// Feed bytes one at a time, collecting all actions.
    fn feed(l: &mut Link, now: Instant, bytes: &[u8]) -> Vec<Action> {
        bytes.iter().flat_map(|b| l.on_bytes(now, &[*b])).collect()
    }

    fn writes(actions: &[Action]) -> Vec<u8> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Write(w) => Some(w.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn delivered(actions: &[Action]) -> Vec<(Vec<u8>, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { message, complete } => Some((message.clone(), *complete)),
                _ => None,
            })
            .collect()
    }

    fn warnings(actions: &[Action]) -> Vec<LinkWarning> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Warning(w) => Some(w.clone()),
                _ => None,
            })
            .collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A receiving link that has ACKed an ENQ.
    fn receiving(now: Instant) -> Link {
        let mut l = link();
        assert_eq!(writes(&feed(&mut l, now, &[ENQ])), vec![ACK]);
        l
    }

    #[test]
    fn checksum_golden_vectors() {
        // "1H|\^&|||TEST^1" CR ETX:
        // '1'49 'H'72 '|'124 '\'92 '^'94 '&'38 '|'124 '|'124 '|'124 'T'84 'E'69 'S'83 'T'84
        // '^'94 '1'49 CR13 ETX3 = 1320; 1320 - 5*256 = 40 = 0x28 -> "28".
        assert_eq!(&checksum(b"1H|\\^&|||TEST^1\r\x03"), b"28");
        // "2L|1|N" CR ETX: 50+76+124+49+124+78+13+3 = 517; 517 - 2*256 = 5 -> "05".
        assert_eq!(&checksum(b"2L|1|N\r\x03"), b"05");
        // "3R|1|^^^GLU" ETB: 51+82+124+49+124+3*94+71+76+85+23 = 967; 967 - 3*256 = 199 = 0xC7.
        assert_eq!(&checksum(b"3R|1|^^^GLU\x17"), b"C7");
        assert_eq!(
            encode_frame(1, b"H|\\^&|||TEST^1\r", true),
            b"\x021H|\\^&|||TEST^1\r\x0328\r\n".to_vec()
        );
        assert_eq!(
            encode_frame(3, b"R|1|^^^GLU", false),
            b"\x023R|1|^^^GLU\x17C7\r\n".to_vec()
        );
    }

    #[test]
    fn idle_ignores_everything_but_enq_and_acks_enq() {
        let now = Instant::now();
        let mut l = link();
        let junk = [
            ACK, NAK, EOT, STX, b'1', b'H', ETX, CR, LF, 0x00, 0xFF, b'x',
        ];
        let a = feed(&mut l, now, &junk);
        assert!(a.is_empty(), "{a:?}");
        assert!(l.is_idle());
        let a = feed(&mut l, now, &[ENQ]);
        assert_eq!(writes(&a), vec![ACK]);
        assert!(a.contains(&Action::SetTimer(now + secs(30))));
        assert!(!l.is_idle());
    }

    #[test]
    fn busy_link_naks_enq_and_stays_idle() {
        let now = Instant::now();
        let mut l = link();
        l.set_busy(true);
        assert_eq!(writes(&feed(&mut l, now, &[ENQ])), vec![NAK]);
        assert!(l.is_idle());
        l.set_busy(false);
        assert_eq!(writes(&feed(&mut l, now, &[ENQ])), vec![ACK]);
    }

    #[test]
    fn good_frame_acked_bad_checksum_naked_and_not_stored() {
        let now = Instant::now();
        let mut l = receiving(now);
        let mut bad = encode_frame(1, b"H|\\^&\r", true);
        let n = bad.len();
        bad[n - 4] = if bad[n - 4] == b'0' { b'1' } else { b'0' };
        let a = feed(&mut l, now, &bad);
        assert_eq!(writes(&a), vec![NAK]);
        assert!(matches!(
            warnings(&a)[..],
            [LinkWarning::FrameRefused {
                frame_number: Some(1),
                fault: FrameFault::Checksum
            }]
        ));
        // The same frame, intact: ACKed; then L completes a message holding only the good copy.
        assert_eq!(
            writes(&feed(&mut l, now, &encode_frame(1, b"H|\\^&\r", true))),
            vec![ACK]
        );
        let a = feed(&mut l, now, &encode_frame(2, b"L|1|N\r", true));
        assert_eq!(delivered(&a), vec![(b"H|\\^&\rL|1|N\r".to_vec(), true)]);
    }

    #[test]
    fn lowercase_checksum_accepted() {
        let now = Instant::now();
        let mut l = receiving(now);
        // "1R|1|^^^GLU" ETB sums to 965 = 3*256 + 197 = 0xC5, sent here as "c5".
        let frame = b"\x021R|1|^^^GLU\x17c5\r\n";
        assert_eq!(encode_frame(1, b"R|1|^^^GLU", false)[13..15], *b"C5");
        assert_eq!(writes(&feed(&mut l, now, frame)), vec![ACK]);
    }

    #[test]
    fn malformed_frames_are_naked() {
        let now = Instant::now();
        let mut l = receiving(now);
        // LF before any ETB/ETX.
        assert_eq!(writes(&feed(&mut l, now, b"\x021H|\r\n")), vec![NAK]);
        // Frame number not a digit 0-7 (valid checksum).
        let mut f = vec![STX, b'9'];
        f.extend_from_slice(b"H|\r\x03");
        let c = checksum(&f[1..]);
        f.extend_from_slice(&c);
        f.extend_from_slice(b"\r\n");
        assert_eq!(writes(&feed(&mut l, now, &f)), vec![NAK]);
        // Trailer without CR LF.
        assert_eq!(writes(&feed(&mut l, now, b"\x021H|\x03xxxx")), vec![NAK]);
        // STX inside a frame restarts it.
        let mut f = b"\x021H|gar".to_vec();
        f.extend_from_slice(&encode_frame(1, b"H|\\^&\r", true));
        let a = feed(&mut l, now, &f);
        assert_eq!(writes(&a), vec![ACK]);
        assert!(warnings(&a).contains(&LinkWarning::FrameRestarted));
    }

    #[test]
    fn frame_numbers_sequence_duplicates_and_wrap() {
        let now = Instant::now();
        let mut l = receiving(now);
        // The first frame must be 1.
        let a = feed(&mut l, now, &encode_frame(2, b"H|\\^&\r", true));
        assert_eq!(writes(&a), vec![NAK]);
        assert!(warnings(&a).contains(&LinkWarning::FrameRefused {
            frame_number: Some(2),
            fault: FrameFault::Sequence {
                expected: 1,
                got: 2
            }
        }));
        assert_eq!(
            writes(&feed(&mut l, now, &encode_frame(1, b"H|\\^&\r", true))),
            vec![ACK]
        );
        // Repeat of 1 (our ACK was lost): ACK again, not stored twice.
        let a = feed(&mut l, now, &encode_frame(1, b"H|\\^&\r", true));
        assert_eq!(writes(&a), vec![ACK]);
        assert!(warnings(&a).contains(&LinkWarning::DuplicateFrame { frame_number: 1 }));
        // A skipped number is refused.
        assert_eq!(
            writes(&feed(&mut l, now, &encode_frame(3, b"P|1\r", true))),
            vec![NAK]
        );
        // 2..7, then 0, 1: wraps.
        for n in [2u8, 3, 4, 5, 6, 7, 0, 1] {
            let text = format!("R|{n}\r");
            assert_eq!(
                writes(&feed(&mut l, now, &encode_frame(n, text.as_bytes(), true))),
                vec![ACK],
                "frame {n}"
            );
        }
        let a = feed(&mut l, now, &encode_frame(2, b"L|1\r", true));
        let d = delivered(&a);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].0,
            b"H|\\^&\rR|2\rR|3\rR|4\rR|5\rR|6\rR|7\rR|0\rR|1\rL|1\r".to_vec()
        );
    }

    #[test]
    fn etb_frames_join_and_records_may_span_frames_or_share_them() {
        let now = Instant::now();
        let mut l = receiving(now);
        // Two records in one frame, a record split over ETB frames mid-field, then one per frame.
        let frames = [
            encode_frame(1, b"H|\\^&|||TEST^1\rP|1||9990000018\r", true),
            encode_frame(2, b"R|1|^^^GL", false),
            encode_frame(3, b"U|5.4|mmol/L", false),
            encode_frame(4, b"\r", true),
            encode_frame(5, b"L|1|N\r", true),
        ];
        let mut all = Vec::new();
        for f in &frames {
            all.extend(feed(&mut l, now, f));
        }
        assert_eq!(writes(&all), vec![ACK; 4]);
        assert_eq!(
            delivered(&all),
            vec![(
                b"H|\\^&|||TEST^1\rP|1||9990000018\rR|1|^^^GLU|5.4|mmol/L\rL|1|N\r".to_vec(),
                true
            )]
        );
    }

    #[test]
    fn end_frame_without_cr_still_ends_its_record() {
        let now = Instant::now();
        let mut l = receiving(now);
        feed(&mut l, now, &encode_frame(1, b"H|\\^&", true));
        let a = feed(&mut l, now, &encode_frame(2, b"L|1", true));
        assert_eq!(delivered(&a), vec![(b"H|\\^&\rL|1\r".to_vec(), true)]);
    }

    #[test]
    fn overlong_frame_naked_unless_lenient() {
        let now = Instant::now();
        let mut l = receiving(now);
        let ok = vec![b'x'; 240];
        let long = vec![b'x'; 241];
        assert_eq!(
            writes(&feed(&mut l, now, &encode_frame(1, &ok, false))),
            vec![ACK]
        );
        let a = feed(&mut l, now, &encode_frame(2, &long, false));
        assert_eq!(writes(&a), vec![NAK]);
        assert!(warnings(&a).contains(&LinkWarning::FrameRefused {
            frame_number: Some(2),
            fault: FrameFault::TooLong { text_len: 241 }
        }));
        // Much longer than the cap: still one NAK, bytes not all kept.
        let a = feed(&mut l, now, &encode_frame(2, &vec![b'y'; 5000], false));
        assert_eq!(writes(&a), vec![NAK]);

        let mut l = Link::new(LinkConfig {
            lenient: true,
            ..LinkConfig::default()
        });
        feed(&mut l, now, &[ENQ]);
        let a = feed(&mut l, now, &encode_frame(1, &long, false));
        assert_eq!(writes(&a), vec![ACK]);
        assert!(warnings(&a).contains(&LinkWarning::OversizeFrameAccepted { text_len: 241 }));
    }

    #[test]
    fn receiver_timeout_discards_partial_message() {
        let t0 = Instant::now();
        let mut l = receiving(t0);
        let a = feed(
            &mut l,
            t0 + secs(5),
            &encode_frame(1, b"H|\\^&\rP|1\r", true),
        );
        assert_eq!(writes(&a), vec![ACK]);
        assert!(a.contains(&Action::SetTimer(t0 + secs(35))));
        // A spurious early tick does nothing.
        assert!(l.on_tick(t0 + secs(34)).is_empty());
        let a = l.on_tick(t0 + secs(35));
        assert!(delivered(&a).is_empty());
        assert_eq!(
            warnings(&a),
            vec![LinkWarning::ReceiveTimeout {
                discarded_bytes: 10
            }]
        );
        assert!(a.contains(&Action::CancelTimer));
        assert!(l.is_idle());
        // Back to idle: a frame now gets no reply.
        assert!(
            writes(&feed(
                &mut l,
                t0 + secs(36),
                &encode_frame(2, b"R|1\r", true)
            ))
            .is_empty()
        );
    }

    #[test]
    fn eot_ends_session_without_reply_and_delivers_partial_as_incomplete() {
        let now = Instant::now();
        // EOT with nothing received: no reply, idle, nothing delivered.
        let mut l = receiving(now);
        let a = feed(&mut l, now, &[EOT]);
        assert!(writes(&a).is_empty() && delivered(&a).is_empty());
        assert!(l.is_idle());
        // EOT after some records but before L.
        let mut l = receiving(now);
        feed(
            &mut l,
            now,
            &encode_frame(1, b"H|\\^&\rP|1\rO|1|S1\r", true),
        );
        let a = feed(&mut l, now, &[EOT]);
        assert!(writes(&a).is_empty());
        assert_eq!(
            delivered(&a),
            vec![(b"H|\\^&\rP|1\rO|1|S1\r".to_vec(), false)]
        );
        assert!(l.is_idle());
        // A store result for it is ignored.
        assert!(writes(&l.on_store_result(now, true)).is_empty());
    }

    #[test]
    fn final_ack_waits_for_the_store_and_nak_on_store_failure_gets_a_resend() {
        let t0 = Instant::now();
        let mut l = receiving(t0);
        feed(&mut l, t0, &encode_frame(1, b"H|\\^&\r", true));
        let last = encode_frame(2, b"R|1|^^^GLU|5.4\rL|1|N\r", true);
        let a = feed(&mut l, t0 + secs(1), &last);
        assert!(writes(&a).is_empty(), "no ACK before the store: {a:?}");
        assert_eq!(delivered(&a).len(), 1);
        // Storing failed: NAK, the frame is forgotten.
        assert_eq!(writes(&l.on_store_result(t0 + secs(2), false)), vec![NAK]);
        // The analyser resends the same frame: delivered again, ACK after a good store.
        let a = feed(&mut l, t0 + secs(3), &last);
        assert_eq!(
            delivered(&a),
            vec![(b"H|\\^&\rR|1|^^^GLU|5.4\rL|1|N\r".to_vec(), true)]
        );
        assert!(writes(&a).is_empty());
        let a = l.on_store_result(t0 + secs(4), true);
        assert_eq!(writes(&a), vec![ACK]);
        assert!(a.contains(&Action::SetTimer(t0 + secs(34))));
        // A second (stray) result is ignored.
        assert!(l.on_store_result(t0 + secs(4), true).is_empty());
        // Then EOT: nothing further delivered.
        let a = feed(&mut l, t0 + secs(5), &[EOT]);
        assert!(delivered(&a).is_empty());
        assert!(l.is_idle());
    }

    #[test]
    fn store_slower_than_the_session_sends_no_stray_ack() {
        let t0 = Instant::now();
        let mut l = receiving(t0);
        let a = feed(&mut l, t0, &encode_frame(1, b"H|\\^&\rL|1\r", true));
        assert_eq!(delivered(&a).len(), 1);
        // Frames arriving while the reply is owed are ignored.
        let a = feed(&mut l, t0 + secs(1), &encode_frame(2, b"H|\\^&\r", true));
        assert!(writes(&a).is_empty());
        assert!(warnings(&a).contains(&LinkWarning::FrameWhileStoring));
        // The sender gave up (EOT) before the store finished.
        let a = feed(&mut l, t0 + secs(15), &[EOT]);
        assert_eq!(warnings(&a), vec![LinkWarning::StoreOutlivedSession]);
        assert!(delivered(&a).is_empty());
        assert!(l.on_store_result(t0 + secs(16), true).is_empty());
        // Same with the receiver timer instead of EOT.
        let mut l = receiving(t0);
        feed(&mut l, t0, &encode_frame(1, b"H|\\^&\rL|1\r", true));
        let a = l.on_tick(t0 + secs(30));
        assert!(warnings(&a).contains(&LinkWarning::StoreOutlivedSession));
        assert!(l.is_idle());
        assert!(l.on_store_result(t0 + secs(31), true).is_empty());
    }

    #[test]
    fn a_late_store_result_is_not_taken_for_a_newer_delivery() {
        let t0 = Instant::now();
        let mut l = receiving(t0);
        feed(&mut l, t0, &encode_frame(1, b"H|\\^&\rL|1\r", true));
        // The sender gives up and starts again before the first store finishes.
        feed(&mut l, t0 + secs(15), &[EOT]);
        feed(&mut l, t0 + secs(16), &[ENQ]);
        let a = feed(
            &mut l,
            t0 + secs(16),
            &encode_frame(1, b"H|\\^&\rL|1\r", true),
        );
        assert_eq!(delivered(&a).len(), 1);
        // The first store's result: absorbed, no ACK for the second delivery yet.
        assert!(writes(&l.on_store_result(t0 + secs(17), true)).is_empty());
        // The second store fails: NAK.
        assert_eq!(writes(&l.on_store_result(t0 + secs(18), false)), vec![NAK]);
    }

    #[test]
    fn several_messages_in_one_session_and_in_one_frame() {
        let now = Instant::now();
        let mut l = receiving(now);
        let a = feed(&mut l, now, &encode_frame(1, b"H|\\^&\rL|1\r", true));
        assert_eq!(delivered(&a).len(), 1);
        assert_eq!(writes(&l.on_store_result(now, true)), vec![ACK]);
        // Numbering continues; this frame completes two messages and starts a third.
        let a = feed(
            &mut l,
            now,
            &encode_frame(2, b"H|\\^&\rL|1\rH|\\^&\rP|1\rL|1\rH|\\^&\r", true),
        );
        let d = delivered(&a);
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].0, b"H|\\^&\rP|1\rL|1\r".to_vec());
        assert!(
            writes(&l.on_store_result(now, true)).is_empty(),
            "one result still owed"
        );
        assert_eq!(writes(&l.on_store_result(now, true)), vec![ACK]);
        let a = feed(&mut l, now, &encode_frame(3, b"L|1\r", true));
        assert_eq!(delivered(&a), vec![(b"H|\\^&\rL|1\r".to_vec(), true)]);
    }

    #[test]
    fn enq_in_the_middle_of_a_session_restarts_it() {
        let now = Instant::now();
        let mut l = receiving(now);
        feed(&mut l, now, &encode_frame(1, b"H|\\^&\r", true));
        let a = feed(&mut l, now, &[ENQ]);
        assert_eq!(writes(&a), vec![ACK]);
        assert_eq!(delivered(&a), vec![(b"H|\\^&\r".to_vec(), false)]);
        // Numbering starts again at 1.
        assert_eq!(
            writes(&feed(&mut l, now, &encode_frame(1, b"H|\\^&\r", true))),
            vec![ACK]
        );
    }

    #[test]
    fn lenient_accepts_numbering_restarted_per_message() {
        let now = Instant::now();
        let cfg = LinkConfig {
            lenient: true,
            ..LinkConfig::default()
        };
        for (lenient, reply) in [(false, NAK), (true, ACK)] {
            let mut l = Link::new(LinkConfig {
                lenient,
                ..cfg.clone()
            });
            feed(&mut l, now, &[ENQ]);
            feed(&mut l, now, &encode_frame(1, b"H|\\^&\r", true));
            feed(&mut l, now, &encode_frame(2, b"L|1\r", true));
            l.on_store_result(now, true);
            let a = feed(&mut l, now, &encode_frame(1, b"H|\\^&\r", true));
            assert_eq!(writes(&a), vec![reply], "lenient={lenient}");
        }
    }

    #[test]
    fn contention_computer_yields_and_waits_twenty_seconds() {
        let t0 = Instant::now();
        let mut l = link();
        let a = l.send_message(t0, b"H|\\^&\rL|1\r".to_vec());
        assert_eq!(writes(&a), vec![ENQ]);
        // The instrument's ENQ crosses ours: no reply to it, wait for its next ENQ.
        let a = feed(&mut l, t0, &[ENQ]);
        assert!(writes(&a).is_empty());
        assert!(warnings(&a).contains(&LinkWarning::Contention));
        assert!(a.contains(&Action::SetTimer(t0 + secs(20))));
        // The instrument retries after 1 s: now we ACK and receive.
        let t1 = t0 + secs(1);
        assert_eq!(writes(&feed(&mut l, t1, &[ENQ])), vec![ACK]);
        feed(&mut l, t1, &encode_frame(1, b"H|\\^&\rL|1\r", true));
        assert_eq!(writes(&l.on_store_result(t1, true)), vec![ACK]);
        let a = feed(&mut l, t1 + secs(1), &[EOT]);
        // Our own ENQ must wait until 20 s after the contention.
        assert!(writes(&a).is_empty());
        assert!(a.contains(&Action::SetTimer(t0 + secs(20))));
        assert!(writes(&l.on_tick(t0 + secs(19))).is_empty());
        assert_eq!(writes(&l.on_tick(t0 + secs(20))), vec![ENQ]);
    }

    #[test]
    fn contention_without_a_second_enq_returns_to_idle_after_twenty_seconds() {
        let t0 = Instant::now();
        let mut l = link();
        l.send_message(t0, b"H|\\^&\rL|1\r".to_vec());
        feed(&mut l, t0, &[ENQ]);
        let a = l.on_tick(t0 + secs(20));
        assert_eq!(writes(&a), vec![ENQ], "neutral again, our message goes");
    }

    #[test]
    fn contention_instrument_retries_enq_after_one_second() {
        let t0 = Instant::now();
        let mut l = Link::new(LinkConfig {
            role: Role::Instrument,
            ..LinkConfig::default()
        });
        assert_eq!(
            writes(&l.send_message(t0, b"H|\\^&\rL|1\r".to_vec())),
            vec![ENQ]
        );
        let a = feed(&mut l, t0, &[ENQ]);
        assert!(writes(&a).is_empty());
        assert!(a.contains(&Action::SetTimer(t0 + secs(1))));
        assert_eq!(writes(&l.on_tick(t0 + secs(1))), vec![ENQ]);
        let a = feed(&mut l, t0 + secs(1), &[ACK]);
        assert_eq!(writes(&a), encode_frame(1, b"H|\\^&\r", true));
    }

    #[test]
    fn sender_nak_to_enq_waits_ten_seconds() {
        let t0 = Instant::now();
        let mut l = link();
        assert_eq!(
            writes(&l.send_message(t0, b"H|\\^&\rL|1\r".to_vec())),
            vec![ENQ]
        );
        assert!(l.send_message(t0, b"H|\\^&\rL|2\r".to_vec()).is_empty());
        let a = feed(&mut l, t0, &[NAK]);
        assert!(writes(&a).is_empty());
        assert!(a.contains(&Action::SetTimer(t0 + secs(10))));
        assert!(writes(&l.on_tick(t0 + secs(9))).is_empty());
        assert_eq!(writes(&l.on_tick(t0 + secs(10))), vec![ENQ]);
    }

    #[test]
    fn sender_frames_retries_and_acceptance() {
        let t0 = Instant::now();
        let mut l = link();
        l.send_message(t0, b"H|\\^&\r\nP|1\nL|1|N".to_vec());
        let f1 = encode_frame(1, b"H|\\^&\r", true);
        let f2 = encode_frame(2, b"P|1\r", true);
        let f3 = encode_frame(3, b"L|1|N\r", true);
        let a = feed(&mut l, t0 + secs(1), &[ACK]);
        assert_eq!(writes(&a), f1);
        assert!(a.contains(&Action::SetTimer(t0 + secs(16))));
        assert_eq!(writes(&feed(&mut l, t0, &[ACK])), f2);
        // NAK, or anything but ACK/EOT, resends the same frame.
        assert_eq!(writes(&feed(&mut l, t0, &[NAK])), f2);
        assert_eq!(writes(&feed(&mut l, t0, b"?")), f2);
        assert_eq!(writes(&feed(&mut l, t0, &[ACK])), f3);
        let a = feed(&mut l, t0, &[ACK]);
        assert_eq!(writes(&a), vec![EOT]);
        assert!(a.contains(&Action::SentMessageAccepted));
        assert!(a.contains(&Action::CancelTimer));
        assert_eq!(l.outbox_len(), 0);
        assert!(l.is_idle());
    }

    #[test]
    fn sender_aborts_on_sixth_refusal_and_resends_in_full_later() {
        let t0 = Instant::now();
        let mut l = link();
        l.send_message(t0, b"H|\\^&\rL|1\r".to_vec());
        feed(&mut l, t0, &[ACK]);
        assert_eq!(
            writes(&feed(&mut l, t0, &[ACK])),
            encode_frame(2, b"L|1\r", true)
        );
        for _ in 0..5 {
            assert_eq!(
                writes(&feed(&mut l, t0, &[NAK])),
                encode_frame(2, b"L|1\r", true)
            );
        }
        let a = feed(&mut l, t0, &[NAK]);
        assert_eq!(writes(&a), vec![EOT]);
        assert!(a.contains(&Action::Aborted {
            reason: AbortReason::FrameRefused
        }));
        assert_eq!(l.outbox_len(), 1, "message kept");
        assert!(a.contains(&Action::SetTimer(t0 + secs(30))));
        assert_eq!(writes(&l.on_tick(t0 + secs(30))), vec![ENQ]);
        // Full resend from frame 1.
        assert_eq!(
            writes(&feed(&mut l, t0 + secs(30), &[ACK])),
            encode_frame(1, b"H|\\^&\r", true)
        );
    }

    #[test]
    fn sender_timeouts_abort_with_eot() {
        let t0 = Instant::now();
        let mut l = link();
        l.send_message(t0, b"H|\\^&\rL|1\r".to_vec());
        let a = l.on_tick(t0 + secs(15));
        assert_eq!(writes(&a), vec![EOT]);
        assert!(a.contains(&Action::Aborted {
            reason: AbortReason::EnqTimeout
        }));
        let t1 = t0 + secs(45);
        assert_eq!(writes(&l.on_tick(t1)), vec![ENQ]);
        feed(&mut l, t1, &[ACK]);
        assert!(writes(&l.on_tick(t1 + secs(14))).is_empty());
        let a = l.on_tick(t1 + secs(15));
        assert_eq!(writes(&a), vec![EOT]);
        assert!(a.contains(&Action::Aborted {
            reason: AbortReason::FrameTimeout
        }));
        assert_eq!(l.outbox_len(), 1);
    }

    #[test]
    fn sender_splits_long_records_and_wraps_frame_numbers() {
        let mut record = b"R|1|^^^X|".to_vec();
        record.extend(std::iter::repeat_n(b'7', 600));
        let mut msg = b"H|\\^&\r".to_vec();
        msg.extend_from_slice(&record);
        msg.extend_from_slice(b"\rC|1\rC|2\rC|3\rC|4\rL|1\r");
        let frames = frame_message(&msg, 240);
        // H, R in three pieces (240 + 240 + 130 with CR), C x4, L = 9 frames: numbers 1..7, 0, 1.
        assert_eq!(frames.len(), 9);
        let numbers: Vec<u8> = frames.iter().map(|f| f[1]).collect();
        assert_eq!(numbers, b"123456701".to_vec());
        let terms: Vec<u8> = frames.iter().map(|f| f[f.len() - 5]).collect();
        assert_eq!(terms, vec![ETX, ETB, ETB, ETX, ETX, ETX, ETX, ETX, ETX]);
        assert_eq!(frames[1].len(), 240 + 7);
        // Received by a Link, the message comes back intact.
        let now = Instant::now();
        let mut rx = receiving(now);
        let mut all = Vec::new();
        for f in &frames {
            all.extend(feed(&mut rx, now, f));
        }
        assert_eq!(delivered(&all), vec![(msg, true)]);
    }

    #[test]
    fn receiver_interrupt_finishes_message_then_holds_off() {
        let t0 = Instant::now();
        let mut l = link();
        l.send_message(t0, b"H|\\^&\rP|1\rL|1\r".to_vec());
        l.send_message(t0, b"H|\\^&\rL|2\r".to_vec());
        feed(&mut l, t0, &[ACK]);
        // EOT to frame 1: accepted, an interrupt request; we finish this message.
        let a = feed(&mut l, t0, &[EOT]);
        assert!(warnings(&a).contains(&LinkWarning::ReceiverInterrupt));
        assert_eq!(writes(&a), encode_frame(2, b"P|1\r", true));
        feed(&mut l, t0, &[ACK]);
        let t1 = t0 + secs(2);
        let a = feed(&mut l, t1, &[ACK]);
        assert_eq!(writes(&a), vec![EOT]);
        assert!(a.contains(&Action::SentMessageAccepted));
        // The next message waits 15 s.
        assert!(a.contains(&Action::SetTimer(t1 + secs(15))));
        assert!(writes(&l.on_tick(t1 + secs(14))).is_empty());
        assert_eq!(writes(&l.on_tick(t1 + secs(15))), vec![ENQ]);
    }

    #[test]
    fn outgoing_message_with_restricted_bytes_is_refused() {
        let now = Instant::now();
        let mut l = link();
        let a = l.send_message(now, b"H|\\^&\x02\rL|1\r".to_vec());
        assert_eq!(warnings(&a), vec![LinkWarning::OutgoingRejected]);
        let a = l.send_message(now, b"\r\n".to_vec());
        assert_eq!(warnings(&a), vec![LinkWarning::OutgoingRejected]);
        assert_eq!(l.outbox_len(), 0);
    }

    /// A byte pipe between two links with scripted faults, on a virtual clock.
    struct Sim {
        analyser: Link,
        host: Link,
        now: Instant,
        /// Bytes written by each side, not yet read by the other: (to_host, to_analyser).
        to_host: Vec<u8>,
        to_analyser: Vec<u8>,
        delivered: Vec<(Vec<u8>, bool)>,
        host_warnings: Vec<LinkWarning>,
        accepted: usize,
        aborted: usize,
        /// ACKs written by the host so far (to pick which one to spoil).
        host_acks: usize,
        /// Frame bytes written by the analyser so far (to pick which one to corrupt).
        analyser_bytes: usize,
        spoil_ack: Option<(usize, Option<u8>)>,
        corrupt_byte: Option<usize>,
    }

    impl Sim {
        fn new(now: Instant) -> Self {
            Sim {
                analyser: Link::new(LinkConfig {
                    role: Role::Instrument,
                    ..LinkConfig::default()
                }),
                host: link(),
                now,
                to_host: Vec::new(),
                to_analyser: Vec::new(),
                delivered: Vec::new(),
                host_warnings: Vec::new(),
                accepted: 0,
                aborted: 0,
                host_acks: 0,
                analyser_bytes: 0,
                spoil_ack: None,
                corrupt_byte: None,
            }
        }

        fn analyser_actions(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Write(bytes) => {
                        for mut b in bytes {
                            if Some(self.analyser_bytes) == self.corrupt_byte {
                                b ^= 0x20;
                            }
                            self.analyser_bytes += 1;
                            self.to_host.push(b);
                        }
                    }
                    Action::SentMessageAccepted => self.accepted += 1,
                    Action::Aborted { .. } => self.aborted += 1,
                    _ => {}
                }
            }
        }

        fn host_actions(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Write(bytes) => {
                        for b in bytes {
                            if b == ACK {
                                self.host_acks += 1;
                                if let Some((n, replacement)) = self.spoil_ack
                                    && n == self.host_acks
                                {
                                    // Dropped (None) or garbled into another byte.
                                    self.to_analyser.extend(replacement);
                                    continue;
                                }
                            }
                            self.to_analyser.push(b);
                        }
                    }
                    Action::Deliver { message, complete } => {
                        self.delivered.push((message, complete));
                        if complete {
                            let r = self.host.on_store_result(self.now, true);
                            self.host_actions(r);
                        }
                    }
                    Action::Warning(w) => self.host_warnings.push(w),
                    _ => {}
                }
            }
        }

        /// Run until both links are idle with nothing queued, or the step limit.
        fn run(&mut self) {
            for _ in 0..100_000 {
                if !self.to_host.is_empty() {
                    let b = self.to_host.remove(0);
                    let a = self.host.on_bytes(self.now, &[b]);
                    self.host_actions(a);
                } else if !self.to_analyser.is_empty() {
                    let b = self.to_analyser.remove(0);
                    let a = self.analyser.on_bytes(self.now, &[b]);
                    self.analyser_actions(a);
                } else {
                    let next = [self.analyser.next_deadline(), self.host.next_deadline()]
                        .into_iter()
                        .flatten()
                        .min();
                    let Some(next) = next else {
                        return;
                    };
                    self.now = self.now.max(next);
                    let a = self.analyser.on_tick(self.now);
                    self.analyser_actions(a);
                    let a = self.host.on_tick(self.now);
                    self.host_actions(a);
                }
            }
            panic!("simulation did not settle");
        }
    }

    fn sample_messages() -> Vec<Vec<u8>> {
        (1..=3)
            .map(|i| {
                let mut m = format!(
                    "H|\\^&|||CHEMSIM^1.0|||||||P|LIS2-A2|2024060{i}120000\r\
                     P|1||999000001{i}||TEST^PATIENT\r\
                     O|1|S{i}||^^^GLU\\^^^NA|R\r"
                );
                for r in 1..=4 {
                    m.push_str(&format!("R|{r}|^^^T{r}|{i}.{r}|mmol/L||N||F\r"));
                }
                // A long comment so that one record spans several frames.
                m.push_str(&format!("C|1|I|{}|G\r", "x".repeat(500)));
                m.push_str("L|1|N\r");
                m.into_bytes()
            })
            .collect()
    }

    #[test]
    fn two_links_over_a_lossy_pipe_deliver_each_message_once() {
        let msgs = sample_messages();
        let t0 = Instant::now();
        let mut sim = Sim::new(t0);
        // The 3rd ACK the host writes is garbled into a NUL (the analyser sees a refusal and
        // resends the frame; the host recognises the repeat), and one byte inside the 40th
        // analyser byte (inside a frame) is corrupted (bad checksum, NAK, resend).
        sim.spoil_ack = Some((3, Some(0x00)));
        sim.corrupt_byte = Some(40);
        for m in &msgs {
            let a = sim.analyser.send_message(t0, m.clone());
            sim.analyser_actions(a);
        }
        sim.run();
        assert_eq!(sim.accepted, 3);
        assert_eq!(sim.aborted, 0);
        let got: Vec<(Vec<u8>, bool)> = msgs.iter().map(|m| (m.clone(), true)).collect();
        assert_eq!(sim.delivered, got);
        assert!(sim.analyser.is_idle() && sim.host.is_idle());
        // Both faults really happened.
        assert!(
            sim.host_warnings
                .contains(&LinkWarning::DuplicateFrame { frame_number: 2 })
        );
        assert!(sim.host_warnings.contains(&LinkWarning::FrameRefused {
            frame_number: Some(1),
            fault: FrameFault::Checksum
        }));
    }

    #[test]
    fn a_dropped_ack_mid_message_aborts_and_the_resend_is_delivered_once_complete() {
        let msgs = sample_messages();
        let t0 = Instant::now();
        let mut sim = Sim::new(t0);
        // The 4th ACK (to an intermediate frame) vanishes: the analyser times out, sends EOT
        // (the host stores the partial, flagged incomplete) and later resends the whole message.
        sim.spoil_ack = Some((4, None));
        let a = sim.analyser.send_message(t0, msgs[0].clone());
        sim.analyser_actions(a);
        sim.run();
        assert_eq!(sim.aborted, 1);
        assert_eq!(sim.accepted, 1);
        let complete: Vec<_> = sim.delivered.iter().filter(|(_, c)| *c).collect();
        assert_eq!(complete.len(), 1);
        assert_eq!(complete[0].0, msgs[0]);
        let partial: Vec<_> = sim.delivered.iter().filter(|(_, c)| !*c).collect();
        assert_eq!(partial.len(), 1);
        assert!(msgs[0].starts_with(&partial[0].0));
    }

    #[test]
    fn a_dropped_final_ack_means_the_message_is_delivered_twice() {
        // Inherent to E1381: the analyser cannot tell a lost final ACK from a lost frame.
        // Downstream must tolerate (or de-duplicate) a repeated complete message.
        let msgs = sample_messages();
        let t0 = Instant::now();
        let mut sim = Sim::new(t0);
        let frames = frame_message(&msgs[0], 240).len();
        // ACK #1 answers the ENQ; the final frame's ACK is number frames + 1.
        sim.spoil_ack = Some((frames + 1, None));
        let a = sim.analyser.send_message(t0, msgs[0].clone());
        sim.analyser_actions(a);
        sim.run();
        let complete = sim.delivered.iter().filter(|(_, c)| *c).count();
        assert_eq!(complete, 2);
        assert_eq!(sim.accepted, 1);
    }

    /// xorshift64* pseudo-random generator for the never-panics loops.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn never_panics_on_random_bytes() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let alphabet = [
            ENQ, ACK, NAK, EOT, STX, ETX, ETB, CR, LF, b'0', b'1', b'7', b'H', b'L', b'|', b'A',
            b'F',
        ];
        let t0 = Instant::now();
        for round in 0..3000u64 {
            let cfg = LinkConfig {
                role: if round % 2 == 0 {
                    Role::Computer
                } else {
                    Role::Instrument
                },
                lenient: round % 3 == 0,
                max_frame_text: (round % 50) as usize,
                max_message_len: 300,
                ..LinkConfig::default()
            };
            let mut l = Link::new(cfg);
            let mut now = t0;
            if round % 5 == 0 {
                l.send_message(now, b"H|\\^&\rL|1\r".to_vec());
            }
            let len = (rng.next() % 200) as usize;
            for _ in 0..len {
                let r = rng.next();
                let b = if r.is_multiple_of(3) {
                    (r >> 8) as u8
                } else {
                    alphabet[(r >> 8) as usize % alphabet.len()]
                };
                let acts = l.on_bytes(now, &[b]);
                if r.is_multiple_of(7) {
                    for a in &acts {
                        if let Action::Deliver { complete: true, .. } = a {
                            l.on_store_result(now, r.is_multiple_of(2));
                        }
                    }
                }
                if r.is_multiple_of(11) {
                    now += Duration::from_millis((r >> 16) % 40_000);
                    l.on_tick(now);
                }
                if r.is_multiple_of(97) {
                    l.send_message(now, vec![(r >> 24) as u8; 3]);
                }
            }
            // Valid frames with random corruption.
            let mut msg = encode_frame((rng.next() % 8) as u8, b"H|\\^&\rL|1\r", true);
            let i = (rng.next() as usize) % msg.len();
            msg[i] = rng.next() as u8;
            l.on_bytes(now, &msg);
        }
    }
}
