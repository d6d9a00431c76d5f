//! `Subscriber`: a rumqttc v5 client over mutual TLS that collects what it receives, and
//! keeps reconnecting/resubscribing if the broker goes away.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::pki::Pki;

/// One received message: `(topic, payload, retain flag)`.
pub type Received = (String, Vec<u8>, bool);

const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Client ids of [`Subscriber`]s start with this; [`Fault`](crate::broker::Fault)s never apply
/// to them.
pub const SUBSCRIBER_CLIENT_ID_PREFIX: &str = "testkit-sub-";

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Subscription state shared with the background task.
#[derive(Debug, Clone, Copy, Default)]
struct SubState {
    /// Currently connected with the subscription acknowledged.
    active: bool,
    /// SUBACKs (granting the filter) received so far, over all connections.
    acks: u64,
}

/// A QoS 1, clean-start MQTT v5 subscriber on one topic filter.
///
/// Messages are pushed into an unbounded channel by a background task; read them with
/// [`Subscriber::recv`] / [`Subscriber::collect`]. Dropping the subscriber stops the task.
pub struct Subscriber {
    client: AsyncClient,
    client_id: String,
    rx: mpsc::UnboundedReceiver<Received>,
    subscribed: watch::Receiver<SubState>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Connects to `localhost:port` (TLS server name "localhost", CA from `pki`), presenting
    /// the PKI's client certificate unless `client_cert_files = Some((cert, key))`, subscribes
    /// `filter` at QoS 1 and returns once the SUBACK granted it (error after 10 s).
    pub async fn connect(
        port: u16,
        pki: &Pki,
        client_cert_files: Option<(PathBuf, PathBuf)>,
        filter: &str,
    ) -> Result<Subscriber> {
        Self::connect_within(port, pki, client_cert_files, filter, SUBSCRIBE_TIMEOUT).await
    }

    /// Like [`Subscriber::connect`] but giving up after `timeout` (e.g. short, when the
    /// connection is expected to be refused).
    pub async fn connect_within(
        port: u16,
        pki: &Pki,
        client_cert_files: Option<(PathBuf, PathBuf)>,
        filter: &str,
        timeout: Duration,
    ) -> Result<Subscriber> {
        let (cert, key) =
            client_cert_files.unwrap_or_else(|| (pki.client_cert_file(), pki.client_key_file()));
        let tls = crate::tls::client_config(&pki.ca_file(), Some((&cert, &key)))?;
        let client_id = format!(
            "{SUBSCRIBER_CLIENT_ID_PREFIX}{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::SeqCst)
        );
        let options = crate::client::v5_options(&client_id, port, tls);
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut subscribed) = watch::channel(SubState::default());
        let last_error = Arc::new(Mutex::new(None::<String>));
        let task = tokio::spawn(run(
            eventloop,
            client.clone(),
            filter.to_string(),
            tx,
            sub_tx,
            last_error.clone(),
        ));
        let ok = matches!(
            tokio::time::timeout(timeout, subscribed.wait_for(|s| s.active)).await,
            Ok(Ok(_))
        );
        if !ok {
            task.abort();
            let err = last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| "no SUBACK".to_string());
            return Err(anyhow!(
                "subscriber could not subscribe {filter:?} on localhost:{port} within {timeout:?}: {err}"
            ));
        }
        Ok(Subscriber {
            client,
            client_id,
            rx,
            subscribed,
            task,
        })
    }

    /// The MQTT client id used by this subscriber.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether the subscriber is currently connected with its subscription acknowledged
    /// (as far as its background task has noticed).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.borrow().active
    }

    /// How many times the subscription was granted so far (1 after `connect`, +1 after
    /// each reconnect).
    pub fn subscribe_count(&self) -> u64 {
        self.subscribed.borrow().acks
    }

    /// Waits until the subscriber is connected and subscribed; false on timeout.
    ///
    /// Right after a broker goes away this may still return true at once if the background
    /// task has not noticed yet: to wait for a resubscription after a broker restart, note
    /// [`Subscriber::subscribe_count`] before and use [`Subscriber::wait_subscribe_count`].
    pub async fn wait_subscribed(&mut self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.subscribed.wait_for(|s| s.active)).await,
            Ok(Ok(_))
        )
    }

    /// Waits until the subscription was granted at least `n` times in total and is active;
    /// false on timeout.
    pub async fn wait_subscribe_count(&mut self, n: u64, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(
                timeout,
                self.subscribed.wait_for(|s| s.active && s.acks >= n)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Next received message, or `None` if nothing arrives within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Receives until `n` messages arrived or `timeout` (overall) elapsed.
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => out.push(m),
                _ => break,
            }
        }
        out
    }

    /// Everything received so far and not yet read, without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
        out
    }

    /// Sends DISCONNECT (best effort) and stops the background task.
    pub async fn disconnect(self) {
        let _ = self.client.try_disconnect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Drop aborts the task.
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    tx: mpsc::UnboundedSender<Received>,
    subscribed: watch::Sender<SubState>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Clean start: the broker forgot the subscription, so (re)subscribe.
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    *last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("subscribe request: {e}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if granted {
                    subscribed.send_modify(|s| {
                        s.active = true;
                        s.acks += 1;
                    });
                } else {
                    *last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("subscription refused: {:?}", ack.return_codes));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let _ = tx.send((topic, p.payload.to_vec(), p.retain));
            }
            Ok(_) => {}
            Err(e) => {
                subscribed.send_modify(|s| s.active = false);
                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
}
