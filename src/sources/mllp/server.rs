//! MLLP listener: accepts connections for one feed and carries out what the framer and the intake
//! decide. Owns the sockets; owns no protocol logic.
//!
//! Per connection, messages are handled strictly in order: frame -> assess -> commit to the
//! outbox -> ACK. The ACK for a message is written only after the transaction holding it has
//! committed. On shutdown the listener stops accepting at once; a connection finishes the message
//! it is committing, answers `AR` to any further frame it already holds, and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::hl7::charset::Charset;
use crate::hl7::intake::{self, Intake, Responder};
use crate::inventory::{FeedInventory, Hl7Facts, segment_ids};
use crate::outbox::{AppendError, Format, NewMessage, Outbox, SourceKind, now_us};
use crate::sources::mllp::framing::{FrameEvent, Framer, encode};
use crate::telemetry::{FeedCounters, mllp as event};

/// Read buffer per connection.
const READ_CHUNK: usize = 64 * 1024;
/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a connection of one feed needs.
pub struct FeedContext {
    /// Feed name.
    pub name: Arc<str>,
    /// Largest message.
    pub max_message_bytes: u64,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Charset assumed when MSH-18 is empty.
    pub default_charset: Charset,
    /// Identity in minimal NAKs.
    pub responder: Responder,
    /// Counters.
    pub counters: Arc<FeedCounters>,
    /// What the feed carries (learned from traffic).
    pub inventory: Arc<FeedInventory>,
    /// Where messages go.
    pub outbox: Outbox,
    /// TLS, when configured.
    pub tls: Option<TlsAcceptor>,
    /// Reject notices for the sink, when `records.publish_rejects` is on.
    pub rejects: Option<mpsc::Sender<RejectNotice>>,
    /// Which message types and processing ids the feed takes.
    pub policy: intake::Policy,
    /// Resends within this window are recognised (None: off).
    pub dedup_window: Option<Duration>,
}

/// A bound listener, ready to serve.
pub struct MllpListener {
    listener: TcpListener,
    limit: Arc<Semaphore>,
    ctx: Arc<FeedContext>,
}

impl MllpListener {
    /// Bind the feed's address (done before READY=1 so a bad address fails start-up).
    pub async fn bind(
        addr: SocketAddr,
        max_connections: usize,
        ctx: FeedContext,
    ) -> std::io::Result<MllpListener> {
        let listener = TcpListener::bind(addr).await?;
        info!(feed = %ctx.name, addr = %listener.local_addr()?, tls = ctx.tls.is_some(), "listening");
        Ok(MllpListener {
            listener,
            limit: Arc::new(Semaphore::new(max_connections)),
            ctx: Arc::new(ctx),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept until `shutdown` turns true, then wait for every connection to finish.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        loop {
            // Take a connection slot before accepting: beyond the cap, peers wait in the backlog.
            let permit = tokio::select! {
                p = self.limit.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            // Reap finished connection tasks so the set does not grow.
            while conns.try_join_next().is_some() {}
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let ctx = self.ctx.clone();
                    let shutdown = shutdown.clone();
                    conns.spawn(async move {
                        let _permit = permit;
                        match &ctx.tls {
                            None => connection(stream, peer, &ctx, shutdown).await,
                            Some(acc) => {
                                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acc.accept(stream))
                                    .await
                                {
                                    Ok(Ok(tls)) => connection(tls, peer, &ctx, shutdown).await,
                                    Ok(Err(e)) => {
                                        warn!(feed = %ctx.name, %peer, error = %e, "TLS handshake failed")
                                    }
                                    Err(_) => {
                                        warn!(feed = %ctx.name, %peer, "TLS handshake timed out")
                                    }
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    error!(feed = %self.ctx.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(self.listener);
        while conns.join_next().await.is_some() {}
        info!(feed = %self.ctx.name, "listener stopped");
    }
}

/// Serve one connection until EOF, idle timeout, an error, or shutdown.
async fn connection<S>(
    mut stream: S,
    peer: SocketAddr,
    ctx: &FeedContext,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let feed = &*ctx.name;
    let peer_s = peer.to_string();
    let c = &*ctx.counters;
    event::connection_opened(c, feed, &peer_s);
    let mut framer = Framer::new(ctx.max_message_bytes as usize);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut handled = 0u64;
    let why: &str = 'conn: loop {
        while let Some(ev) = framer.next_event() {
            match ev {
                FrameEvent::Message(msg) => {
                    let stopping = *shutdown.borrow();
                    let ack = handle_message(msg, &peer_s, &ctx.target(), stopping).await;
                    handled += 1;
                    let Some(ack) = ack else { continue };
                    if let Err(e) =
                        write_with_timeout(&mut stream, &encode(&ack), ctx.idle_timeout).await
                    {
                        warn!(feed, peer = %peer_s, error = %e, "could not write ACK");
                        break 'conn "write failed";
                    }
                }
                FrameEvent::Discarded { bytes } => event::discarded(c, feed, &peer_s, bytes),
                FrameEvent::Abandoned { bytes } => {
                    event::incomplete(c, feed, &peer_s, bytes, "new start block inside a frame")
                }
                FrameEvent::TooLarge { head, seen } => {
                    event::oversized(c, feed, &peer_s, seen, ctx.max_message_bytes);
                    c.ack_ae.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let nak =
                        intake::answer_oversized(&head, ctx.max_message_bytes, &ctx.responder);
                    let _ = write_with_timeout(&mut stream, &encode(&nak), Duration::from_secs(2))
                        .await;
                    break 'conn "frame too large";
                }
            }
        }
        let stopping = *shutdown.borrow();
        if stopping {
            break "shutting down";
        }
        let read = tokio::select! {
            r = tokio::time::timeout(ctx.idle_timeout, stream.read(&mut buf)) => r,
            _ = shutdown.wait_for(|s| *s) => break "shutting down",
        };
        match read {
            Ok(Ok(0)) => {
                match framer.finish() {
                    Some(FrameEvent::Abandoned { bytes }) => event::incomplete(
                        c,
                        feed,
                        &peer_s,
                        bytes,
                        "connection closed before the end block",
                    ),
                    Some(FrameEvent::Discarded { bytes }) => {
                        event::discarded(c, feed, &peer_s, bytes)
                    }
                    _ => {}
                }
                break "closed by peer";
            }
            Ok(Ok(n)) => framer.push(&buf[..n]),
            Ok(Err(e)) => {
                warn!(feed, peer = %peer_s, error = %e, "read failed");
                break "read error";
            }
            Err(_) => {
                if framer.in_frame() {
                    event::incomplete(
                        c,
                        feed,
                        &peer_s,
                        framer.buffered_bytes(),
                        "idle timeout inside a frame",
                    );
                }
                break "idle timeout";
            }
        }
    };
    let _ = stream.shutdown().await;
    event::connection_closed(c, feed, &peer_s, handled, why);
}

async fn write_with_timeout<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(limit, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer did not read the ACK",
        )),
    }
}

/// Assess, store and answer one message. Returns the ACK to send (unframed).
/// What storing an HL7 message needs, from an MLLP listener or a serial port.
pub struct Hl7Target<'a> {
    /// Feed name.
    pub name: &'a Arc<str>,
    /// `mllp` or `serial`.
    pub source_kind: SourceKind,
    /// Charset assumed when MSH-18 is empty.
    pub default_charset: Charset,
    /// Identity in minimal NAKs.
    pub responder: &'a Responder,
    /// Counters.
    pub counters: &'a FeedCounters,
    /// Inventory.
    pub inventory: &'a FeedInventory,
    /// Where messages go.
    pub outbox: &'a Outbox,
    /// Metadata-only notices of rejected messages, when `records.publish_rejects` is on.
    pub rejects: Option<&'a mpsc::Sender<RejectNotice>>,
    /// Which message types and processing ids the feed takes.
    pub policy: &'a intake::Policy,
    /// Resends within this window are recognised (None: off).
    pub dedup_window: Option<Duration>,
}

/// A rejected message, as the central side may be told about it (no content).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RejectNotice {
    /// Feed name.
    pub feed: String,
    /// When it was received (RFC 3339).
    pub at: String,
    /// Quarantine id on the appliance.
    pub quarantine_id: i64,
    /// MSH-3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending_application: Option<String>,
    /// MSH-4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending_facility: Option<String>,
    /// `TYPE^TRIGGER`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// HL7 table 0357 code.
    pub error_code: u16,
    /// Segment-field, e.g. `MSH-10`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_location: Option<String>,
}

impl FeedContext {
    fn target(&self) -> Hl7Target<'_> {
        Hl7Target {
            name: &self.name,
            source_kind: SourceKind::Mllp,
            default_charset: self.default_charset,
            responder: &self.responder,
            counters: &self.counters,
            inventory: &self.inventory,
            outbox: &self.outbox,
            rejects: self.rejects.as_ref(),
            policy: &self.policy,
            dedup_window: self.dedup_window,
        }
    }
}

/// Assess, store and answer one HL7 message, or every message of a batch frame (`FHS`/`BHS`).
/// Returns the ACK to send (unframed), written by the caller only now, after the commit; None
/// when the message's MSH-15 asks for no acknowledgement in this case.
pub async fn handle_message(
    msg: Vec<u8>,
    peer: &str,
    ctx: &Hl7Target<'_>,
    shutting_down: bool,
) -> Option<Vec<u8>> {
    if crate::hl7::batch::is_batch(&msg) {
        return Some(handle_batch(msg, peer, ctx, shutting_down).await);
    }
    match prepare(msg, peer, ctx, shutting_down).await {
        Prepared::Answered { ack, .. } => ack,
        Prepared::Store(p, new) => {
            let result = ctx.outbox.append(new).await;
            finish(ctx, &p, result).ack
        }
    }
}

/// A message that passed every check: what answering it needs once it is appended.
struct ToStore {
    header: Box<crate::hl7::header::Header>,
    size: usize,
    segments: Vec<[u8; 3]>,
    received_at_us: i64,
}

/// The first half of handling a message: everything up to the append.
enum Prepared {
    /// Decided without storing (rejected and quarantined, refused, ignored by policy).
    Answered {
        ack: Option<Vec<u8>>,
        /// Accepted in the sender's eyes (ignored by policy): not listed in a batch ACK.
        accepted: bool,
    },
    Store(Box<ToStore>, NewMessage),
}

/// The second half: what the append's result means for the sender.
struct Finished {
    ack: Option<Vec<u8>>,
    accepted: bool,
}

async fn prepare(msg: Vec<u8>, peer: &str, ctx: &Hl7Target<'_>, shutting_down: bool) -> Prepared {
    let feed = &**ctx.name;
    let c = ctx.counters;
    let size = msg.len();
    let received_at_us = now_us();
    let header = match intake::assess(&msg, ctx.default_charset, ctx.policy.strict, ctx.responder) {
        Intake::Store(h) => h,
        Intake::Reject {
            ack,
            reason,
            error,
            header,
        } => {
            quarantine(
                ctx,
                msg,
                peer,
                received_at_us,
                &reason,
                &error,
                header.as_deref(),
            )
            .await;
            return Prepared::Answered {
                ack,
                accepted: false,
            };
        }
    };
    match intake::check_policy(&header, ctx.policy) {
        intake::Verdict::Accept => {}
        intake::Verdict::Ignore => {
            c.ignored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(feed, control_id = %header.control_id, "not accepted by this feed's policy: acknowledged and dropped");
            return Prepared::Answered {
                ack: intake::answer_stored(&header),
                accepted: true,
            };
        }
        intake::Verdict::Refuse(err) => {
            event::refused(c, feed, &header.control_id, size, &err.text);
            return Prepared::Answered {
                ack: intake::answer(&header, intake::Outcome::Refused(&err)),
                accepted: false,
            };
        }
    }
    let segments = segment_ids(&msg);
    if let Some(error) = intake::missing_from(&header, &segments) {
        let ack = intake::answer(&header, intake::Outcome::Rejected(&error));
        quarantine(
            ctx,
            msg,
            peer,
            received_at_us,
            &error.text,
            &error,
            Some(&header),
        )
        .await;
        return Prepared::Answered {
            ack,
            accepted: false,
        };
    }
    if shutting_down {
        event::refused(c, feed, &header.control_id, size, "shutting down");
        return Prepared::Answered {
            ack: intake::answer_refused(&header, "siterelay is shutting down: resend later"),
            accepted: false,
        };
    }
    let dedup = ctx.dedup_window.map(|w| crate::outbox::DedupKey {
        sender: format!(
            "{}|{}",
            header.sending_application_raw, header.sending_facility_raw
        ),
        control_id: header.control_id.clone(),
        hash: crate::outbox::hl7_content_hash(&msg),
        window_us: w.as_micros() as i64,
    });
    let new = NewMessage {
        feed: ctx.name.clone(),
        source_kind: ctx.source_kind,
        peer: Some(peer.to_string()),
        format: Format::Hl7v2,
        control_id: Some(header.control_id.clone()),
        raw: msg,
        received_at_us,
        reprocessed: false,
        dedup,
    };
    Prepared::Store(
        Box::new(ToStore {
            header,
            size,
            segments,
            received_at_us,
        }),
        new,
    )
}

fn finish(
    ctx: &Hl7Target<'_>,
    p: &ToStore,
    result: Result<crate::outbox::Stored, AppendError>,
) -> Finished {
    let (header, size) = (&*p.header, p.size);
    let feed = &**ctx.name;
    let c = ctx.counters;
    match result {
        Ok(stored) if stored.duplicate => {
            c.duplicates
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(feed, control_id = %header.control_id, seq = stored.seq, "duplicate resend acknowledged again, not forwarded twice");
            Finished {
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
                .unwrap_or(ctx.default_charset);
            ctx.inventory.observe_hl7(
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
            Finished {
                ack: intake::answer_stored(header),
                accepted: true,
            }
        }
        Err(e) => {
            let text = match &e {
                AppendError::Full { .. } => "store full: message not accepted, resend later",
                AppendError::Failed(_) => "store failure: message not accepted, resend later",
                AppendError::Closed => "siterelay is shutting down: resend later",
            };
            event::refused(c, feed, &header.control_id, size, &e.to_string());
            Finished {
                ack: intake::answer_refused(header, text),
                accepted: false,
            }
        }
    }
}

/// A batch frame: every message is checked and stored on its own (its own `seq`, its own
/// quarantine entry when rejected); all appends are committed before the one batch
/// acknowledgement goes out, which lists the messages that were not accepted.
async fn handle_batch(
    frame: Vec<u8>,
    peer: &str,
    ctx: &Hl7Target<'_>,
    shutting_down: bool,
) -> Vec<u8> {
    let feed = &**ctx.name;
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
                &ctx.responder.application,
                &ctx.responder.facility,
            );
            quarantine(ctx, frame, peer, now_us(), &reason, &error, None).await;
            return nak;
        }
    };
    for note in &batch.notes {
        warn!(
            feed,
            peer, note, "batch irregularity (messages still handled)"
        );
    }
    // Check every message first, then append them all at once so they share commits; the
    // appends are queued in order, so seq follows the batch order.
    let mut slots: Vec<(usize, Result<Box<ToStore>, Finished>)> = Vec::new();
    let mut to_store = Vec::new();
    for (g, group) in batch.groups.iter().enumerate() {
        for range in &group.messages {
            let msg = frame[range.clone()].to_vec();
            match prepare(msg, peer, ctx, shutting_down).await {
                Prepared::Answered { ack, accepted } => {
                    slots.push((g, Err(Finished { ack, accepted })))
                }
                Prepared::Store(p, new) => {
                    to_store.push(new);
                    slots.push((g, Ok(p)));
                }
            }
        }
    }
    let mut results = ctx.outbox.append_all(to_store).await.into_iter();
    let mut acks: Vec<Vec<Vec<u8>>> = vec![Vec::new(); batch.groups.len()];
    let (mut accepted, mut not_accepted) = (0usize, 0usize);
    for (g, slot) in slots {
        let f = match slot {
            Err(done) => done,
            Ok(p) => finish(ctx, &p, results.next().unwrap_or(Err(AppendError::Closed))),
        };
        let (ack, ok) = (f.ack, f.accepted);
        if ok {
            accepted += 1;
        } else {
            not_accepted += 1;
            acks[g].extend(ack);
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

/// Count and log a rejected message, keep it (committed before its `AE` goes out) and, if
/// configured, tell the central side about it without content.
async fn quarantine(
    ctx: &Hl7Target<'_>,
    raw: Vec<u8>,
    peer: &str,
    received_at_us: i64,
    reason: &str,
    error: &crate::hl7::ack::AckError,
    header: Option<&crate::hl7::header::Header>,
) {
    event::rejected(ctx.counters, ctx.name, peer, raw.len(), reason);
    let message_type = header.map(|h| match &h.trigger_event {
        Some(t) => format!("{}^{}", h.message_type, t),
        None => h.message_type.clone(),
    });
    let m = crate::outbox::RejectedMessage {
        feed: ctx.name.clone(),
        source_kind: ctx.source_kind,
        peer: Some(peer.to_string()),
        received_at_us,
        error_code: error.code,
        error_location: error.location_text(),
        reason: reason.to_string(),
        control_id: header.map(|h| h.control_id.clone()),
        sending_application: header.and_then(|h| h.sending_application.clone()),
        sending_facility: header.and_then(|h| h.sending_facility.clone()),
        message_type,
        raw,
    };
    let notice = RejectNotice {
        feed: ctx.name.to_string(),
        at: crate::record::rfc3339_us(received_at_us),
        quarantine_id: 0,
        sending_application: m.sending_application.clone(),
        sending_facility: m.sending_facility.clone(),
        message_type: m.message_type.clone(),
        error_code: m.error_code,
        error_location: m.error_location.clone(),
    };
    match ctx.outbox.quarantine(m).await {
        Ok(id) => {
            ctx.counters
                .quarantined
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(tx) = ctx.rejects {
                // Best effort: the quarantine itself is the record of truth.
                let _ = tx.try_send(RejectNotice {
                    quarantine_id: id,
                    ..notice
                });
            }
        }
        Err(e) => warn!(feed = %ctx.name, error = %e, "could not quarantine a rejected message"),
    }
}
