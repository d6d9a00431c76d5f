//! MLLP listener: accepts connections for one feed and carries out what the framer decides;
//! hands each complete message to the feed's receive stage (`crate::intake`) and writes the
//! answer it returns. Owns the sockets; owns no protocol logic.
//!
//! Who may use the feed, and how much ([`Guard`]): a connection from outside the feed's allow
//! list, or one more than its address may hold, is closed at once; a TLS handshake must finish
//! within its own deadline before the connection takes a slot; a frame must be complete within
//! `frame_timeout` of its first byte; when every slot is taken, the connection that has gone
//! longest without completing a message gives its slot up to the newcomer; beyond its address's
//! message or byte rate a message is answered `AR` (resend later) without being looked at.
//!
//! Per connection, messages are handled strictly in order: frame -> intake (decide, commit to
//! the outbox) -> ACK. The ACK for a message is written only after the transaction holding it has
//! committed. On shutdown the listener stops accepting at once; a connection finishes the message
//! it is committing, answers `AR` to any further frame it already holds, and closes.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::allow::AllowList;
use super::certs::MllpTls;
use super::limits::{PeerRates, Slots};
use crate::hl7::intake;
use crate::intake::FeedIntake;
use crate::shutdown::Shutdown;
use crate::sources::mllp::framing::{FrameEvent, Framer, encode};
use crate::telemetry::mllp as event;

/// Read buffer per connection.
const READ_CHUNK: usize = 64 * 1024;
/// How often the certificate files of a TLS feed are looked at for a change.
pub const CERT_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Everything a connection of one feed needs.
pub struct FeedContext {
    /// The feed's receive stage: every complete message goes there.
    pub intake: Arc<FeedIntake>,
    /// Largest message (the framer's limit).
    pub max_message_bytes: u64,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// TLS, when configured (reloadable: each handshake uses the certificate loaded last).
    pub tls: Option<Arc<MllpTls>>,
    /// Who may connect, and how much of the feed one sender may use.
    pub guard: Guard,
}

/// A feed's protections against its own LAN: the allow list, fair connection slots, deadlines
/// and per-address rates.
pub struct Guard {
    /// Addresses that may connect (empty: all).
    pub allow: AllowList,
    /// Connection slots (taken after the TLS handshake) and the per-address cap.
    pub slots: Mutex<Slots>,
    /// Per-address message and byte rates.
    pub rates: Mutex<PeerRates>,
    /// Once a frame's first byte has arrived, it must be complete within this time.
    pub frame_timeout: Duration,
    /// A TLS handshake must finish within this time (before it holds no slot).
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once (beyond: the connection is closed at once).
    pub handshakes: Arc<Semaphore>,
}

impl Guard {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bound listener, ready to serve.
pub struct MllpListener {
    listener: TcpListener,
    ctx: Arc<FeedContext>,
}

/// An open TCP connection counted against its address's cap; uncounted when dropped.
struct Open {
    ctx: Arc<FeedContext>,
    ip: IpAddr,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.ctx.guard.slots().close(self.ip);
    }
}

impl MllpListener {
    /// Bind the feed's address (done before READY=1 so a bad address fails start-up).
    pub async fn bind(addr: SocketAddr, ctx: FeedContext) -> std::io::Result<MllpListener> {
        let listener = TcpListener::bind(addr).await?;
        info!(feed = %ctx.intake.name, addr = %listener.local_addr()?, tls = ctx.tls.is_some(), allow_list = !ctx.guard.allow.is_open(), "listening");
        Ok(MllpListener {
            listener,
            ctx: Arc::new(ctx),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept until shutdown is requested, then wait for every connection to finish. Every
    /// connection is accepted at once (so a full feed never leaves a sender waiting in the
    /// backlog): one from outside the allow list, or over its address's cap, is closed at once;
    /// the others get a slot after their TLS handshake.
    pub async fn serve(self, shutdown: Shutdown) {
        let mut conns = JoinSet::new();
        let mut cert_check = tokio::time::interval(CERT_CHECK_EVERY);
        cert_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.requested() => break,
                _ = cert_check.tick(), if self.ctx.tls.is_some() => {
                    if let Some(t) = &self.ctx.tls {
                        t.reload_if_changed();
                    }
                    continue;
                }
            };
            // Reap finished connection tasks so the set does not grow.
            while conns.try_join_next().is_some() {}
            match accepted {
                Ok((stream, peer)) => {
                    if let Some(task) = self.admit(stream, peer, &shutdown) {
                        conns.spawn(task);
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    error!(feed = %self.ctx.intake.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(self.listener);
        while conns.join_next().await.is_some() {}
        info!(feed = %self.ctx.intake.name, "listener stopped");
    }

    /// Decide about a new connection: refused now (None, the stream dropped, i.e. closed), or
    /// the task that serves it.
    fn admit(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: &Shutdown,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let ctx = &self.ctx;
        let c = &*ctx.intake.counters;
        let ip = peer.ip().to_canonical();
        if !ctx.guard.allow.permits(ip) {
            event::connection_refused(
                c,
                &ctx.intake.name,
                ip,
                "address not in the feed's allow list",
            );
            return None;
        }
        if !ctx.guard.slots().open(ip) {
            event::connection_refused(
                c,
                &ctx.intake.name,
                ip,
                "over max_connections_per_peer for this address",
            );
            return None;
        }
        let open = Open {
            ctx: ctx.clone(),
            ip,
        };
        let handshake = match &ctx.tls {
            None => None,
            Some(_) => match ctx.guard.handshakes.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    event::connection_refused(
                        c,
                        &ctx.intake.name,
                        ip,
                        "too many TLS handshakes in progress",
                    );
                    return None;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        Some(async move {
            let _open = open;
            match &ctx.tls {
                None => served(stream, peer, None, &ctx, shutdown).await,
                Some(tls) => {
                    let feed = &*ctx.intake.name;
                    let acceptor = tls.acceptor();
                    let hs = tokio::select! {
                        r = tokio::time::timeout(ctx.guard.handshake_timeout, acceptor.accept(stream)) => r,
                        _ = shutdown.requested() => return,
                    };
                    drop(handshake);
                    let stream = match hs {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            // Unknown, revoked or expired certificate, or not TLS at all.
                            event::connection_refused(
                                &ctx.intake.counters,
                                feed,
                                ip,
                                &format!("TLS handshake failed: {e}"),
                            );
                            return;
                        }
                        Err(_) => {
                            event::connection_refused(
                                &ctx.intake.counters,
                                feed,
                                ip,
                                "TLS handshake not finished within handshake_timeout",
                            );
                            return;
                        }
                    };
                    let certificate = match tls.check_sender(stream.get_ref().1.peer_certificates())
                    {
                        Ok(subject) => subject,
                        Err(why) => {
                            event::connection_refused(&ctx.intake.counters, feed, ip, &why);
                            return;
                        }
                    };
                    served(stream, peer, certificate, &ctx, shutdown).await
                }
            }
        })
    }
}

/// A connection past its handshake: give it a slot (evicting the connection idle longest when
/// the feed is full), serve it, give the slot back.
async fn served<S>(
    stream: S,
    peer: SocketAddr,
    certificate: Option<String>,
    ctx: &FeedContext,
    shutdown: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let admitted = ctx.guard.slots().admit(Instant::now());
    if admitted.evicted_other {
        info!(feed = %ctx.intake.name, %peer, "feed full: the connection without a message for longest gives up its slot to this one");
    }
    let id = admitted.id;
    connection(stream, peer, certificate, admitted, ctx, shutdown).await;
    ctx.guard.slots().release(id);
}

/// Serve one connection until EOF, idle timeout, frame timeout, eviction, an error, or shutdown.
async fn connection<S>(
    mut stream: S,
    peer: SocketAddr,
    certificate: Option<String>,
    slot: super::limits::Admitted,
    ctx: &FeedContext,
    shutdown: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let feed = &*ctx.intake.name;
    let peer_s = peer.to_string();
    let ip = peer.ip().to_canonical();
    let c = &*ctx.intake.counters;
    event::connection_opened(c, feed, &peer_s);
    let mut framer = Framer::new(ctx.max_message_bytes as usize);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut handled = 0u64;
    // When the frame being received began (its first byte), if one is.
    let mut frame_started: Option<Instant> = None;
    let why: &str = 'conn: loop {
        while let Some(ev) = framer.next_event() {
            match ev {
                FrameEvent::Message(msg) => {
                    frame_started = None;
                    let stopping = shutdown.is_requested();
                    let over = ctx
                        .guard
                        .rates
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take(ip, msg.len(), Instant::now());
                    let ack = match over {
                        Ok(()) => {
                            ctx.intake
                                .receive_hl7_from(msg, &peer_s, certificate.as_deref(), stopping)
                                .await
                        }
                        Err(over) => ctx.intake.refuse_unread(&msg, &peer_s, &over.text()),
                    };
                    handled += 1;
                    ctx.guard.slots().progress(slot.id, Instant::now());
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
                    frame_started = None;
                    event::incomplete(c, feed, &peer_s, bytes, "new start block inside a frame")
                }
                FrameEvent::TooLarge { head, seen } => {
                    event::oversized(c, feed, &peer_s, seen, ctx.max_message_bytes);
                    c.ack_ae.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let nak = intake::answer_oversized(
                        &head,
                        ctx.max_message_bytes,
                        &ctx.intake.responder,
                    );
                    let _ = write_with_timeout(&mut stream, &encode(&nak), Duration::from_secs(2))
                        .await;
                    break 'conn "frame too large";
                }
            }
        }
        if framer.in_frame() {
            frame_started.get_or_insert_with(Instant::now);
        } else {
            frame_started = None;
        }
        let stopping = shutdown.is_requested();
        if stopping {
            break "shutting down";
        }
        // Silent for idle_timeout, or a frame begun but not finished within frame_timeout.
        let (limit, frame_deadline) = match frame_started {
            Some(t) => {
                let left = ctx.guard.frame_timeout.saturating_sub(t.elapsed());
                (left.min(ctx.idle_timeout), left <= ctx.idle_timeout)
            }
            None => (ctx.idle_timeout, false),
        };
        let read = tokio::select! {
            r = tokio::time::timeout(limit, stream.read(&mut buf)) => r,
            _ = shutdown.requested() => break "shutting down",
            _ = slot.evict.notified() => {
                if framer.in_frame() {
                    event::incomplete(c, feed, &peer_s, framer.buffered_bytes(), "slot given to a new connection (feed full)");
                }
                break "slot given to a new connection (feed full)";
            }
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
            Err(_) if frame_deadline => {
                event::incomplete(
                    c,
                    feed,
                    &peer_s,
                    framer.buffered_bytes(),
                    "frame not complete within frame_timeout of its first byte",
                );
                break "frame timeout";
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
