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
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
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
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Read the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
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
    let crls = rustls_pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
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
