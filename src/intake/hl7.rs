//! HL7 v2 messages, from MLLP connections and serial ports, and quarantined messages retried:
//! decide, store or quarantine, count, add to the inventory, answer.
//!
//! Per message: [`FeedIntake::decide`] runs the pure checks and says what to do; storing is one
//! append (the outbox's writer commits it, fsynced, possibly together with other appends);
//! [`FeedIntake::finish`] turns the append's result into the answer. A batch frame
//! (`FHS`/`BHS`) is split and every message in it goes through the same steps; all of its
//! appends are committed before the one batch acknowledgement goes out.

use std::sync::atomic::Ordering::Relaxed;

use tracing::{info, warn};

use super::FeedIntake;
use crate::hl7::ack::AckError;
use crate::hl7::charset::Charset;
use crate::hl7::header::Header;
use crate::hl7::intake::{self, Intake};
use crate::inventory::{Hl7Facts, segment_ids};
use crate::outbox::{AppendError, Format, NewMessage, QuarantinedRow, SourceKind};
use crate::telemetry::mllp as event;

/// The text of the `AR` when the store could not take a message (or its quarantine entry).
pub(super) fn refusal_text(e: &AppendError) -> &'static str {
    match e {
        AppendError::Full { .. } => "store full: message not accepted, resend later",
        AppendError::Failed(_) => "store failure: message not accepted, resend later",
        AppendError::Closed => "siterelay is shutting down: resend later",
    }
}

/// A message that passed every check: what answering it needs once it is appended.
struct ToStore {
    header: Box<Header>,
    size: usize,
    segments: Vec<[u8; 3]>,
    received_at_us: i64,
}

/// What to do with one message, decided before anything is written.
enum Decision {
    /// Unusable content: quarantine it and answer `AE`/`CE` (None: MSH-15 asked for none).
    Reject {
        ack: Option<Vec<u8>>,
        reason: String,
        error: AckError,
        header: Option<Box<Header>>,
    },
    /// Not taken (the feed's policy, or shutting down): answer `AR`/`CR`, store nothing.
    Refuse {
        ack: Option<Vec<u8>>,
        control_id: String,
        why: String,
    },
    /// The feed's policy says acknowledge and drop.
    Ignore {
        ack: Option<Vec<u8>>,
        control_id: String,
    },
    /// Store it, then answer with [`FeedIntake::finish`].
    Store(Box<ToStore>, NewMessage),
}

/// The answer to one message of a frame, and whether the sender may count it as accepted.
struct Answer {
    ack: Option<Vec<u8>>,
    /// Accepted in the sender's eyes (stored, a duplicate, or ignored by policy): not listed in
    /// a batch acknowledgement.
    accepted: bool,
}

/// What a quarantine retry did with one message (`siterelay queue rejected retry`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetryOutcome {
    /// Quarantine id.
    pub id: i64,
    /// Stored as an ordinary message (and removed from quarantine).
    pub stored: bool,
    /// Its new `seq`, when stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why not, when not stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FeedIntake {
    /// Decide, store and answer one HL7 message, or every message of a batch frame
    /// (`FHS`/`BHS`). Returns the acknowledgement to send (unframed), for the caller to write
    /// only now, after the commit; None when the message's MSH-15 asks for none in this case.
    pub async fn receive_hl7(
        &self,
        msg: Vec<u8>,
        peer: &str,
        shutting_down: bool,
    ) -> Option<Vec<u8>> {
        self.receive_hl7_from(msg, peer, None, shutting_down).await
    }

    /// [`FeedIntake::receive_hl7`] for a sender that presented a client certificate: its
    /// subject is stored with the message (the record's `source.certificate`).
    pub async fn receive_hl7_from(
        &self,
        msg: Vec<u8>,
        peer: &str,
        certificate: Option<&str>,
        shutting_down: bool,
    ) -> Option<Vec<u8>> {
        if crate::hl7::batch::is_batch(&msg) {
            return Some(
                self.receive_batch(msg, peer, certificate, shutting_down)
                    .await,
            );
        }
        let received_at_us = self.outbox.clock().now_us();
        match self.decide(&msg, received_at_us, shutting_down) {
            Decision::Store(p, new) => {
                let new = NewMessage {
                    peer: Some(peer.to_string()),
                    peer_certificate: certificate.map(str::to_string),
                    raw: msg,
                    ..new
                };
                let result = self.outbox.append(new).await;
                self.finish(&p, result).ack
            }
            other => self.settle(other, msg, peer, received_at_us).await.ack,
        }
    }

    /// Answer `AR` to a message that is not looked at (its sender is over its rate): the
    /// answer names the reason; nothing is stored. None when its MSH-15 asks for no answer.
    pub fn refuse_unread(&self, msg: &[u8], peer: &str, text: &str) -> Option<Vec<u8>> {
        event::rate_limited(&self.counters, &self.name, peer, msg.len(), text);
        match crate::hl7::header::parse_header(msg) {
            Ok(h) => intake::answer_refused(&h, text),
            Err(_) => Some(crate::hl7::ack::minimal_nak(
                crate::hl7::ack::AckCode::AR,
                text,
                Some(&AckError {
                    sequence: 1,
                    code: 207,
                    location: None,
                    text: text.to_string(),
                }),
                &intake::next_ack_control_id(),
                jiff::ZonedDateTime::now(),
                &self.responder.application,
                &self.responder.facility,
            )),
        }
    }

    /// Carries out a decision that stores nothing: quarantine (committed before the answer),
    /// or count the refusal or the ignored message.
    async fn settle(&self, d: Decision, msg: Vec<u8>, peer: &str, received_at_us: i64) -> Answer {
        match d {
            Decision::Reject {
                ack,
                reason,
                error,
                header,
            } => {
                let ack = self
                    .quarantine(msg, peer, received_at_us, &reason, &error, header, ack)
                    .await;
                Answer {
                    ack,
                    accepted: false,
                }
            }
            Decision::Refuse {
                ack,
                control_id,
                why,
            } => {
                event::refused(&self.counters, &self.name, &control_id, msg.len(), &why);
                Answer {
                    ack,
                    accepted: false,
                }
            }
            Decision::Ignore { ack, control_id } => {
                self.counters.ignored.fetch_add(1, Relaxed);
                tracing::debug!(feed = %self.name, %control_id, "not accepted by this feed's policy: acknowledged and dropped");
                Answer {
                    ack,
                    accepted: true,
                }
            }
            Decision::Store(..) => unreachable!("stored messages are not settled"),
        }
    }

    /// The checks, in the contract's order: MSH, separators, one message per frame, character
    /// set (all in `crate::hl7::intake::assess`), the feed's policy, required segments, then
    /// whether we are shutting down. Writes and counts nothing: that is the caller's
    /// ([`FeedIntake::settle`] or an append). The returned [`NewMessage`] has no peer and no
    /// bytes yet (the caller owns them).
    fn decide(&self, msg: &[u8], received_at_us: i64, shutting_down: bool) -> Decision {
        let size = msg.len();
        let header = match intake::assess(
            msg,
            self.default_charset,
            self.policy.strict,
            &self.responder,
        ) {
            Intake::Store(h) => h,
            Intake::Reject {
                ack,
                reason,
                error,
                header,
            } => {
                return Decision::Reject {
                    ack,
                    reason,
                    error,
                    header,
                };
            }
        };
        match intake::check_policy(&header, &self.policy) {
            intake::Verdict::Accept => {}
            intake::Verdict::Ignore => {
                return Decision::Ignore {
                    ack: intake::answer_stored(&header),
                    control_id: header.control_id.clone(),
                };
            }
            intake::Verdict::Refuse(err) => {
                return Decision::Refuse {
                    ack: intake::answer(&header, intake::Outcome::Refused(&err)),
                    control_id: header.control_id.clone(),
                    why: err.text,
                };
            }
        }
        let segments = segment_ids(msg);
        if let Some(error) = intake::missing_from(&header, &segments) {
            let ack = intake::answer(&header, intake::Outcome::Rejected(&error));
            return Decision::Reject {
                ack,
                reason: error.text.clone(),
                error,
                header: Some(header),
            };
        }
        if shutting_down {
            return Decision::Refuse {
                ack: intake::answer_refused(&header, "siterelay is shutting down: resend later"),
                control_id: header.control_id.clone(),
                why: "shutting down".into(),
            };
        }
        let dedup = self.dedup_window.map(|w| crate::outbox::DedupKey {
            sender: format!(
                "{}|{}",
                header.sending_application_raw, header.sending_facility_raw
            ),
            control_id: header.control_id.clone(),
            hash: crate::outbox::hl7_content_hash(msg),
            window_us: w.as_micros() as i64,
        });
        let new = NewMessage {
            feed: self.name.clone(),
            source_kind: self.source_kind,
            peer: None,
            peer_certificate: None,
            format: Format::Hl7v2,
            control_id: Some(header.control_id.clone()),
            raw: Vec::new(),
            received_at_us,
            reprocessed: false,
            dedup,
            truncated_bytes: 0,
        };
        Decision::Store(
            Box::new(ToStore {
                header,
                size,
                segments,
                received_at_us,
            }),
            new,
        )
    }

    /// What the append's result means for the sender; a stored message is counted and added
    /// to the inventory.
    fn finish(&self, p: &ToStore, result: Result<crate::outbox::Stored, AppendError>) -> Answer {
        let (header, size) = (&*p.header, p.size);
        let feed = &*self.name;
        let c = &*self.counters;
        match result {
            Ok(stored) if stored.duplicate => {
                c.duplicates.fetch_add(1, Relaxed);
                tracing::info!(feed, control_id = %header.control_id, seq = stored.seq, "duplicate resend acknowledged again, not forwarded twice");
                Answer {
                    ack: intake::answer_stored(header),
                    accepted: true,
                }
            }
            Ok(stored) => {
                event::stored(c, feed, &header.control_id, stored.seq, size);
                let charset = header
                    .charset
                    .as_deref()
                    .and_then(Charset::from_msh18)
                    .unwrap_or(self.default_charset);
                self.inventory.observe_hl7(
                    &Hl7Facts {
                        message_type: &header.message_type,
                        trigger: header.trigger_event.as_deref(),
                        version: &header.version,
                        sending_application: header.sending_application.as_deref(),
                        sending_facility: header.sending_facility.as_deref(),
                        receiving_application: header.receiving_application.as_deref(),
                        receiving_facility: header.receiving_facility.as_deref(),
                        charset: charset.charset_name(),
                    },
                    &p.segments,
                    size,
                    p.received_at_us,
                );
                Answer {
                    ack: intake::answer_stored(header),
                    accepted: true,
                }
            }
            Err(e) => {
                let text = refusal_text(&e);
                event::refused(c, feed, &header.control_id, size, &e.to_string());
                Answer {
                    ack: intake::answer_refused(header, text),
                    accepted: false,
                }
            }
        }
    }

    /// A batch frame: every message is checked and stored on its own (its own `seq`, its own
    /// quarantine entry when rejected); all appends are committed before the one batch
    /// acknowledgement goes out, which lists the messages that were not accepted.
    async fn receive_batch(
        &self,
        frame: Vec<u8>,
        peer: &str,
        certificate: Option<&str>,
        shutting_down: bool,
    ) -> Vec<u8> {
        let feed = &*self.name;
        let size = frame.len();
        let batch = match crate::hl7::batch::split(&frame) {
            Ok(b) => b,
            Err(e) => {
                let error = e.ack_error();
                let reason = format!("batch: {e}");
                let nak = crate::hl7::ack::minimal_nak(
                    crate::hl7::ack::AckCode::AE,
                    &error.text,
                    Some(&error),
                    &intake::next_ack_control_id(),
                    jiff::ZonedDateTime::now(),
                    &self.responder.application,
                    &self.responder.facility,
                );
                return self
                    .quarantine(
                        frame,
                        peer,
                        self.outbox.clock().now_us(),
                        &reason,
                        &error,
                        None,
                        Some(nak),
                    )
                    .await
                    .unwrap_or_default();
            }
        };
        let count: usize = batch.groups.iter().map(|g| g.messages.len()).sum();
        if count > self.max_batch_messages {
            return self.refuse_large_batch(size, peer, count);
        }
        // Its turn among the batches of every feed (`BATCHES_AT_ONCE`): what follows holds every
        // message of it in memory until the one commit. The semaphore is never closed.
        let _turn = self.batch_permits.acquire().await;
        for note in &batch.notes {
            warn!(
                feed,
                peer, note, "batch irregularity (messages still handled)"
            );
        }
        // Check every message first, then write them all at once: the rejected ones to
        // quarantine in one transaction, the accepted ones appended (queued in order, so seq
        // follows the batch order) into the same or the next commit.
        enum Slot {
            Store(Box<ToStore>),
            Quarantine(Box<super::quarantine::ToQuarantine>),
            Done(Answer),
        }
        let mut slots: Vec<(usize, Slot)> = Vec::with_capacity(count);
        let mut to_store = Vec::with_capacity(count);
        let mut to_quarantine = Vec::new();
        for (g, group) in batch.groups.iter().enumerate() {
            for range in &group.messages {
                let msg = frame[range.clone()].to_vec();
                let received_at_us = self.outbox.clock().now_us();
                match self.decide(&msg, received_at_us, shutting_down) {
                    Decision::Store(p, new) => {
                        to_store.push(NewMessage {
                            peer: Some(peer.to_string()),
                            peer_certificate: certificate.map(str::to_string),
                            raw: msg,
                            ..new
                        });
                        slots.push((g, Slot::Store(p)));
                    }
                    Decision::Reject {
                        ack,
                        reason,
                        error,
                        header,
                    } => {
                        let (entry, q) = self.to_quarantine(
                            msg,
                            peer,
                            received_at_us,
                            &reason,
                            &error,
                            header,
                            ack,
                        );
                        to_quarantine.push(entry);
                        slots.push((g, Slot::Quarantine(Box::new(q))));
                    }
                    other => {
                        let answer = self.settle(other, msg, peer, received_at_us).await;
                        slots.push((g, Slot::Done(answer)));
                    }
                }
            }
        }
        let (kept, stored) = self
            .outbox
            .quarantine_and_append(to_quarantine, to_store)
            .await;
        let (mut kept, mut stored) = (kept.into_iter(), stored.into_iter());
        let mut acks: Vec<Vec<Vec<u8>>> = vec![Vec::new(); batch.groups.len()];
        let (mut accepted, mut not_accepted) = (0usize, 0usize);
        for (g, slot) in slots {
            let a = match slot {
                Slot::Done(done) => done,
                Slot::Store(p) => {
                    self.finish(&p, stored.next().unwrap_or(Err(AppendError::Closed)))
                }
                Slot::Quarantine(q) => Answer {
                    ack: self.quarantined(*q, kept.next().unwrap_or(Err(AppendError::Closed))),
                    accepted: false,
                },
            };
            if a.accepted {
                accepted += 1;
            } else {
                not_accepted += 1;
                acks[g].extend(a.ack);
            }
        }
        info!(
            feed,
            peer,
            bytes = size,
            messages = accepted + not_accepted,
            accepted,
            not_accepted,
            "batch handled"
        );
        crate::hl7::ack::build_batch_ack(
            &batch,
            &acks,
            jiff::ZonedDateTime::now(),
            intake::next_ack_control_id,
        )
    }

    /// A batch of more than `max_batch_messages` messages: `AE`, nothing of it stored or
    /// quarantined (its bytes would multiply into records and quarantine entries).
    fn refuse_large_batch(&self, size: usize, peer: &str, count: usize) -> Vec<u8> {
        let text = format!(
            "batch of {count} messages exceeds this feed's limit of {}: nothing of it was stored; send smaller batches",
            self.max_batch_messages
        );
        self.counters.batches_too_large.fetch_add(1, Relaxed);
        event::rejected(&self.counters, &self.name, peer, size, &text);
        let error = AckError {
            sequence: 1,
            code: 207,
            location: None,
            text: text.clone(),
        };
        crate::hl7::ack::minimal_nak(
            crate::hl7::ack::AckCode::AE,
            &text,
            Some(&error),
            &intake::next_ack_control_id(),
            jiff::ZonedDateTime::now(),
            &self.responder.application,
            &self.responder.facility,
        )
    }

    /// Passes a quarantined message through the same checks again with this feed's current
    /// settings. One that now passes is stored as an ordinary message (new `seq`,
    /// `"reprocessed": true`, counted and added to the inventory like any other) and leaves the
    /// quarantine; one that still fails stays there, unchanged and not counted again.
    pub async fn retry(&self, row: &QuarantinedRow) -> RetryOutcome {
        let not_stored = |error: String| RetryOutcome {
            id: row.id,
            stored: false,
            seq: None,
            error: Some(error),
        };
        let (p, new) = match self.decide(&row.raw, row.received_at_us, false) {
            Decision::Store(p, new) => (p, new),
            Decision::Reject { reason, .. } => return not_stored(reason),
            Decision::Refuse { .. } | Decision::Ignore { .. } => {
                return not_stored(
                    "not accepted by the feed's policy (accept / processing_ids)".into(),
                );
            }
        };
        let new = NewMessage {
            source_kind: if row.source_kind == "serial" {
                SourceKind::Serial
            } else {
                SourceKind::Mllp
            },
            peer: row.peer.clone(),
            raw: row.raw.clone(),
            reprocessed: true,
            dedup: None,
            ..new
        };
        let result = self.outbox.append(new).await;
        let stored = result.as_ref().ok().map(|s| s.seq);
        let error = result.as_ref().err().map(|e| e.to_string());
        self.finish(&p, result);
        match (stored, error) {
            (Some(seq), _) => {
                let _ = self.outbox.forget_rejected(row.id).await;
                tracing::info!(feed = %row.feed, quarantine_id = row.id, seq, "quarantined message reprocessed");
                RetryOutcome {
                    id: row.id,
                    stored: true,
                    seq: Some(seq),
                    error: None,
                }
            }
            (None, e) => not_stored(e.unwrap_or_default()),
        }
    }
}
