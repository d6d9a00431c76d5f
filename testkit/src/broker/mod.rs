//! `TestBroker`: a small but real MQTT broker (v3.1.1 and v5) over mutual TLS, running in
//! tokio tasks of the calling runtime, with fault injection for PUBLISH handling.
//!
//! Supported: CONNECT/CONNACK, Last Will (with retain), PUBLISH QoS 0/1 (QoS 2 inbound is
//! acknowledged with PUBREC/PUBCOMP and delivered at QoS ≤ 1), retained messages, SUBSCRIBE
//! with `+`/`#` (granted QoS capped at 1), UNSUBSCRIBE, PINGREQ, DISCONNECT, keep-alive
//! enforcement (1.5 × keep alive), session take-over by client id, v5 topic aliases.
//! Sessions are always clean: nothing is kept or redelivered across connections.

mod codec;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

pub use codec::MAX_PACKET_SIZE;
use codec::{ConnectInfo, ConnectPeek, In, Message, Out, SubReq};

use crate::pki::Pki;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Misbehaviour injected into the handling of CONNECT/PUBLISH packets.
///
/// A fault applies to clients whose client id starts with
/// [`BrokerOptions::fault_client_prefix`] (all clients if `None`), but never to the testkit's
/// own [`Subscriber`](crate::subscriber::Subscriber)s (client ids starting with
/// [`SUBSCRIBER_CLIENT_ID_PREFIX`](crate::subscriber::SUBSCRIBER_CLIENT_ID_PREFIX)), so a
/// test can always observe what gets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave normally.
    #[default]
    None,
    /// Accept the PUBLISH, route it to no one and never acknowledge it (the connection stays
    /// open and PINGREQs are still answered).
    NeverPuback,
    /// Close the connection on receiving a PUBLISH, without acknowledging or routing it.
    DropAfterPublish,
    /// v5: answer a QoS 1 PUBLISH with a PUBACK carrying this reason code (e.g. 0x80
    /// unspecified error, 0x87 not authorized, 0x97 quota exceeded) and do not route it.
    /// For v3.1.1 clients this behaves like [`Fault::NeverPuback`].
    PubackReason(u8),
    /// Answer CONNECT with a refusing CONNACK ("server unavailable": v3.1.1 return code 3,
    /// v5 reason 0x88) and close the connection (counted in
    /// [`TestBroker::connects_refused`]).
    RefuseConnect,
}

/// A content-based refusal (MQTT 5): a QoS 1 PUBLISH whose payload contains `marker` (every
/// PUBLISH when it is empty) is answered with a PUBACK carrying `reason` and not routed, at most
/// `times` times (`None`: always). With `then_close` the broker closes the connection right
/// after that PUBACK, as Mosquitto 2.0 does after refusing an MQTT 5 client's PUBLISH (0x87).
/// Like [`Fault`], it never applies to the testkit's own subscribers, and for v3.1.1 clients the
/// PUBLISH is swallowed without a PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Bytes the payload must contain (empty: any payload).
    pub marker: Vec<u8>,
    /// PUBACK reason code, e.g. 0x87 not authorized, 0x97 quota exceeded.
    pub reason: u8,
    /// Close the connection after the PUBACK.
    pub then_close: bool,
    /// Refuse at most this many publishes (then route them normally).
    pub times: Option<u32>,
}

/// Configuration of a [`TestBroker`].
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// CA certificate that client certificates must chain to.
    pub ca_file: PathBuf,
    /// Server certificate (PEM).
    pub cert_file: PathBuf,
    /// Server private key (PEM).
    pub key_file: PathBuf,
    /// Require and verify a client certificate (default true). When false no client
    /// certificate is requested at all.
    pub require_client_cert: bool,
    /// TCP port on 127.0.0.1; 0 picks an ephemeral port.
    pub port: u16,
    /// Initial fault, changeable later with [`TestBroker::set_fault`].
    pub fault: Fault,
    /// The fault applies only to clients whose client id starts with this prefix
    /// (`None` = every client).
    pub fault_client_prefix: Option<String>,
    /// Maximum Packet Size announced in the v5 CONNACK and enforced on every PUBLISH received
    /// (a larger one gets DISCONNECT 0x95 Packet too large for v5, and the connection is closed),
    /// as a broker with `max_packet_size` configured does. `None`: no limit announced.
    pub max_packet_size: Option<u32>,
}

impl BrokerOptions {
    /// Options using the PKI's CA and server certificate, mutual TLS, ephemeral port, no fault.
    pub fn from_pki(pki: &Pki) -> BrokerOptions {
        BrokerOptions {
            ca_file: pki.ca_file(),
            cert_file: pki.server_cert_file(),
            key_file: pki.server_key_file(),
            require_client_cert: true,
            port: 0,
            fault: Fault::None,
            fault_client_prefix: None,
            max_packet_size: None,
        }
    }

    /// Same options on a given port.
    pub fn with_port(mut self, port: u16) -> BrokerOptions {
        self.port = port;
        self
    }
}

struct Sub {
    filter: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
}

struct Session {
    client_id: String,
    tx: mpsc::UnboundedSender<Out>,
    subs: Vec<Sub>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, Session>,
    by_client_id: HashMap<String, u64>,
    retained: BTreeMap<String, Message>,
}

struct FaultConfig {
    fault: Fault,
    prefix: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    fault: Mutex<FaultConfig>,
    refusal: Mutex<Option<Refusal>>,
    refused: AtomicU64,
    too_large: AtomicU64,
    max_packet_size: Option<u32>,
    publishes_received: AtomicU64,
    connections_accepted: AtomicU64,
    handshake_failures: AtomicU64,
    connects_refused: AtomicU64,
    next_conn_id: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fault_for(&self, client_id: &str) -> Fault {
        if client_id.starts_with(crate::subscriber::SUBSCRIBER_CLIENT_ID_PREFIX) {
            return Fault::None;
        }
        let f = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        match &f.prefix {
            Some(p) if !client_id.starts_with(p.as_str()) => Fault::None,
            _ => f.fault,
        }
    }
}

/// An in-process MQTT broker over TLS on 127.0.0.1. Dropping it (or [`TestBroker::shutdown`])
/// closes the listener and every client connection.
pub struct TestBroker {
    port: u16,
    shared: Arc<Shared>,
    accept_task: Option<JoinHandle<()>>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBroker")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TestBroker {
    /// Binds `127.0.0.1:opts.port` (with SO_REUSEADDR) and starts serving in tokio tasks.
    pub async fn start(opts: BrokerOptions) -> Result<TestBroker> {
        let config = crate::tls::server_config(
            &opts.ca_file,
            &opts.cert_file,
            &opts.key_file,
            opts.require_client_cert,
        )?;
        let acceptor = TlsAcceptor::from(config);
        let addr = SocketAddr::from(([127, 0, 0, 1], opts.port));
        let socket = TcpSocket::new_v4().context("creating the listening socket")?;
        socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
        socket
            .bind(addr)
            .with_context(|| format!("binding {addr}"))?;
        let listener = socket.listen(1024).context("listen")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            fault: Mutex::new(FaultConfig {
                fault: opts.fault,
                prefix: opts.fault_client_prefix,
            }),
            refusal: Mutex::new(None),
            refused: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            max_packet_size: opts.max_packet_size,
            publishes_received: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            connects_refused: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
        });
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            shared.clone(),
            conns.clone(),
        ));
        Ok(TestBroker {
            port,
            shared,
            accept_task: Some(accept_task),
            conns,
        })
    }

    /// The TCP port the broker listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Changes the injected fault; applies to PUBLISH packets received from now on.
    pub fn set_fault(&self, fault: Fault) {
        self.shared
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fault = fault;
    }

    /// Changes which clients (by client id prefix) the fault applies to; `None` = all.
    pub fn set_fault_client_prefix(&self, prefix: Option<String>) {
        self.shared
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prefix = prefix;
    }

    /// Sets (or clears) the content-based refusal; applies to PUBLISH packets received from now
    /// on.
    pub fn set_refusal(&self, refusal: Option<Refusal>) {
        *self
            .shared
            .refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = refusal;
    }

    /// Number of PUBLISH packets refused by [`TestBroker::set_refusal`].
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Number of PUBLISH packets larger than [`BrokerOptions::max_packet_size`] (each one ended
    /// its connection).
    pub fn too_large(&self) -> u64 {
        self.shared.too_large.load(Ordering::SeqCst)
    }

    /// The fault currently injected.
    pub fn fault(&self) -> Fault {
        self.shared
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fault
    }

    /// Number of PUBLISH packets received from clients (including ones swallowed by a fault).
    pub fn publishes_received(&self) -> u64 {
        self.shared.publishes_received.load(Ordering::SeqCst)
    }

    /// Number of connections that completed the TLS handshake.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections_accepted.load(Ordering::SeqCst)
    }

    /// Number of connections whose TLS handshake failed (e.g. client certificate rejected).
    pub fn handshake_failures(&self) -> u64 {
        self.shared.handshake_failures.load(Ordering::SeqCst)
    }

    /// Number of CONNECTs refused because of [`Fault::RefuseConnect`].
    pub fn connects_refused(&self) -> u64 {
        self.shared.connects_refused.load(Ordering::SeqCst)
    }

    /// Client ids of the MQTT sessions currently connected, sorted.
    pub fn connected_clients(&self) -> Vec<String> {
        let st = self.shared.state();
        let mut ids: Vec<String> = st.sessions.values().map(|s| s.client_id.clone()).collect();
        ids.sort();
        ids
    }

    /// Waits until a client whose id starts with `prefix` is connected; false on timeout.
    pub async fn wait_for_client(&self, prefix: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self
                .connected_clients()
                .iter()
                .any(|c| c.starts_with(prefix))
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `(client id, filter)` of every subscription currently held, sorted.
    pub fn subscriptions(&self) -> Vec<(String, String)> {
        let st = self.shared.state();
        let mut subs: Vec<(String, String)> = st
            .sessions
            .values()
            .flat_map(|s| {
                s.subs
                    .iter()
                    .map(|f| (s.client_id.clone(), f.filter.clone()))
            })
            .collect();
        subs.sort();
        subs
    }

    /// Waits until some client holds a subscription with exactly this filter; false on timeout.
    pub async fn wait_for_subscription(&self, filter: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.subscriptions().iter().any(|(_, f)| f == filter) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The retained payload currently stored for `topic`, if any.
    pub fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        self.shared
            .state()
            .retained
            .get(topic)
            .map(|m| m.payload.to_vec())
    }

    /// Closes every client connection (their wills are published) but keeps listening.
    pub fn disconnect_all_clients(&self) {
        let st = self.shared.state();
        for s in st.sessions.values() {
            let _ = s.tx.send(Out::Close);
        }
    }

    /// Stops listening and closes every client connection at once (tasks are aborted, so
    /// clients see the broker vanish; no wills are published). Returns once the listener
    /// and all connections are closed; the port can be bound again right away.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            let _ = task.await;
        }
        let mut conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        conns.shutdown().await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        // Dropping the JoinSet aborts every connection task.
        drop(std::mem::take(
            &mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()),
        ));
    }
}

/// Accepts connections, spawning each into `conns` (owned by the `TestBroker`, which aborts
/// them all on shutdown/drop).
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    conns: Arc<Mutex<JoinSet<()>>>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                let mut set = conns.lock().unwrap_or_else(|e| e.into_inner());
                // Reap finished connections.
                while set.try_join_next().is_some() {}
                set.spawn(serve_connection(shared.clone(), tcp, acceptor.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// How a connection ended, deciding whether its will is published.
enum End {
    /// DISCONNECT received: discard the will.
    Clean,
    /// v5 DISCONNECT with reason 0x04: publish the will.
    CleanWithWill,
    /// Anything else (EOF, error, keep-alive timeout, protocol error, fault, take-over).
    Abrupt,
}

async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, acceptor: TlsAcceptor) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        _ => {
            shared.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    shared.connections_accepted.fetch_add(1, Ordering::SeqCst);
    let (mut rd, wr) = tokio::io::split(tls);
    let mut buf = BytesMut::with_capacity(16 * 1024);

    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut rd, &mut buf)).await
    {
        Ok(Some(c)) => c,
        _ => return,
    };
    let ConnectInfo {
        v5,
        client_id,
        keep_alive,
        will,
        max_packet_size,
    } = connect;

    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::unbounded_channel();
    if !client_id.is_empty() && shared.fault_for(&client_id) == Fault::RefuseConnect {
        shared.connects_refused.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(Out::ConnRefused);
        let _ = tx.send(Out::Close);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            write_loop(wr, rx, v5, max_packet_size),
        )
        .await;
        return;
    }
    let assigned = client_id
        .is_empty()
        .then(|| format!("testkit-auto-{conn_id}"));
    let client_id = assigned.clone().unwrap_or(client_id);
    {
        let mut st = shared.state();
        // CONNACK is queued before the session becomes visible to routing.
        let _ = tx.send(Out::ConnAck {
            assigned_client_id: assigned,
            max_packet_size: shared.max_packet_size,
        });
        if let Some(old) = st.by_client_id.insert(client_id.clone(), conn_id)
            && let Some(old) = st.sessions.get(&old)
        {
            let _ = old.tx.send(Out::Disconnect { reason: 0x8E });
            let _ = old.tx.send(Out::Close);
        }
        st.sessions.insert(
            conn_id,
            Session {
                client_id: client_id.clone(),
                tx: tx.clone(),
                subs: Vec::new(),
            },
        );
    }

    let conn = Conn {
        shared: &shared,
        conn_id,
        client_id: &client_id,
        v5,
        tx,
    };
    let end = tokio::select! {
        end = conn.read_loop(rd, buf, keep_alive) => end,
        _ = write_loop(wr, rx, v5, max_packet_size) => End::Abrupt,
    };

    let mut st = shared.state();
    st.sessions.remove(&conn_id);
    if st.by_client_id.get(&client_id) == Some(&conn_id) {
        st.by_client_id.remove(&client_id);
    }
    if matches!(end, End::Abrupt | End::CleanWithWill)
        && let Some(will) = will
        && codec::valid_topic(&will.topic)
    {
        route(&mut st, None, will);
    }
}

/// Reads until a whole CONNECT is buffered; `None` on EOF, error or a bad first packet.
async fn read_connect<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> Option<ConnectInfo> {
    loop {
        match codec::peek_connect_level(buf) {
            ConnectPeek::NotConnect => return None,
            ConnectPeek::Level(level) => {
                if level != 4 && level != 5 {
                    return None;
                }
                match codec::read_connect(buf, level == 5) {
                    Ok(Some(c)) => return Some(c),
                    Ok(None) => {}
                    Err(_) => return None,
                }
            }
            ConnectPeek::NeedMore => {}
        }
        reserve_for_read(buf);
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Keeps reads large: `read_buf` on a full `BytesMut` would only add 64 bytes at a time.
fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 8 * 1024 {
        buf.reserve(64 * 1024);
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    conn_id: u64,
    client_id: &'a str,
    v5: bool,
    tx: mpsc::UnboundedSender<Out>,
}

impl Conn<'_> {
    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        mut buf: BytesMut,
        keep_alive: u16,
    ) -> End {
        let idle_limit =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut aliases: HashMap<u16, String> = HashMap::new();
        loop {
            loop {
                if let (Some(max), Some((size, true))) =
                    (self.shared.max_packet_size, codec::peek_packet_size(&buf))
                    && size > max as usize
                {
                    self.shared.too_large.fetch_add(1, Ordering::SeqCst);
                    self.send(Out::Disconnect { reason: 0x95 });
                    self.send(Out::Close);
                    // Let the writer send the DISCONNECT; read nothing more.
                    std::future::pending::<()>().await;
                }
                match codec::read_packet(&mut buf, self.v5) {
                    Ok(Some(packet)) => {
                        if let Some(end) = self.handle(packet, &mut aliases) {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return End::Abrupt,
                }
            }
            reserve_for_read(&mut buf);
            let read = match idle_limit {
                Some(limit) => match tokio::time::timeout(limit, rd.read_buf(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return End::Abrupt,
                },
                None => rd.read_buf(&mut buf).await,
            };
            match read {
                Ok(0) | Err(_) => return End::Abrupt,
                Ok(_) => {}
            }
        }
    }

    fn send(&self, out: Out) {
        let _ = self.tx.send(out);
    }

    /// Handles one packet; `Some(end)` closes the connection.
    fn handle(&self, packet: In, aliases: &mut HashMap<u16, String>) -> Option<End> {
        match packet {
            In::Publish {
                topic,
                topic_alias,
                payload,
                qos,
                retain,
                pkid,
            } => {
                self.shared
                    .publishes_received
                    .fetch_add(1, Ordering::SeqCst);
                let topic = match (topic.is_empty(), topic_alias) {
                    (false, Some(alias)) => {
                        aliases.insert(alias, topic.clone());
                        topic
                    }
                    (true, Some(alias)) => match aliases.get(&alias) {
                        Some(t) => t.clone(),
                        None => return Some(End::Abrupt),
                    },
                    (false, None) => topic,
                    (true, None) => return Some(End::Abrupt),
                };
                if !codec::valid_topic(&topic) {
                    return Some(End::Abrupt);
                }
                if self.refuse(&payload, qos, pkid) {
                    return None;
                }
                match self.shared.fault_for(self.client_id) {
                    // Only matters at CONNECT time.
                    Fault::None | Fault::RefuseConnect => {}
                    Fault::NeverPuback => return None,
                    Fault::DropAfterPublish => return Some(End::Abrupt),
                    Fault::PubackReason(reason) => {
                        if self.v5 && qos == 1 {
                            self.send(Out::PubAck { pkid, reason });
                        }
                        return None;
                    }
                }
                let msg = Message {
                    topic,
                    payload,
                    qos: qos.min(1),
                    retain,
                };
                let mut st = self.shared.state();
                let matched = route(&mut st, Some(self.conn_id), msg);
                // Acknowledge under the lock too, so the ack never overtakes anything
                // routed back to this same connection.
                match qos {
                    0 => {}
                    1 => self.send(Out::PubAck {
                        pkid,
                        // Like Mosquitto: v5 "no matching subscribers" when nobody got it.
                        reason: if matched == 0 && self.v5 { 0x10 } else { 0x00 },
                    }),
                    _ => self.send(Out::PubRec { pkid }),
                }
                None
            }
            In::PubRel(pkid) => {
                self.send(Out::PubComp { pkid });
                None
            }
            In::PubAck | In::PubRec | In::PubComp => None,
            In::Subscribe { pkid, filters } => {
                self.subscribe(pkid, filters);
                None
            }
            In::Unsubscribe { pkid, filters } => {
                let mut st = self.shared.state();
                let mut existed = Vec::with_capacity(filters.len());
                if let Some(sess) = st.sessions.get_mut(&self.conn_id) {
                    for f in &filters {
                        let before = sess.subs.len();
                        sess.subs.retain(|s| &s.filter != f);
                        existed.push(sess.subs.len() != before);
                    }
                }
                self.send(Out::UnsubAck { pkid, existed });
                None
            }
            In::PingReq => {
                self.send(Out::PingResp);
                None
            }
            In::Disconnect { with_will } => Some(if with_will {
                End::CleanWithWill
            } else {
                End::Clean
            }),
            In::Connect | In::Unexpected => Some(End::Abrupt),
        }
    }

    /// Applies the content-based refusal, if it matches this PUBLISH; true when refused.
    fn refuse(&self, payload: &[u8], qos: u8, pkid: u16) -> bool {
        if self
            .client_id
            .starts_with(crate::subscriber::SUBSCRIBER_CLIENT_ID_PREFIX)
        {
            return false;
        }
        let mut guard = self
            .shared
            .refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(r) = guard.as_mut() else {
            return false;
        };
        let matches = r.marker.is_empty() || payload.windows(r.marker.len()).any(|w| w == r.marker);
        if !matches || r.times == Some(0) {
            return false;
        }
        if let Some(n) = r.times.as_mut() {
            *n -= 1;
        }
        self.shared.refused.fetch_add(1, Ordering::SeqCst);
        if self.v5 && qos == 1 {
            self.send(Out::PubAck {
                pkid,
                reason: r.reason,
            });
        }
        if r.then_close {
            self.send(Out::Close);
        }
        true
    }

    fn subscribe(&self, pkid: u16, filters: Vec<SubReq>) {
        let mut guard = self.shared.state();
        let st = &mut *guard;
        let Some(sess) = st.sessions.get_mut(&self.conn_id) else {
            return;
        };
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for f in filters {
            if !codec::valid_filter(&f.filter) {
                codes.push(if self.v5 { 0x8F } else { 0x80 });
                continue;
            }
            let granted = f.qos.min(1);
            let sub = Sub {
                filter: f.filter.clone(),
                qos: granted,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
            };
            let existed = match sess.subs.iter_mut().find(|s| s.filter == f.filter) {
                Some(s) => {
                    *s = sub;
                    true
                }
                None => {
                    sess.subs.push(sub);
                    false
                }
            };
            codes.push(granted);
            if f.retain_handling == 0 || (f.retain_handling == 1 && !existed) {
                for (topic, m) in &st.retained {
                    if codec::topic_matches(topic, &f.filter) {
                        retained.push(Message {
                            topic: topic.clone(),
                            payload: m.payload.clone(),
                            qos: m.qos.min(granted),
                            retain: true,
                        });
                    }
                }
            }
        }
        // Under the lock: SUBACK, then retained messages, then anything routed later.
        self.send(Out::SubAck { pkid, codes });
        for m in retained {
            self.send(Out::Publish(m));
        }
    }
}

/// Stores/clears the retained copy and forwards `msg` to every matching session (once per
/// session, at the highest matching subscription QoS). Returns how many sessions got it.
fn route(st: &mut State, from: Option<u64>, msg: Message) -> usize {
    if msg.retain {
        if msg.payload.is_empty() {
            st.retained.remove(&msg.topic);
        } else {
            st.retained.insert(msg.topic.clone(), msg.clone());
        }
    }
    let mut matched = 0;
    for (id, sess) in &st.sessions {
        let mut best: Option<(u8, bool)> = None;
        for sub in &sess.subs {
            if sub.no_local && from == Some(*id) {
                continue;
            }
            if codec::topic_matches(&msg.topic, &sub.filter) {
                let qos = msg.qos.min(sub.qos);
                let retain = msg.retain && sub.retain_as_published;
                best = Some(match best {
                    Some((q, r)) => (q.max(qos), r || retain),
                    None => (qos, retain),
                });
            }
        }
        if let Some((qos, retain)) = best {
            matched += 1;
            let _ = sess.tx.send(Out::Publish(Message {
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                qos,
                retain,
            }));
        }
    }
    matched
}

/// Writes queued packets in order, batching whatever is already queued; returns on
/// `Out::Close`, when every sender is gone, or on a write error.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    v5: bool,
    max_packet_size: Option<u32>,
) {
    let mut next_pkid: u16 = 0;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    while let Some(first) = rx.recv().await {
        let mut close = false;
        let mut item = Some(first);
        while let Some(out) = item.take() {
            if matches!(out, Out::Close) {
                close = true;
                break;
            }
            let pkid = match &out {
                Out::Publish(m) if m.qos > 0 => {
                    next_pkid = next_pkid.wrapping_add(1).max(1);
                    next_pkid
                }
                _ => 0,
            };
            if codec::write_packet(&out, v5, pkid, max_packet_size, &mut buf).is_err() {
                return;
            }
            if buf.len() >= 256 * 1024 {
                break;
            }
            item = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            let chunk: Bytes = buf.split().freeze();
            if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
        if close {
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
            return;
        }
    }
}
