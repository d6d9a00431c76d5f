//! Held records: stored messages the sink has set aside because they cannot be published as
//! they are, so that no record blocks another.
//!
//! A row is held when its record is larger than the MQTT packet limit in force (the smaller of
//! our own `max_packet_bytes` and the broker's CONNACK Maximum Packet Size), when the broker
//! refused it with a permanent MQTT 5 reason code, or when its record could not be built (the
//! record builder failed or panicked). A held row:
//!
//! - stays in `messages` with its bytes and keeps its `pending` row (it is undelivered): it
//!   counts against `store.max_bytes` like any undelivered row, and pruning never deletes it
//!   (pruning takes ids only from the `delivered` log, and checks `pending` and `held`
//!   besides, under pressure too);
//! - has one row in `held(row_id, reason, detail, since_us)` saying why and since when
//!   (`detail` never carries message content);
//! - is not read by the sink's pending queries (they skip the ids in `held`), so neither a
//!   new connection nor a restart publishes it again on its own;
//! - leaves the `held` table when a person releases it ([`super::Outbox::unhold`], from
//!   `siterelay queue held retry`; it is then published again at once and, if it still cannot
//!   be published, held again), or when a `replay` resent it and the broker confirmed it (the
//!   delivered mark removes the hold in the same transaction).

/// Why a row is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// The record, as an MQTT PUBLISH packet, is larger than the packet limit in force.
    TooLarge,
    /// The broker answered its PUBLISH with a permanent MQTT 5 failure reason code.
    Refused,
    /// The record could not be built from the stored message (the builder failed or panicked).
    Unbuildable,
}

impl HoldReason {
    /// Stored and published name.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::TooLarge => "too_large",
            HoldReason::Refused => "refused",
            HoldReason::Unbuildable => "unbuildable",
        }
    }
}

/// A request to hold one row.
#[derive(Debug, Clone)]
pub struct Hold {
    /// The row (`messages.id`).
    pub row_id: i64,
    /// Why.
    pub reason: HoldReason,
    /// What exactly, for a person (sizes, limits, reason codes; never message content).
    pub detail: String,
}

/// The writer's answer to [`Hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// The row is now held.
    Held,
    /// The row was already held; its reason and detail were updated (its `since` kept).
    AlreadyHeld,
    /// No undelivered row has this id (delivered meanwhile, or never stored): nothing held.
    NotPending,
}

/// The writer's answer to an unhold: the rows released, oldest first. They are undelivered
/// rows again, and the sink publishes them at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unheld {
    /// Row ids released.
    pub row_ids: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::test_support::{msg, opts};
    use super::super::{Outbox, OutboxOptions};
    use super::*;

    fn hold(row_id: i64) -> Hold {
        Hold {
            row_id,
            reason: HoldReason::TooLarge,
            detail: "record 400000 bytes, limit 200000".into(),
        }
    }

    #[tokio::test]
    async fn a_held_row_is_kept_and_listed_but_never_read_as_pending_nor_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        // Zero retention and a cap the rows exceed: pruning deletes every delivered row it may.
        let prune_all = OutboxOptions {
            max_bytes: 8,
            retain_delivered: Duration::ZERO,
            ..opts(8)
        };
        {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            for body in ["one", "two", "three"] {
                ob.append(msg("a", body)).await.unwrap();
            }
            assert_eq!(ob.hold(hold(2)).await.unwrap(), HoldOutcome::Held);
            assert_eq!(ob.hold(hold(2)).await.unwrap(), HoldOutcome::AlreadyHeld);
            ob.mark_delivered(vec![1]).await;
            ob.flush().await;
            assert_eq!(ob.hold(hold(1)).await.unwrap(), HoldOutcome::NotPending);
            assert_eq!(ob.hold(hold(99)).await.unwrap(), HoldOutcome::NotPending);
            let g = ob.gauges();
            assert_eq!(g.held_count.load(Ordering::Relaxed), 1);
            assert_eq!(g.held_bytes.load(Ordering::Relaxed), 3);
            assert_eq!(g.pending_count.load(Ordering::Relaxed), 2);
            let r = ob.reader().unwrap();
            let pending: Vec<i64> = r
                .pending_after(0, 10, u64::MAX)
                .unwrap()
                .iter()
                .map(|p| p.row_id)
                .collect();
            assert_eq!(pending, [3]);
            assert_eq!(
                r.pending_of_feed("a", 0, 10, 10, u64::MAX)
                    .unwrap()
                    .iter()
                    .map(|p| p.row_id)
                    .collect::<Vec<_>>(),
                [3]
            );
            drop(ob);
            w.join();
        }
        // Reopened with retention that deletes everything delivered: the held row stays.
        let (ob, w) = Outbox::open(&path, prune_all).unwrap();
        ob.prune().await;
        ob.flush().await;
        let r = ob.reader().unwrap();
        let held = r.held(None, true).unwrap();
        assert_eq!(held.len(), 1);
        let h = &held[0];
        assert_eq!((h.row_id, h.feed.as_str(), h.seq), (2, "a", 2));
        assert_eq!(
            (h.reason.as_str(), h.raw.as_slice()),
            ("too_large", &b"two"[..])
        );
        assert!(r.held(Some(2), false).unwrap()[0].raw.is_empty());
        assert_eq!(r.held_per_feed().unwrap(), [("a".to_string(), 1)]);
        assert_eq!(ob.gauges().held_count.load(Ordering::Relaxed), 1);
        let stats = r.stats().unwrap();
        assert_eq!((stats[0].pending, stats[0].held), (2, 1));
        drop(ob);
        w.join();
    }

    #[tokio::test]
    async fn unhold_makes_rows_pending_again_and_hands_them_to_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, w) = Outbox::open(&dir.path().join("o.sqlite"), opts(1 << 20)).unwrap();
        for body in ["one", "two", "three"] {
            ob.append(msg("a", body)).await.unwrap();
        }
        ob.hold(hold(1)).await.unwrap();
        ob.hold(hold(3)).await.unwrap();
        assert_eq!(ob.unhold(Some(2)).await.unwrap(), Unheld::default());
        assert!(ob.take_released().is_empty());
        assert_eq!(ob.unhold(Some(3)).await.unwrap().row_ids, [3]);
        assert_eq!(ob.unhold(None).await.unwrap().row_ids, [1]);
        assert_eq!(ob.take_released(), [3, 1]);
        assert!(ob.take_released().is_empty());
        let r = ob.reader().unwrap();
        assert!(r.held(None, false).unwrap().is_empty());
        assert_eq!(r.pending_rows(&[3, 1, 3]).unwrap().len(), 2);
        assert_eq!(ob.gauges().held_count.load(Ordering::Relaxed), 0);
        drop(ob);
        w.join();
    }

    #[tokio::test]
    async fn a_held_row_delivered_by_a_replay_is_no_longer_held() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, w) = Outbox::open(&dir.path().join("o.sqlite"), opts(1 << 20)).unwrap();
        ob.append(msg("a", "one")).await.unwrap();
        ob.hold(hold(1)).await.unwrap();
        ob.mark_delivered(vec![1]).await;
        ob.flush().await;
        let g = ob.gauges();
        assert_eq!(
            (
                g.held_count.load(Ordering::Relaxed),
                g.held_bytes.load(Ordering::Relaxed),
                g.pending_count.load(Ordering::Relaxed)
            ),
            (0, 0, 0)
        );
        assert!(ob.reader().unwrap().held(None, false).unwrap().is_empty());
        drop(ob);
        w.join();
    }
}
