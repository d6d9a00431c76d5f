//! One open serial port: carries out what the protocol logic decides. Returns why the port
//! session ended (a read error or end of file means the device went away).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::SerialContext;
use crate::astm::link::{Action, Link, LinkConfig};
use crate::config::SerialProtocol;
use crate::outbox::Format;
use crate::shutdown::Shutdown;
use crate::sources::mllp::framing::{FrameEvent, Framer, encode};
use crate::telemetry::mllp as event;

/// Serve the port with its protocol until it fails or shutdown.
pub async fn serve<S>(port: S, ctx: &SerialContext, shutdown: &Shutdown) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match ctx.cfg.protocol {
        SerialProtocol::Astm => astm(port, ctx, shutdown).await,
        SerialProtocol::Hl7Mllp => hl7(port, ctx, shutdown).await,
        SerialProtocol::Lines => lines(port, ctx, shutdown).await,
    }
}

fn read_end(r: std::io::Result<usize>) -> Option<String> {
    match r {
        Ok(0) => Some("end of file (device gone)".into()),
        Ok(_) => None,
        Err(e) => Some(format!("read failed: {e}")),
    }
}

/// ASTM E1381: the link state machine decides; the final frame's ACK waits for the commit.
async fn astm<S>(mut port: S, ctx: &SerialContext, shutdown: &Shutdown) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut link = Link::new(LinkConfig {
        lenient: ctx.cfg.astm_lenient,
        max_message_len: ctx.cfg.max_message_bytes as usize,
        ..LinkConfig::default()
    });
    let mut buf = vec![0u8; 4096];
    let mut timer: Option<std::time::Instant> = None;
    loop {
        // Refuse new transmissions (NAK to ENQ) while the store is full.
        let g = ctx.intake.outbox.gauges();
        link.set_busy(
            g.refusing.load(std::sync::atomic::Ordering::Relaxed)
                || g.pending_bytes.load(std::sync::atomic::Ordering::Relaxed)
                    >= ctx.store_max_bytes,
        );
        let now_std = std::time::Instant::now();
        let mut actions = tokio::select! {
            r = port.read(&mut buf) => {
                let n = match r { Ok(n) => n, Err(e) => return format!("read failed: {e}") };
                if let Some(why) = read_end(Ok(n)) {
                    if !link.is_idle() {
                        warn!(feed = %ctx.name, "port lost in the middle of an ASTM transmission: the partial message is dropped (never acknowledged)");
                    }
                    return why;
                }
                link.on_bytes(std::time::Instant::now(), &buf[..n])
            }
            _ = tokio::time::sleep_until(Instant::from_std(timer.unwrap_or(now_std))), if timer.is_some() => {
                link.on_tick(std::time::Instant::now())
            }
            _ = shutdown.requested() => return "shutting down".into(),
        };
        // Carry out the actions; storing a complete message yields more (the held ACK).
        while !actions.is_empty() {
            let mut next = Vec::new();
            for a in actions {
                match a {
                    Action::Write(bytes) => {
                        if let Err(e) = port.write_all(&bytes).await {
                            return format!("write failed: {e}");
                        }
                    }
                    Action::SetTimer(t) => timer = Some(t),
                    Action::CancelTimer => timer = None,
                    Action::Deliver { message, complete } => {
                        let size = message.len();
                        let ok = ctx
                            .intake
                            .receive_device(message, Format::Astm, &peer(ctx), 0)
                            .await
                            .is_ok();
                        if complete {
                            next.extend(link.on_store_result(std::time::Instant::now(), ok));
                        } else if ok {
                            warn!(feed = %ctx.name, size, "ASTM transmission ended before its L record: stored flagged incomplete");
                        }
                    }
                    Action::Warning(w) => warn!(feed = %ctx.name, warning = %w, "ASTM link"),
                    other => debug!(feed = %ctx.name, action = ?other, "ASTM link"),
                }
            }
            actions = next;
        }
    }
}

/// The device path, as records and logs name the sender.
fn peer(ctx: &SerialContext) -> String {
    ctx.cfg.device.display().to_string()
}

/// HL7 over MLLP on the serial byte stream, ACKs written back on the port.
async fn hl7<S>(mut port: S, ctx: &SerialContext, shutdown: &Shutdown) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut framer = Framer::new(ctx.cfg.max_message_bytes as usize);
    let mut buf = vec![0u8; 4096];
    let peer = peer(ctx);
    let counters = &*ctx.intake.counters;
    loop {
        while let Some(ev) = framer.next_event() {
            match ev {
                FrameEvent::Message(m) => {
                    if let Some(ack) = ctx.intake.receive_hl7(m, &peer, false).await
                        && let Err(e) = port.write_all(&encode(&ack)).await
                    {
                        return format!("write failed: {e}");
                    }
                }
                FrameEvent::Discarded { bytes } => {
                    event::discarded(counters, &ctx.name, &peer, bytes)
                }
                FrameEvent::Abandoned { bytes } => event::incomplete(
                    counters,
                    &ctx.name,
                    &peer,
                    bytes,
                    "new start block inside a frame",
                ),
                FrameEvent::TooLarge { head, seen } => {
                    event::oversized(counters, &ctx.name, &peer, seen, ctx.cfg.max_message_bytes);
                    let nak = crate::hl7::intake::answer_oversized(
                        &head,
                        ctx.cfg.max_message_bytes,
                        &ctx.intake.responder,
                    );
                    let _ = port.write_all(&encode(&nak)).await;
                    // A serial line cannot be "closed": start afresh.
                    framer = Framer::new(ctx.cfg.max_message_bytes as usize);
                }
            }
        }
        let r = tokio::select! {
            r = port.read(&mut buf) => r,
            _ = shutdown.requested() => return "shutting down".into(),
        };
        if let Some(why) = read_end(
            r.as_ref()
                .map(|n| *n)
                .map_err(|e| std::io::Error::new(e.kind(), e.to_string())),
        ) {
            if framer.in_frame() {
                event::incomplete(
                    counters,
                    &ctx.name,
                    &peer,
                    framer.buffered_bytes(),
                    "port lost inside a frame",
                );
            }
            return why;
        }
        framer.push(&buf[..r.expect("checked")]);
    }
}

/// Line-oriented devices: a line (CR, LF or CRLF) is a message, or lines closer together than
/// `group_gap` are one message. There is no acknowledgement on such lines, so a message the
/// store cannot take is retried (reading pauses meanwhile) rather than dropped.
async fn lines<S>(mut port: S, ctx: &SerialContext, shutdown: &Shutdown) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let gap = ctx.cfg.group_gap;
    let max = ctx.cfg.max_message_bytes as usize;
    let mut buf = vec![0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    let mut group: Vec<u8> = Vec::new();
    // Bytes dropped from the current line (past `max`), and from the lines of the group.
    let mut line_dropped: u64 = 0;
    let mut group_dropped: u64 = 0;
    let mut flush_at: Option<Instant> = None;
    loop {
        let r = tokio::select! {
            r = port.read(&mut buf) => Some(r),
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => None,
            _ = shutdown.requested() => {
                if !group.is_empty() {
                    let dropped = std::mem::take(&mut group_dropped);
                    store_retrying(ctx, std::mem::take(&mut group), dropped, shutdown).await;
                }
                return "shutting down".into();
            }
        };
        let Some(r) = r else {
            // Idle gap passed: the group is complete.
            flush_at = None;
            let dropped = std::mem::take(&mut group_dropped);
            store_retrying(ctx, std::mem::take(&mut group), dropped, shutdown).await;
            continue;
        };
        let n = match r {
            Ok(0) => {
                if !line.is_empty() || !group.is_empty() {
                    warn!(feed = %ctx.name, bytes = line.len() + group.len(), "port lost with an unfinished line or group: dropped");
                }
                return "end of file (device gone)".into();
            }
            Ok(n) => n,
            Err(e) => return format!("read failed: {e}"),
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if line.is_empty() {
                    continue;
                }
                let done = std::mem::take(&mut line);
                let dropped = std::mem::take(&mut line_dropped);
                match gap {
                    None => store_retrying(ctx, done, dropped, shutdown).await,
                    Some(_) => {
                        group.extend_from_slice(&done);
                        group.push(b'\n');
                        group_dropped += dropped;
                    }
                }
            } else if line.len() < max {
                line.push(b);
            } else {
                // Kept as far as the limit; the rest is counted, and the record says so.
                line_dropped += 1;
            }
        }
        if let Some(g) = gap
            && !group.is_empty()
        {
            flush_at = Some(Instant::now() + g);
        }
        if group.len() >= max {
            flush_at = None;
            let dropped = std::mem::take(&mut group_dropped);
            store_retrying(ctx, std::mem::take(&mut group), dropped, shutdown).await;
        }
    }
}

async fn store_retrying(ctx: &SerialContext, msg: Vec<u8>, truncated: u64, shutdown: &Shutdown) {
    if msg.is_empty() {
        return;
    }
    let size = msg.len();
    loop {
        match ctx
            .intake
            .receive_device(msg.clone(), Format::Lines, &peer(ctx), truncated)
            .await
        {
            Ok(_) => return,
            Err(_) if shutdown.is_requested() => {
                warn!(feed = %ctx.name, size, "shutting down with a device message not stored");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}
