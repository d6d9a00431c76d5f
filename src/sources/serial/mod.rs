//! Serial ports: analysers and bedside devices on RS-232 or USB-serial adapters.
//!
//! One task per port keeps it open: it opens the device by path (exclusively), runs the
//! configured protocol until the port fails or disappears (a USB adapter unplugged reads EIO or
//! end of file), then reopens it by path with backoff (1 s doubling to `reopen_max`). The
//! port's state (`connected`, `waiting`, `error`) is kept for health reports. A message is stored
//! only when complete by its protocol's rules (or, for ASTM, flagged incomplete when the
//! analyser ended the transmission early); a message cut off by the port failing is dropped and
//! logged, never forwarded as if complete, and nothing already committed is affected.
//!
//! The protocol logic lives elsewhere and owns no I/O: [`crate::astm::link`] for ASTM E1381,
//! [`crate::sources::mllp::framing`] and [`crate::hl7::intake`] for HL7 over MLLP. This module
//! only carries out what they decide ([`session`]).

pub mod session;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{FlowControl, Parity, SerialConfig};
use crate::telemetry::PortState;

/// First wait before reopening a port.
const REOPEN_START: Duration = Duration::from_secs(1);

/// Everything a port's task needs.
pub struct SerialContext {
    /// Feed name.
    pub name: Arc<str>,
    /// Port settings.
    pub cfg: SerialConfig,
    /// The feed's receive stage: every complete message from the port goes there.
    pub intake: Arc<crate::intake::FeedIntake>,
    /// Cap on undelivered bytes (answer NAK to ENQ when reached).
    pub store_max_bytes: u64,
}

/// Why opening a port failed, in words for the person at the box.
pub fn describe_open_error(device: &Path, e: &tokio_serial::Error) -> (PortState, String) {
    use tokio_serial::ErrorKind;
    let d = device.display();
    match e.kind() {
        ErrorKind::NoDevice => (
            PortState::Waiting,
            format!("{d} is not there (unplugged? check `ls -l /dev/serial/by-id/`); retrying"),
        ),
        ErrorKind::Io(std::io::ErrorKind::NotFound) => (
            PortState::Waiting,
            format!("{d} does not exist (unplugged? check `ls -l /dev/serial/by-id/`); retrying"),
        ),
        ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => (
            PortState::Error,
            format!(
                "permission denied opening {d}: the siterelay user must be in the 'dialout' group \
                 (the systemd unit sets SupplementaryGroups=dialout; check the device's group with ls -l)"
            ),
        ),
        _ if e.description.contains("busy") || e.description.contains("Resource busy") => (
            PortState::Error,
            format!("{d} is in use by another program (ports are opened exclusively): {e}"),
        ),
        _ => (PortState::Error, format!("cannot open {d}: {e}")),
    }
}

fn open(cfg: &SerialConfig) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    use tokio_serial::SerialPortBuilderExt;
    let data_bits = match cfg.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match cfg.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop_bits = match cfg.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    let flow = match cfg.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Software => tokio_serial::FlowControl::Software,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    let mut port = tokio_serial::new(cfg.device.to_string_lossy(), cfg.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow)
        .open_native_async()?;
    port.set_exclusive(true)?;
    Ok(port)
}

/// Keep the port open and served until shutdown.
pub async fn run(ctx: SerialContext, shutdown: crate::shutdown::Shutdown) {
    let feed = ctx.name.clone();
    let device = ctx.cfg.device.clone();
    let cap = ctx.cfg.reopen_max;
    let mut wait = REOPEN_START;
    let mut last_problem: Option<String> = None;
    loop {
        if shutdown.is_requested() {
            break;
        }
        match open(&ctx.cfg) {
            Ok(port) => {
                ctx.intake
                    .counters
                    .set_port_state(PortState::Connected, None);
                info!(feed = %feed, device = %device.display(), protocol = ?ctx.cfg.protocol, "serial port open");
                last_problem = None;
                wait = REOPEN_START;
                let why = session::serve(port, &ctx, &shutdown).await;
                let state = if shutdown.is_requested() {
                    PortState::Waiting
                } else {
                    warn!(feed = %feed, device = %device.display(), why = %why, "serial port lost; reopening");
                    PortState::Waiting
                };
                ctx.intake.counters.set_port_state(state, Some(why));
            }
            Err(e) => {
                let (state, text) = describe_open_error(&device, &e);
                if last_problem.as_deref() != Some(text.as_str()) {
                    warn!(feed = %feed, "{text}");
                    last_problem = Some(text.clone());
                }
                ctx.intake.counters.set_port_state(state, Some(text));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.requested() => break,
        }
        wait = (wait * 2).min(cap);
    }
    info!(feed = %feed, "serial port task stopped");
}
