//! An emulated ASTM analyser on the master side of a real pty.

use std::time::{Duration, Instant};

use siterelay::astm::link::{self, Action, Link, LinkConfig, Role};
use siterelay_testkit::pty::Pty;

/// The crate's own ASTM link state machine in the instrument role, driving a real pty.
/// `corrupt` damages the n-th frame written (once), so the receiver must NAK it and the
/// analyser must resend it. Answers every byte the receiver sent back.
pub fn analyser_send(pty: &mut Pty, message: &[u8], corrupt: Option<usize>) -> Vec<u8> {
    let mut link = Link::new(LinkConfig {
        role: Role::Instrument,
        ..LinkConfig::default()
    });
    let mut seen = Vec::new();
    let mut frames_written = 0usize;
    let mut corrupt = corrupt;
    let mut deadline: Option<Instant> = None;
    let mut actions = link.send_message(Instant::now(), message.to_vec());
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        for a in std::mem::take(&mut actions) {
            match a {
                Action::Write(mut bytes) => {
                    if bytes.first() == Some(&link::STX) {
                        frames_written += 1;
                        if corrupt == Some(frames_written) {
                            bytes[3] ^= 0x20; // flip a bit in the text: checksum no longer matches
                            corrupt = None;
                        }
                    }
                    pty.write(&bytes).unwrap();
                }
                Action::SetTimer(t) => deadline = Some(t),
                Action::CancelTimer => deadline = None,
                Action::SentMessageAccepted => return seen,
                Action::Aborted { reason } => panic!("analyser gave up: {reason:?}"),
                _ => {}
            }
        }
        assert!(Instant::now() < give_up, "message not accepted in 30 s");
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        let got = pty.read_timeout(wait).unwrap();
        if !got.is_empty() {
            seen.extend_from_slice(&got);
            actions = link.on_bytes(Instant::now(), &got);
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            actions = link.on_tick(Instant::now());
        }
    }
}
