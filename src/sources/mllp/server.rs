//! MLLP listener: accepts connections for one feed and carries out what the framer decides;
//! hands each complete message to the feed's receive stage (`crate::intake`) and writes the
//! answer it returns. Owns the sockets; owns no protocol logic.
//!
//! Per connection, messages are handled strictly in order: frame -> intake (decide, commit to
//! the outbox) -> ACK. The ACK for a message is written only after the transaction holding it has
//! committed. On shutdown the listener stops accepting at once; a connection finishes the message
//! it is committing, answers `AR` to any further frame it already holds, and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::hl7::intake;
use crate::intake::FeedIntake;
use crate::shutdown::Shutdown;
use crate::sources::mllp::framing::{FrameEvent, Framer, encode};
use crate::telemetry::mllp as event;

/// Read buffer per connection.
const READ_CHUNK: usize = 64 * 1024;
/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a connection of one feed needs.
pub struct FeedContext {
    /// The feed's receive stage: every complete message goes there.
    pub intake: Arc<FeedIntake>,
    /// Largest message (the framer's limit).
    pub max_message_bytes: u64,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// TLS, when configured.
    pub tls: Option<TlsAcceptor>,
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
        info!(feed = %ctx.intake.name, addr = %listener.local_addr()?, tls = ctx.tls.is_some(), "listening");
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

    /// Accept until shutdown is requested, then wait for every connection to finish.
    pub async fn serve(self, shutdown: Shutdown) {
        let mut conns = JoinSet::new();
        loop {
            // Take a connection slot before accepting: beyond the cap, peers wait in the backlog.
            let permit = tokio::select! {
                p = self.limit.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.requested() => break,
            };
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.requested() => break,
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
                                        warn!(feed = %ctx.intake.name, %peer, error = %e, "TLS handshake failed")
                                    }
                                    Err(_) => {
                                        warn!(feed = %ctx.intake.name, %peer, "TLS handshake timed out")
                                    }
                                }
                            }
                        }
                    });
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
}

/// Serve one connection until EOF, idle timeout, an error, or shutdown.
async fn connection<S>(mut stream: S, peer: SocketAddr, ctx: &FeedContext, shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let feed = &*ctx.intake.name;
    let peer_s = peer.to_string();
    let c = &*ctx.intake.counters;
    event::connection_opened(c, feed, &peer_s);
    let mut framer = Framer::new(ctx.max_message_bytes as usize);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut handled = 0u64;
    let why: &str = 'conn: loop {
        while let Some(ev) = framer.next_event() {
            match ev {
                FrameEvent::Message(msg) => {
                    let stopping = shutdown.is_requested();
                    let ack = ctx.intake.receive_hl7(msg, &peer_s, stopping).await;
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
        let stopping = shutdown.is_requested();
        if stopping {
            break "shutting down";
        }
        let read = tokio::select! {
            r = tokio::time::timeout(ctx.idle_timeout, stream.read(&mut buf)) => r,
            _ = shutdown.requested() => break "shutting down",
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
