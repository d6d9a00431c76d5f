//! Shutdown as a type: one [`Trigger`] held by the daemon, a cheap [`Shutdown`] handle in every
//! task that must stop at a safe point. A task asks [`Shutdown::is_requested`] between units of
//! work (a connection finishes the message it is committing) and `select!`s on
//! [`Shutdown::requested`] while it waits for input.

use tokio::sync::watch;

/// Held by whoever decides that the daemon stops (a signal, `Daemon::stop`, a dead task).
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// Held by every task that must stop: clone it freely.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// A new trigger and the handle its tasks watch.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    /// Ask every task to stop; idempotent.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// Whether a stop has been asked for.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once a stop has been asked for (at once if it already was).
    pub async fn requested(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone: the daemon is ending either way.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_handle_sees_the_stop_and_a_late_waiter_returns_at_once() {
        let (trigger, shutdown) = channel();
        let other = shutdown.clone();
        assert!(!shutdown.is_requested());
        let waiter = tokio::spawn(async move { other.requested().await });
        trigger.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
        assert!(shutdown.is_requested());
        shutdown.requested().await;
        trigger.trigger();
    }

    #[tokio::test]
    async fn a_dropped_trigger_releases_waiters() {
        let (trigger, shutdown) = channel();
        drop(trigger);
        tokio::time::timeout(std::time::Duration::from_secs(5), shutdown.requested())
            .await
            .expect("no hang when the trigger is gone");
    }
}
