//! rustls configurations built from PEM files named in the config (ring provider, no platform
//! roots: the broker must chain to the configured CA, nothing else).

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// TLS set-up failure, naming the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the material (said once, in plain words: rustls's own text repeats
    /// itself, "keys may not be consistent: KeyMismatch").
    #[error("TLS configuration: {}", plain(.0))]
    Rustls(rustls::Error),
}

impl From<rustls::Error> for TlsSetupError {
    fn from(e: rustls::Error) -> Self {
        TlsSetupError::Rustls(e)
    }
}

/// A Unix time as a calendar date (`2024-02-01`), as certificates are talked about.
pub fn date(unix_secs: i64) -> String {
    jiff::Timestamp::from_second(unix_secs)
        .map(|t| t.strftime("%Y-%m-%d").to_string())
        .unwrap_or_else(|_| format!("{unix_secs} (Unix time)"))
}

/// A rustls error in an installer's words, dates as dates.
pub fn plain(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let d = |t: rustls_pki_types::UnixTime| date(t.as_secs() as i64);
    match e {
        E::InconsistentKeys(_) => "the client certificate (mqtt.cert_file) and the private key (mqtt.key_file) are not a pair: the certificate was issued for another key".into(),
        E::InvalidCertificate(c) => match c {
            C::ExpiredContext { time, not_after } => format!(
                "the broker's certificate expired on {} (this box's clock says {})",
                d(*not_after),
                d(*time)
            ),
            C::Expired => "the broker's certificate has expired".into(),
            C::NotValidYetContext { time, not_before } => format!(
                "the broker's certificate is not valid until {} (this box's clock says {}: check the clock)",
                d(*not_before),
                d(*time)
            ),
            C::NotValidYet => "the broker's certificate is not valid yet (check this box's clock)".into(),
            C::UnknownIssuer => "the broker's certificate does not chain to mqtt.ca_file".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the broker's certificate does not name mqtt.host (connect by a name or address in its certificate)".into()
            }
            other => format!("the broker's certificate was not accepted: {other:?}"),
        },
        E::AlertReceived(a) => match a {
            A::CertificateExpired => "the broker refused this appliance's client certificate: it has expired (renew mqtt.cert_file)".into(),
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::CertificateRequired => format!(
                "the broker refused this appliance's client certificate ({a:?}): is mqtt.cert_file issued by the CA the broker trusts for clients, and still valid?"
            ),
            other => format!("the broker ended the TLS handshake ({other:?})"),
        },
        other => other.to_string(),
    }
}

/// The number after `marker` in `text`.
fn number_after(text: &str, marker: &str) -> Option<i64> {
    let rest = &text[text.find(marker)? + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A rustls error found in an error's text (rustls's Display), in [`plain`]'s words.
fn plain_from_text(text: &str) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    use rustls_pki_types::UnixTime;
    let at = |secs: i64| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs as u64));
    if let Some(i) = text.find("received fatal alert: ") {
        let name: String = text[i + "received fatal alert: ".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let alert = match name.as_str() {
            "CertificateExpired" => A::CertificateExpired,
            "UnknownCA" => A::UnknownCA,
            "BadCertificate" => A::BadCertificate,
            "CertificateUnknown" => A::CertificateUnknown,
            "CertificateRequired" => A::CertificateRequired,
            "CertificateRevoked" => A::CertificateRevoked,
            "HandshakeFailure" => A::HandshakeFailure,
            "AccessDenied" => A::AccessDenied,
            _ => return Some(format!("the broker ended the TLS handshake ({name})")),
        };
        return Some(plain(&E::AlertReceived(alert)));
    }
    if text.contains("certificate expired: verification time") {
        let time = number_after(text, "verification time ")?;
        let not_after = number_after(text, "not valid after ")?;
        return Some(plain(&E::InvalidCertificate(C::ExpiredContext {
            time: at(time),
            not_after: at(not_after),
        })));
    }
    if text.contains("certificate not valid yet: verification time") {
        let time = number_after(text, "verification time ")?;
        let not_before = number_after(text, "not valid before ")?;
        return Some(plain(&E::InvalidCertificate(C::NotValidYetContext {
            time: at(time),
            not_before: at(not_before),
        })));
    }
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        return Some(plain(&E::InvalidCertificate(C::UnknownIssuer)));
    }
    if text.contains("certificate not valid for name") || text.contains("NotValidForName") {
        return Some(plain(&E::InvalidCertificate(C::NotValidForName)));
    }
    None
}

/// A connection error (rumqttc's, with rustls's inside) in plain words: the rustls error found
/// anywhere in the chain as [`plain`] says it; otherwise the text without rumqttc's
/// misleading prefixes ("Mqtt serialization/deserialization error", "I/O").
pub fn describe_connection_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return plain(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return plain(r);
        }
        cur = err.source();
    }
    let mut text = e.to_string();
    // rumqttc keeps only the text of some errors (its own error types hold a string): read the
    // rustls error back from it.
    if let Some(p) = plain_from_text(&text) {
        return p;
    }
    for prefix in [
        "Mqtt serialization/deserialization error: ",
        "Mqtt state: ",
        "I/O: ",
        "IO: ",
        "TLS: ",
        "TLS error: ",
    ] {
        while let Some(rest) = text.strip_prefix(prefix) {
            text = rest.to_string();
        }
    }
    text
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Read every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bytes = pem_bytes(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Read the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_slice(&pem_bytes(path)?).map_err(|e| file_err(path, e))
}

/// A PEM file's bytes, through the same guard as the start-up checks: a regular file of at most
/// 1 MiB, so a reload (SIGHUP, file change) cannot be made to read `/dev/zero` or block on a FIFO.
fn pem_bytes(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    crate::config::read_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(ca_file: &Path) -> Result<RootCertStore, TlsSetupError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca_file)? {
        store
            .add(c)
            .map_err(|e| file_err(ca_file, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// Client configuration for mutual TLS to the broker.
pub fn mqtt_client_config(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_file)?)
        .with_client_auth_cert(load_certs(cert_file)?, load_key(key_file)?)?;
    Ok(Arc::new(config))
}

/// Read every CRL in a PEM file (`-----BEGIN X509 CRL-----`).
pub fn load_crls(
    path: &Path,
) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, TlsSetupError> {
    let bytes = pem_bytes(path)?;
    let crls = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if crls.is_empty() {
        return Err(file_err(path, "no CRL found (-----BEGIN X509 CRL-----)"));
    }
    Ok(crls)
}

/// The files an MLLP listener's TLS is built from.
#[derive(Debug, Clone, Copy)]
pub struct MllpTlsFiles<'a> {
    /// Certificate chain presented to senders.
    pub cert_file: &'a Path,
    /// Its private key.
    pub key_file: &'a Path,
    /// When set, senders must present a certificate chaining to this CA.
    pub client_ca_file: Option<&'a Path>,
    /// Revoked sender certificates (with `client_ca_file`).
    pub crl_file: Option<&'a Path>,
}

/// Server configuration for an MLLP listener, optionally requiring client certificates (checked
/// against the CRLs in `crl_file`, if given: the sender's own certificate must not be revoked).
/// Fails, naming the file, when a file is unreadable, the key does not match the certificate,
/// or a CRL cannot be used.
pub fn mllp_server_config(f: MllpTlsFiles<'_>) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match f.client_ca_file {
        Some(ca) => {
            let mut v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            );
            if let Some(crl) = f.crl_file {
                v = v
                    .with_crls(load_crls(crl)?)
                    .only_check_end_entity_revocation();
            }
            let verifier = v
                .build()
                .map_err(|e| file_err(f.crl_file.unwrap_or(ca), e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let certs = load_certs(f.cert_file)?;
    let key = load_key(f.key_file)?;
    builder
        .with_single_cert(certs, key)
        .map_err(|e| {
            file_err(
                f.key_file,
                format!("cannot be used with {}: {e}", f.cert_file.display()),
            )
        })
        .map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::UnixTime;
    use std::time::Duration;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    #[test]
    fn an_expired_broker_certificate_is_told_with_dates_not_unix_seconds() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
            time: at(1_764_633_600),      // 2025-12-02
            not_after: at(1_706_745_600), // 2024-02-01
        });
        assert_eq!(
            plain(&e),
            "the broker's certificate expired on 2024-02-01 (this box's clock says 2025-12-02)"
        );
    }

    #[test]
    fn a_tls_failure_inside_rumqttc_loses_the_serialization_prefix() {
        let rustls_error =
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        let e = rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::Io(io));
        let text = describe_connection_error(&e);
        assert_eq!(
            text,
            "the broker refused this appliance's client certificate: it has expired (renew mqtt.cert_file)"
        );
    }

    #[test]
    fn rustls_errors_rumqttc_kept_only_as_text_are_read_back_in_plain_words() {
        // rumqttc's v5 state error keeps the text of the I/O error, not the error.
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
            time: at(1_764_633_600),
            not_after: at(1_706_745_600),
        });
        let wrapped = format!("Mqtt serialization/deserialization error: IO: {expired}");
        assert!(wrapped.contains("1706745600"), "{wrapped}");
        assert_eq!(
            plain_from_text(&wrapped).unwrap(),
            "the broker's certificate expired on 2024-02-01 (this box's clock says 2025-12-02)"
        );
        let alert = "Mqtt serialization/deserialization error: IO: received fatal alert: UnknownCA";
        assert!(
            plain_from_text(alert)
                .unwrap()
                .starts_with("the broker refused this appliance's client certificate (UnknownCA)")
        );
    }

    #[test]
    fn a_key_mismatch_is_said_once_in_plain_words() {
        let e = TlsSetupError::from(rustls::Error::InconsistentKeys(
            rustls::InconsistentKeys::KeyMismatch,
        ));
        let text = e.to_string();
        assert!(!text.contains("KeyMismatch"), "{text}");
        assert!(text.contains("are not a pair"), "{text}");
    }

    #[test]
    fn a_certificate_reload_refuses_a_device_or_fifo_instead_of_reading_it() {
        let e = load_certs(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = load_key(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = load_crls(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
