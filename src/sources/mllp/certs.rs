//! TLS of one MLLP feed: the server certificate it presents (reloaded on SIGHUP and when its
//! files change, without touching open connections; a new certificate that cannot be used is
//! refused loudly and the old one kept), and which client certificates may send on it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::config::ListenerTls;
use crate::telemetry::{CertInUse, FeedCounters};
use crate::tls::{MllpTlsFiles, TlsSetupError};

/// Longest certificate subject kept (in records, health and logs).
pub const MAX_SUBJECT_CHARS: usize = 256;

/// A feed's TLS: the acceptor in use and what it was built from.
pub struct MllpTls {
    /// Feed name (logs).
    feed: Arc<str>,
    /// The files named in the config.
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    crl_file: Option<PathBuf>,
    /// Client certificate names (subject CN or DNS SAN) allowed to send; empty: any that
    /// chains to `client_ca_file`.
    allow_names: Vec<String>,
    /// The acceptor each new handshake uses.
    current: RwLock<TlsAcceptor>,
    /// Modification time and length of each file when last loaded (or tried).
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
    /// Where the certificate in use is reported (health).
    counters: Arc<FeedCounters>,
}

impl MllpTls {
    /// Build the feed's TLS from its config (at start-up: an error stops start-up).
    pub fn load(
        feed: &str,
        cfg: &ListenerTls,
        counters: Arc<FeedCounters>,
    ) -> Result<MllpTls, TlsSetupError> {
        let config = crate::tls::mllp_server_config(MllpTlsFiles {
            cert_file: &cfg.cert_file,
            key_file: &cfg.key_file,
            client_ca_file: cfg.client_ca_file.as_deref(),
            crl_file: cfg.crl_file.as_deref(),
        })?;
        let cert = describe(&cfg.cert_file)?;
        let me = MllpTls {
            feed: Arc::from(feed),
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            client_ca_file: cfg.client_ca_file.clone(),
            crl_file: cfg.crl_file.clone(),
            allow_names: cfg.allow_names.clone(),
            current: RwLock::new(TlsAcceptor::from(config)),
            stamps: Mutex::new(Vec::new()),
            counters,
        };
        *me.stamps.lock().unwrap_or_else(|e| e.into_inner()) = me.stamp();
        me.counters.set_tls_certificate(cert);
        Ok(me)
    }

    fn files(&self) -> MllpTlsFiles<'_> {
        MllpTlsFiles {
            cert_file: &self.cert_file,
            key_file: &self.key_file,
            client_ca_file: self.client_ca_file.as_deref(),
            crl_file: self.crl_file.as_deref(),
        }
    }

    fn build(&self) -> Result<(TlsAcceptor, CertInUse), TlsSetupError> {
        let config = crate::tls::mllp_server_config(self.files())?;
        let cert = describe(&self.cert_file)?;
        Ok((TlsAcceptor::from(config), cert))
    }

    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [
            Some(&self.cert_file),
            Some(&self.key_file),
            self.client_ca_file.as_ref(),
            self.crl_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
    }

    /// The acceptor for a new handshake (connections already open keep theirs).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Read the files again and, if they make a usable configuration, use it for every new
    /// handshake. If not, say so loudly (error log, health) and keep the one in use.
    pub fn reload(&self) -> Result<(), TlsSetupError> {
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = self.stamp();
        match self.build() {
            Ok((acceptor, cert)) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
                info!(feed = %self.feed, subject = %cert.subject, not_after = %crate::record::rfc3339_us(cert.not_after * 1_000_000), "MLLP server certificate loaded");
                self.counters.set_tls_certificate(cert);
                Ok(())
            }
            Err(e) => {
                error!(feed = %self.feed, error = %e, "new MLLP TLS files refused: the certificate in use is kept; fix the files and send SIGHUP (or save them again)");
                if let Some(mut c) = self.counters.tls_certificate() {
                    c.reload_error = Some(e.to_string());
                    self.counters.set_tls_certificate(c);
                }
                Err(e)
            }
        }
    }

    /// Log the expiry warning when the certificate in use expires within
    /// [`crate::app::expiry::WARN_DAYS`] days (or has expired); answers whether it did.
    pub fn warn_if_expiring(&self, now_secs: i64) -> bool {
        let Some(c) = self.counters.tls_certificate() else {
            return false;
        };
        let days = (c.not_after - now_secs).div_euclid(86_400);
        if days > crate::app::expiry::WARN_DAYS {
            return false;
        }
        warn!(
            feed = %self.feed,
            days_left = days,
            subject = %c.subject,
            not_after = %crate::record::rfc3339_us(c.not_after * 1_000_000),
            "the MLLP server certificate in use expires soon: renew it (replace the files; \
             siterelay takes the new ones without a restart or a dropped connection)"
        );
        true
    }

    /// Reload when any of the files has changed since it was last loaded (or tried).
    pub fn reload_if_changed(&self) {
        let now = self.stamp();
        let changed = *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != now;
        if changed {
            let _ = self.reload();
        }
    }

    /// Whether the sender's (already verified) certificate may send on this feed; answers its
    /// subject (None without client certificates), or why not.
    pub fn check_sender(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
    ) -> Result<Option<String>, String> {
        let Some(end) = chain.and_then(|c| c.first()) else {
            return Ok(None);
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(end) else {
            return Err("client certificate cannot be read".into());
        };
        let subject = bounded(&cert.subject().to_string());
        if self.allow_names.is_empty() {
            return Ok(Some(subject));
        }
        let mut names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                    names.push(d.to_string());
                }
            }
        }
        if names
            .iter()
            .any(|n| self.allow_names.iter().any(|a| a.eq_ignore_ascii_case(n)))
        {
            Ok(Some(subject))
        } else {
            Err(format!(
                "client certificate '{subject}' is not in this feed's tls.allow_names"
            ))
        }
    }
}

/// Subject and end of validity of the first certificate in a PEM file.
fn describe(path: &Path) -> Result<CertInUse, TlsSetupError> {
    let certs = crate::tls::load_certs(path)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&certs[0]).map_err(|e| TlsSetupError::File {
            path: path.display().to_string(),
            reason: format!("cannot read the certificate: {e}"),
        })?;
    Ok(CertInUse {
        subject: bounded(&cert.subject().to_string()),
        not_after: cert.validity().not_after.timestamp(),
        reload_error: None,
    })
}

fn bounded(s: &str) -> String {
    if s.chars().count() <= MAX_SUBJECT_CHARS {
        return s.to_string();
    }
    let mut t: String = s.chars().take(MAX_SUBJECT_CHARS - 1).collect();
    t.push('…');
    t
}

/// Every TLS feed's [`MllpTls`], for SIGHUP.
#[derive(Clone, Default)]
pub struct Reloader(pub(crate) Vec<Arc<MllpTls>>);

impl Reloader {
    /// Reload every MLLP feed's certificate (each keeps its old one if the new files are
    /// unusable); answers how many were refused.
    pub fn reload(&self) -> usize {
        self.0.iter().filter(|t| t.reload().is_err()).count()
    }
}
