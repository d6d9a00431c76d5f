//! Fair use of a feed by its senders: connection slots (taken after the TLS handshake, at most
//! `max_connections_per_peer` per address, and when the feed is full the connection that has
//! made no progress for longest gives up its slot), and per-address message and byte rates
//! (token buckets). Pure bookkeeping with the clock passed in: no sockets, no sleeps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The connection slots of one feed.
#[derive(Debug)]
pub struct Slots {
    /// Connections served at once (after their handshake).
    max: usize,
    /// Open connections per address, handshakes included.
    per_peer_max: usize,
    /// Open connections per address, handshakes included.
    per_peer: HashMap<IpAddr, usize>,
    /// Connections holding a slot, by id.
    held: HashMap<u64, Slot>,
    next_id: u64,
}

#[derive(Debug)]
struct Slot {
    /// When the connection was admitted or last completed a message.
    progress: Instant,
    /// Told when the slot is taken away.
    evict: Arc<Notify>,
}

/// A slot in use: the connection's id and what tells it that it lost the slot.
#[derive(Debug)]
pub struct Admitted {
    /// For [`Slots::progress`] and [`Slots::release`].
    pub id: u64,
    /// Notified when a newer connection took this slot.
    pub evict: Arc<Notify>,
    /// Whether another connection was told to give up its slot for this one.
    pub evicted_other: bool,
}

impl Slots {
    /// Slots for a feed: `max` served at once, `per_peer_max` open per address.
    pub fn new(max: usize, per_peer_max: usize) -> Slots {
        Slots {
            max: max.max(1),
            per_peer_max: per_peer_max.max(1),
            per_peer: HashMap::new(),
            held: HashMap::new(),
            next_id: 0,
        }
    }

    /// A new TCP connection from `peer`: counted against its address's cap (false: over it,
    /// close the connection). Every `true` must be matched by [`Slots::close`].
    pub fn open(&mut self, peer: IpAddr) -> bool {
        let n = self.per_peer.entry(peer).or_insert(0);
        if *n >= self.per_peer_max {
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `peer` has ended (after [`Slots::open`] said yes).
    pub fn close(&mut self, peer: IpAddr) {
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// A connection has finished its handshake: give it a slot. When every slot is taken, the
    /// connection that has gone longest without completing a message loses its slot (it is
    /// notified, finishes any message it is committing, and closes).
    pub fn admit(&mut self, now: Instant) -> Admitted {
        let mut evicted_other = false;
        if self.held.len() >= self.max
            && let Some((&oldest, _)) = self.held.iter().min_by_key(|(_, s)| s.progress)
            && let Some(s) = self.held.remove(&oldest)
        {
            s.evict.notify_one();
            evicted_other = true;
        }
        let id = self.next_id;
        self.next_id += 1;
        let evict = Arc::new(Notify::new());
        self.held.insert(
            id,
            Slot {
                progress: now,
                evict: evict.clone(),
            },
        );
        Admitted {
            id,
            evict,
            evicted_other,
        }
    }

    /// The connection completed a message: it is in use, not holding a slot idle.
    pub fn progress(&mut self, id: u64, now: Instant) {
        if let Some(s) = self.held.get_mut(&id) {
            s.progress = now;
        }
    }

    /// The connection holding slot `id` has ended (a no-op if it was evicted).
    pub fn release(&mut self, id: u64) {
        self.held.remove(&id);
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.held.len()
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.last = now;
    }
}

/// Which rate a sender went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverRate {
    /// More than this many messages a second.
    Messages(u32),
    /// More than this many bytes a second.
    Bytes(u64),
}

impl OverRate {
    /// The ERR text of the `AR`.
    pub fn text(self) -> String {
        match self {
            OverRate::Messages(n) => format!(
                "rate limit: more than {n} messages a second from this address; not accepted, resend later"
            ),
            OverRate::Bytes(n) => format!(
                "rate limit: more than {n} bytes a second from this address; not accepted, resend later"
            ),
        }
    }
}

/// Per-address message and byte rates of one feed (0: no limit). One second's worth may come
/// at once; a single message larger than a second's bytes is let through when the bucket is
/// full, so a large but legitimate message is never refused for ever.
#[derive(Debug)]
pub struct PeerRates {
    messages_per_sec: u32,
    bytes_per_sec: u64,
    /// (messages, bytes) buckets per address.
    peers: HashMap<IpAddr, (Bucket, Bucket)>,
}

/// Addresses whose buckets have refilled for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

impl PeerRates {
    /// Limits for a feed (0: that rate is not limited).
    pub fn new(messages_per_sec: u32, bytes_per_sec: u64) -> PeerRates {
        PeerRates {
            messages_per_sec,
            bytes_per_sec,
            peers: HashMap::new(),
        }
    }

    /// Whether any rate is limited.
    pub fn enabled(&self) -> bool {
        self.messages_per_sec > 0 || self.bytes_per_sec > 0
    }

    /// One message of `bytes` from `peer` at `now`: taken (Ok) or over a rate (nothing taken).
    pub fn take(&mut self, peer: IpAddr, bytes: usize, now: Instant) -> Result<(), OverRate> {
        if !self.enabled() {
            return Ok(());
        }
        if self.peers.len() > 4096 {
            self.peers
                .retain(|_, (m, _)| now.saturating_duration_since(m.last) < FORGET_AFTER);
        }
        let (mr, br) = (f64::from(self.messages_per_sec), self.bytes_per_sec as f64);
        let (m, b) = self
            .peers
            .entry(peer)
            .or_insert_with(|| (Bucket::full(mr, now), Bucket::full(br, now)));
        m.refill(mr, mr, now);
        b.refill(br, br, now);
        if self.messages_per_sec > 0 && m.tokens < 1.0 {
            return Err(OverRate::Messages(self.messages_per_sec));
        }
        let need = bytes as f64;
        if self.bytes_per_sec > 0 && b.tokens < need && b.tokens < br {
            return Err(OverRate::Bytes(self.bytes_per_sec));
        }
        if self.messages_per_sec > 0 {
            m.tokens -= 1.0;
        }
        if self.bytes_per_sec > 0 {
            // A message larger than the whole bucket empties it (and may owe a little).
            b.tokens -= need;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_feed_admits_a_newcomer_by_evicting_the_connection_idle_longest() {
        let t0 = Instant::now();
        let mut s = Slots::new(2, 8);
        let a = s.admit(t0);
        let b = s.admit(t0 + Duration::from_secs(1));
        s.progress(a.id, t0 + Duration::from_secs(5));
        // Full: b has gone longest without completing a message.
        let c = s.admit(t0 + Duration::from_secs(6));
        assert!(c.evicted_other);
        assert_eq!(s.in_use(), 2);
        // b was told, a was not.
        let told = b.evict.notified();
        tokio::pin!(told);
        assert!(futures_ready(told.as_mut()));
        let not_told = a.evict.notified();
        tokio::pin!(not_told);
        assert!(!futures_ready(not_told.as_mut()));
        // b's task releasing its (already taken) slot changes nothing.
        s.release(b.id);
        assert_eq!(s.in_use(), 2);
    }

    fn futures_ready<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        f.poll(&mut cx).is_ready()
    }

    #[test]
    fn one_address_is_held_to_its_cap_and_others_are_not_affected() {
        let mut s = Slots::new(64, 2);
        assert!(s.open(ip("127.0.0.2")));
        assert!(s.open(ip("127.0.0.2")));
        assert!(!s.open(ip("127.0.0.2")));
        assert!(s.open(ip("127.0.0.3")));
        s.close(ip("127.0.0.2"));
        assert!(s.open(ip("127.0.0.2")));
    }

    #[test]
    fn rates_refuse_beyond_one_seconds_worth_and_recover_with_time() {
        let t0 = Instant::now();
        let mut r = PeerRates::new(3, 0);
        let p = ip("127.0.0.2");
        for _ in 0..3 {
            assert_eq!(r.take(p, 100, t0), Ok(()));
        }
        assert_eq!(r.take(p, 100, t0), Err(OverRate::Messages(3)));
        // Another address has its own bucket.
        assert_eq!(r.take(ip("127.0.0.3"), 100, t0), Ok(()));
        assert_eq!(r.take(p, 100, t0 + Duration::from_millis(400)), Ok(()));

        let mut r = PeerRates::new(0, 1000);
        assert_eq!(r.take(p, 600, t0), Ok(()));
        assert_eq!(r.take(p, 600, t0), Err(OverRate::Bytes(1000)));
        assert_eq!(r.take(p, 600, t0 + Duration::from_millis(300)), Ok(()));
        // Larger than a second's bytes: let through once the bucket is full again.
        assert!(r.take(p, 5000, t0 + Duration::from_secs(1)).is_err());
        assert_eq!(r.take(p, 5000, t0 + Duration::from_secs(3)), Ok(()));
    }

    #[test]
    fn no_limits_take_everything() {
        let mut r = PeerRates::new(0, 0);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(r.take(ip("127.0.0.2"), 1 << 20, t0), Ok(()));
        }
    }
}
