//! The certificate-expiry warning: at start and then once a day, every certificate *in use*
//! (the MQTT client certificate and each TLS MLLP feed's server certificate) that expires
//! within [`WARN_DAYS`] days, or has expired, gets a WARN line naming it, its expiry and what
//! to do. It reads the certificates in use, never the files on disk: a renewal that was refused
//! (the old certificate kept) still warns. Health reports the same certificates
//! (`certificates.client_days_left`, `feeds.<name>.tls_certificate.days_left`).

use std::sync::Arc;
use std::time::Duration;

use crate::sink::identity::ClientIdentity;
use crate::sources::mllp::certs::Reloader;

/// Warn from this many days before a certificate expires (and after it has).
pub const WARN_DAYS: i64 = crate::sink::identity::WARN_DAYS;
/// How often the warning is repeated.
pub const EVERY: Duration = Duration::from_secs(86_400);

/// The certificates the warning looks at.
pub struct Watched {
    /// The MQTT client identity in use (None with `insecure_plaintext`).
    pub mqtt: Option<Arc<ClientIdentity>>,
    /// Every MLLP feed with TLS.
    pub mllp: Reloader,
}

impl Watched {
    /// Log the warning for each certificate that is due; answers how many were.
    pub fn warn_due(&self, now_secs: i64) -> usize {
        let mqtt = self
            .mqtt
            .as_ref()
            .is_some_and(|id| id.warn_if_expiring(now_secs));
        let mllp = self
            .mllp
            .0
            .iter()
            .filter(|t| t.warn_if_expiring(now_secs))
            .count();
        usize::from(mqtt) + mllp
    }
}

/// Until shutdown: the warning at start, then every `every` ([`EVERY`] in the daemon).
pub async fn run(watched: Watched, every: Duration, shutdown: crate::shutdown::Shutdown) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
            _ = tick.tick() => {
                watched.warn_due(jiff::Timestamp::now().as_second());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ListenerTls;
    use crate::sink::identity::IdentityFiles;
    use crate::sources::mllp::certs::MllpTls;
    use crate::telemetry::FeedCounters;
    use siterelay_testkit::pki::{Pki, PkiOptions};
    use std::sync::Mutex;

    /// Log lines, captured.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// A PKI whose client and server certificates expire in `days` days, as the daemon
    /// would load them: the MQTT identity and one TLS MLLP feed.
    fn watched(dir: &std::path::Path, days: u32) -> Watched {
        let pki = Pki::generate_with(
            dir,
            "exp",
            PkiOptions {
                client_valid_days: days,
                server_valid_days: days,
                ..PkiOptions::default()
            },
        )
        .unwrap();
        let mqtt = ClientIdentity::load(IdentityFiles {
            ca: pki.ca_file(),
            cert: pki.client_cert_file(),
            key: pki.client_key_file(),
        })
        .unwrap();
        let tls = MllpTls::load(
            "lab",
            &ListenerTls {
                cert_file: pki.server_cert_file(),
                key_file: pki.server_key_file(),
                client_ca_file: None,
                allow_names: Vec::new(),
                crl_file: None,
            },
            Arc::new(FeedCounters::default()),
        )
        .unwrap();
        Watched {
            mqtt: Some(Arc::new(mqtt)),
            mllp: Reloader(vec![Arc::new(tls)]),
        }
    }

    /// Run the warning for `days_run` days of (paused, auto-advanced) tokio time.
    async fn run_for(w: Watched, days_run: u64) -> String {
        let lines = Lines::default();
        let out = lines.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(sub);
        let (trigger, shutdown) = crate::shutdown::channel();
        let stop = async move {
            tokio::time::sleep(EVERY * days_run as u32 + Duration::from_secs(60)).await;
            trigger.trigger();
        };
        tokio::join!(run(w, EVERY, shutdown), stop);
        lines.text()
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_expiring_within_30_days_warn_at_start_and_then_every_day() {
        let dir = tempfile::tempdir().unwrap();
        let log = run_for(watched(dir.path(), 10), 3).await;
        let mqtt: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("MQTT client certificate in use expires"))
            .collect();
        let mllp: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("MLLP server certificate in use expires"))
            .collect();
        // At start and after one, two and three days.
        assert_eq!(mqtt.len(), 4, "{log}");
        assert_eq!(mllp.len(), 4, "{log}");
        for l in mqtt.iter().chain(&mllp) {
            assert!(l.contains("WARN"), "{l}");
            // The pki's certificates run from yesterday to `days` from now.
            assert!(
                l.contains("days_left=9") || l.contains("days_left=10"),
                "{l}"
            );
        }
        assert!(mllp.iter().all(|l| l.contains("feed=lab")), "{log}");
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_with_more_than_30_days_left_do_not_warn() {
        let dir = tempfile::tempdir().unwrap();
        let log = run_for(watched(dir.path(), 60), 2).await;
        assert!(!log.contains("expires"), "{log}");
    }
}
