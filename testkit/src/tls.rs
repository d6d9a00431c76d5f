//! rustls configuration helpers, always on the `ring` provider (never a process default).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The `ring` crypto provider used for every TLS config made by this crate.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate from a PEM file (fails if there is none).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("opening {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a private key from {}", path.display()))
}

/// A root store holding every certificate of `ca_file`.
pub fn root_store(ca_file: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots
            .add(cert)
            .with_context(|| format!("adding a CA certificate from {}", ca_file.display()))?;
    }
    Ok(roots)
}

/// A client config trusting `ca_file` and, if given, presenting `(cert_file, key_file)`.
pub fn client_config(ca_file: &Path, client: Option<(&Path, &Path)>) -> Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(root_store(ca_file)?);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .context("client certificate/key")?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A server config presenting `(cert_file, key_file)`.
///
/// With `require_client_cert` a client certificate is mandatory and must chain to `ca_file`;
/// without it, no client certificate is requested at all (server-authenticated TLS only).
pub fn server_config(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if require_client_cert {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_file)?), provider)
                .build()
                .context("building the client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(load_certs(cert_file)?, load_key(key_file)?)
        .context("server certificate/key")?;
    Ok(Arc::new(config))
}
