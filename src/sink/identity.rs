//! The MQTT client's identity (CA, certificate, key) as it is *in use*, and its reload.
//!
//! Loaded at start (a key file readable by group or others is refused, with the `chmod` that
//! fixes it). Reloaded on SIGHUP and when one of the three files changes (polled every
//! [`POLL_EVERY`]: modification time, size, inode): the new files are read and checked
//! completely (parse, key matches certificate, key permissions) before anything changes; a
//! broken set is refused loudly and the identity in use is kept. A good one replaces it and
//! the sink reconnects with it (after the PUBACKs outstanding at that moment, or 2 s; nothing
//! is lost: unconfirmed records stay pending and are sent again on the new connection).
//! Health reports the certificate in use, never the file on disk. From 30 days before expiry,
//! a warning is logged at start and once a day (`app::expiry`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

/// How often the files are looked at.
pub const POLL_EVERY: Duration = Duration::from_secs(5);
/// Warn daily from this many days before the certificate expires.
pub const WARN_DAYS: i64 = 30;

/// The three files.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// `mqtt.ca_file`.
    pub ca: PathBuf,
    /// `mqtt.cert_file`.
    pub cert: PathBuf,
    /// `mqtt.key_file`.
    pub key: PathBuf,
}

/// What makes a file "changed": modification time, size and inode.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(p: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// One loaded, checked identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The rustls configuration the sink connects with.
    pub config: Arc<rustls::ClientConfig>,
    /// The client certificate's subject (for logs; no patient data).
    pub subject: String,
    /// Its serial number (hex).
    pub serial: String,
    /// Its validity (seconds since the epoch).
    pub not_before: i64,
    /// Its validity (seconds since the epoch).
    pub not_after: i64,
    /// The earliest expiry among the CA certificates.
    pub ca_not_after: Option<i64>,
    stamps: [Stamp; 3],
}

impl Identity {
    /// Whole days until the client certificate expires (negative once expired).
    pub fn days_left(&self, now_secs: i64) -> i64 {
        (self.not_after - now_secs).div_euclid(86_400)
    }

    /// Whole days until the earliest CA certificate expires.
    pub fn ca_days_left(&self, now_secs: i64) -> Option<i64> {
        self.ca_not_after.map(|t| (t - now_secs).div_euclid(86_400))
    }
}

/// Refuse a private key file that group or others may read; the error says how to fix it.
pub fn check_key_mode(key: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key)
        .map_err(|e| format!("{}: {e}", key.display()))?
        .permissions()
        .mode();
    if mode & 0o044 != 0 {
        return Err(format!(
            "{} is readable by {} (mode {:04o}): the appliance's private key must be readable by \
             its owner only; fix it with: chmod 600 {}",
            key.display(),
            if mode & 0o004 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode & 0o7777,
            key.display()
        ));
    }
    Ok(())
}

/// Read and check the three files: every certificate parses, the key parses and matches the
/// certificate, the key is private.
pub fn load(files: &IdentityFiles) -> Result<Identity, String> {
    let stamps = [stamp(&files.ca), stamp(&files.cert), stamp(&files.key)];
    check_key_mode(&files.key)?;
    let certs = crate::tls::load_certs(&files.cert).map_err(|e| e.to_string())?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0])
        .map_err(|e| format!("{}: not a readable certificate: {e}", files.cert.display()))?;
    let cas = crate::tls::load_certs(&files.ca).map_err(|e| e.to_string())?;
    let ca_not_after = cas
        .iter()
        .filter_map(|d| x509_parser::parse_x509_certificate(d).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min();
    let key = crate::tls::load_key(&files.key).map_err(|e| e.to_string())?;
    // rustls checks that the key belongs to the certificate (InconsistentKeys).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    if let Err(e) = certified.keys_match() {
        if !matches!(
            e,
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)
        ) {
            return Err(format!(
                "{} does not belong to the certificate in {} ({e})",
                files.key.display(),
                files.cert.display()
            ));
        }
    }
    let config = crate::tls::mqtt_client_config(&files.ca, &files.cert, &files.key)
        .map_err(|e| e.to_string())?;
    Ok(Identity {
        config,
        subject: crate::text::bounded(&leaf.subject().to_string()).into_owned(),
        serial: leaf.tbs_certificate.raw_serial_as_string(),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
        ca_not_after,
        stamps,
    })
}

/// The identity in use, shared by the sink (to connect) and health (to report it).
#[derive(Debug)]
pub struct ClientIdentity {
    files: IdentityFiles,
    current: RwLock<Arc<Identity>>,
    generation: watch::Sender<u64>,
}

impl ClientIdentity {
    /// Load at start: an error stops start-up.
    pub fn load(files: IdentityFiles) -> Result<ClientIdentity, String> {
        let id = load(&files)?;
        Ok(ClientIdentity {
            files,
            current: RwLock::new(Arc::new(id)),
            generation: watch::channel(0).0,
        })
    }

    /// The identity in use.
    pub fn current(&self) -> Arc<Identity> {
        self.current.read().expect("identity lock").clone()
    }

    /// Changes when a new identity is taken into use.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Did any of the files change since the identity in use was read?
    pub fn files_changed(&self) -> bool {
        let now = [
            stamp(&self.files.ca),
            stamp(&self.files.cert),
            stamp(&self.files.key),
        ];
        now != self.current().stamps
    }

    /// Read the files again. `Ok`: the new identity is in use; `Err`: refused, the one in use
    /// is kept (the files are not tried again until they change again).
    pub fn reload(&self, why: &str) -> Result<(), String> {
        let old = self.current();
        match load(&self.files) {
            Ok(new) => {
                info!(
                    why,
                    subject = %new.subject,
                    serial = %new.serial,
                    not_after = %crate::record::rfc3339_us(new.not_after * 1_000_000),
                    previous_serial = %old.serial,
                    "MQTT client certificate reloaded; reconnecting with it"
                );
                *self.current.write().expect("identity lock") = Arc::new(new);
                self.generation.send_modify(|g| *g += 1);
                Ok(())
            }
            Err(e) => {
                error!(
                    why,
                    error = %e,
                    in_use_serial = %old.serial,
                    in_use_not_after = %crate::record::rfc3339_us(old.not_after * 1_000_000),
                    "new MQTT client certificate/key/CA REFUSED; the one in use is kept"
                );
                // Remember the broken files' stamps so they are not retried every poll.
                let mut kept = (*old).clone();
                kept.stamps = [
                    stamp(&self.files.ca),
                    stamp(&self.files.cert),
                    stamp(&self.files.key),
                ];
                *self.current.write().expect("identity lock") = Arc::new(kept);
                Err(e)
            }
        }
    }

    /// Log the expiry warning when due (from [`WARN_DAYS`] before expiry).
    pub fn warn_if_expiring(&self, now_secs: i64) -> bool {
        let id = self.current();
        let days = id.days_left(now_secs);
        if days <= WARN_DAYS {
            warn!(
                days_left = days,
                subject = %id.subject,
                not_after = %crate::record::rfc3339_us(id.not_after * 1_000_000),
                "the MQTT client certificate in use expires soon: renew it (replace the files; \
                 siterelay takes the new ones without a restart)"
            );
            return true;
        }
        false
    }

    /// Until shutdown: reload on SIGHUP and when the files change. (The expiry warning, at
    /// start and then once a day, is `app::expiry`'s, with the MLLP feeds' certificates.)
    pub async fn watch(self: Arc<Self>, shutdown: crate::shutdown::Shutdown) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no SIGHUP handler: certificates reload on file change only");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.requested() => break,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                    let _ = self.reload("SIGHUP");
                }
                _ = poll.tick() => {
                    if self.files_changed() {
                        let _ = self.reload("file changed");
                    }
                }
            }
        }
    }
}
