//! A TCP proxy a test controls, placed between siterelay and a broker: the network between the
//! box and the central side, with the faults a test needs.
//!
//! - [`Mode::Closed`]: nothing listens on the proxy's port (connections are refused, as with a
//!   broker that is down), and connections already open are cut;
//! - [`Mode::Pass`]: bytes flow both ways;
//! - [`Mode::Blackhole`]: connections are accepted and bytes are read but never forwarded or
//!   answered (a half-open link that swallows everything); connections already open go silent;
//! - [`Mode::Throttle`]: bytes flow at most at the given rate in each direction.
//!
//! [`Proxy::reset_all`] cuts every open connection (as a reset mid-PUBLISH would) without
//! changing the mode.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse new connections, cut open ones.
    Closed,
    /// Forward bytes both ways.
    Pass,
    /// Accept and read, never forward or answer.
    Blackhole,
    /// Forward at most this many bytes per second in each direction.
    Throttle(u64),
}

/// A running proxy; dropping it stops it and cuts every connection.
pub struct Proxy {
    port: u16,
    upstream: SocketAddr,
    /// Mode, and a generation bumped by `reset_all` (connections of older generations end).
    state: watch::Sender<(Mode, u64)>,
    listener_task: Arc<Mutex<Option<JoinHandle<()>>>>,
    control: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free port of 127.0.0.1 in front of `upstream` (127.0.0.1), in `mode`.
    pub async fn start(upstream_port: u16, mode: Mode) -> Proxy {
        Proxy::start_on(crate::free_port(), upstream_port, mode).await
    }

    /// The same on a given port.
    pub async fn start_on(port: u16, upstream_port: u16, mode: Mode) -> Proxy {
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        let (state, rx) = watch::channel((mode, 0u64));
        let listener_task: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::new(Mutex::new(None));
        // The control task binds the port while the mode is not Closed, and drops it otherwise.
        let lt = listener_task.clone();
        let mut ctl_rx = rx.clone();
        let (bound_tx, mut bound_rx) = watch::channel(false);
        let control = tokio::spawn(async move {
            loop {
                let (mode, _) = *ctl_rx.borrow_and_update();
                let running = lt.lock().unwrap().is_some();
                if mode == Mode::Closed && running {
                    if let Some(t) = lt.lock().unwrap().take() {
                        t.abort();
                    }
                } else if mode != Mode::Closed && !running {
                    // Re-binding a port just closed can take a moment.
                    let mut listener = None;
                    for _ in 0..100 {
                        match TcpListener::bind(("127.0.0.1", port)).await {
                            Ok(l) => {
                                listener = Some(l);
                                break;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                    let listener = listener.expect("proxy port can be bound");
                    let rx = ctl_rx.clone();
                    *lt.lock().unwrap() = Some(tokio::spawn(accept_loop(listener, upstream, rx)));
                }
                let _ = bound_tx.send(mode != Mode::Closed);
                if ctl_rx.changed().await.is_err() {
                    break;
                }
            }
        });
        // Wait until the initial mode is in force.
        let want = mode != Mode::Closed;
        let _ = bound_rx.wait_for(|b| *b == want).await;
        Proxy {
            port,
            upstream,
            state,
            listener_task,
            control,
        }
    }

    /// The port siterelay should connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where bytes go.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.state.borrow().0
    }

    /// Change the mode; `Closed` also cuts open connections. Returns once the listener state
    /// matches (bound or not).
    pub async fn set(&self, mode: Mode) {
        self.state.send_modify(|s| {
            s.0 = mode;
            s.1 += 1;
        });
        // Give the control task a moment to (un)bind.
        for _ in 0..200 {
            let bound = self.listener_task.lock().unwrap().is_some();
            if bound == (mode != Mode::Closed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Cut every open connection now (the mode stays).
    pub fn reset_all(&self) {
        self.state.send_modify(|s| s.1 += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.control.abort();
        if let Some(t) = self.listener_task.lock().unwrap().take() {
            t.abort();
        }
        self.state.send_modify(|s| {
            s.0 = Mode::Closed;
            s.1 += 1;
        });
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    rx: watch::Receiver<(Mode, u64)>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let rx = rx.clone();
        tokio::spawn(connection(client, upstream, rx));
    }
}

/// One proxied connection: ends when either side closes, the mode becomes `Closed`, or
/// `reset_all` bumps the generation.
async fn connection(client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<(Mode, u64)>) {
    let (mode, generation) = *rx.borrow_and_update();
    let cut = |rx: &watch::Receiver<(Mode, u64)>| {
        let (m, g) = *rx.borrow();
        m == Mode::Closed || g != generation
    };
    let _ = client.set_nodelay(true);
    if mode == Mode::Blackhole {
        let (mut r, _w) = client.into_split();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => if matches!(n, Ok(0) | Err(_)) { return },
                _ = rx.changed() => if cut(&rx) { return },
            }
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let rate = |rx: &watch::Receiver<(Mode, u64)>| match rx.borrow().0 {
        Mode::Throttle(bps) => Some(bps.max(1)),
        Mode::Blackhole => Some(0),
        _ => None,
    };
    let mut a = vec![0u8; 16 * 1024];
    let mut b = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = cr.read(&mut a) => {
                let Ok(n @ 1..) = n else { return };
                if !forward(&mut sw, &a[..n], rate(&rx)).await { return }
            }
            n = sr.read(&mut b) => {
                let Ok(n @ 1..) = n else { return };
                if !forward(&mut cw, &b[..n], rate(&rx)).await { return }
            }
            _ = rx.changed() => if cut(&rx) { return },
        }
    }
}

/// Writes `bytes` (paced at `rate` bytes/s when given; swallowed when the rate is 0).
async fn forward<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8], rate: Option<u64>) -> bool {
    match rate {
        Some(0) => true,
        Some(bps) => {
            for chunk in bytes.chunks(1024) {
                if w.write_all(chunk).await.is_err() {
                    return false;
                }
                let wait = Duration::from_secs_f64(chunk.len() as f64 / bps as f64);
                tokio::time::sleep(wait).await;
            }
            true
        }
        None => w.write_all(bytes).await.is_ok(),
    }
}
