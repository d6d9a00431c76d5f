//! A throwaway PKI: one CA, one server certificate for `localhost`/127.0.0.1 and
//! client certificates, written as PEM files into a caller-chosen directory.
//!
//! The certificates are ECDSA P-256 (generated with `rcgen` on `ring`) and are accepted
//! by rustls/webpki and by OpenSSL (Mosquitto).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// The default common name of the client certificate made by [`Pki::generate`].
pub const DEFAULT_CLIENT_CN: &str = "test-appliance";

/// Validity settings for [`Pki::generate_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiOptions {
    /// Days the default client certificate (and those from [`Pki::issue_client`]) stay valid
    /// from now. Default 365.
    pub client_valid_days: u32,
    /// Days the CA certificate stays valid from now. Default 3650.
    pub ca_valid_days: u32,
    /// Days the server certificate stays valid from now. Default 825.
    pub server_valid_days: u32,
    /// Common name of the default client certificate. Default [`DEFAULT_CLIENT_CN`].
    pub client_cn: String,
}

impl Default for PkiOptions {
    fn default() -> Self {
        PkiOptions {
            client_valid_days: 365,
            ca_valid_days: 3650,
            server_valid_days: 825,
            client_cn: DEFAULT_CLIENT_CN.to_string(),
        }
    }
}

/// A CA with a server certificate and a client certificate, stored as PEM files in a directory.
///
/// Every certificate is valid from yesterday (so clock skew never makes it "not yet valid").
/// Private keys are written with mode 0600.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    name: String,
    options: PkiOptions,
    ca_params: CertificateParams,
    ca_key_pem: Arc<str>,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    /// Generates a PKI with default [`PkiOptions`] into `dir` (which must exist).
    ///
    /// `name` goes into the CA's common name and into every file name, so two PKIs can share
    /// a directory.
    pub fn generate(dir: &Path, name: &str) -> Result<Pki> {
        Self::generate_with(dir, name, PkiOptions::default())
    }

    /// Generates a PKI into a fresh temporary directory; keep the returned `TempDir` alive as
    /// long as the files are needed.
    pub fn generate_in_tempdir(name: &str) -> Result<(tempfile::TempDir, Pki)> {
        let dir = tempfile::Builder::new()
            .prefix("siterelay-testkit-pki-")
            .tempdir()
            .context("creating a temporary directory for the PKI")?;
        let pki = Self::generate(dir.path(), name)?;
        Ok((dir, pki))
    }

    /// Generates a PKI with explicit validity settings into `dir` (which must exist).
    pub fn generate_with(dir: &Path, name: &str, options: PkiOptions) -> Result<Pki> {
        anyhow::ensure!(
            !name.is_empty(),
            "PKI name must not be empty (it is used in file names)"
        );
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.to_path_buf();
        let file_stem = sanitize(name);

        // CA
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "siterelay testkit");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut ca_params, i64::from(options.ca_valid_days));
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA certificate")?;
        let ca_key_pem: Arc<str> = Arc::from(ca_key.serialize_pem());
        write_public(&dir.join(format!("{file_stem}-ca.pem")), &ca_cert.pem())?;
        write_private(&dir.join(format!("{file_stem}-ca.key")), &ca_key_pem)?;

        let issuer = Issuer::from_params(&ca_params, &ca_key);

        // Server
        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut server_params = leaf_params(
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            i64::from(options.server_valid_days),
        );
        server_params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().context("SAN localhost")?),
            SanType::IpAddress(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        ];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("signing the server certificate")?;
        write_public(
            &dir.join(format!("{file_stem}-server.pem")),
            &server_cert.pem(),
        )?;
        write_private(
            &dir.join(format!("{file_stem}-server.key")),
            &server_key.serialize_pem(),
        )?;

        let mut pki = Pki {
            dir,
            name: name.to_string(),
            options,
            ca_params,
            ca_key_pem,
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
        };
        let cn = pki.options.client_cn.clone();
        let days = i64::from(pki.options.client_valid_days);
        let (cert, key) = pki.issue_client_for_days(&cn, days)?;
        pki.client_cert = cert;
        pki.client_key = key;
        Ok(pki)
    }

    /// Issues another client certificate + key signed by this CA, valid for
    /// `PkiOptions::client_valid_days`; returns `(cert_file, key_file)`.
    pub fn issue_client(&self, cn: &str) -> Result<(PathBuf, PathBuf)> {
        self.issue_client_for_days(cn, i64::from(self.options.client_valid_days))
    }

    /// Issues a client certificate valid until now + `days` (a negative value gives a
    /// certificate that has already expired, valid from `days - 2` to `days` days from now).
    /// Returns `(cert_file, key_file)`; files are named after `cn` and `days`.
    pub fn issue_client_for_days(&self, cn: &str, days: i64) -> Result<(PathBuf, PathBuf)> {
        anyhow::ensure!(!cn.is_empty(), "client CN must not be empty");
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).context("loading the CA key")?;
        let issuer = Issuer::from_params(&self.ca_params, &ca_key);
        let key = KeyPair::generate().context("generating a client key")?;
        let mut params = leaf_params(cn, ExtendedKeyUsagePurpose::ClientAuth, days);
        if days < 0 {
            let not_after = OffsetDateTime::now_utc() + time::Duration::days(days);
            params.not_after = not_after;
            params.not_before = not_after - time::Duration::days(2);
        }
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing a client certificate")?;
        let base = format!("{}-client-{}", sanitize(&self.name), sanitize(cn));
        let stem = if days == i64::from(self.options.client_valid_days) {
            base
        } else if days >= 0 {
            format!("{base}-{days}d")
        } else {
            format!("{base}-expired{}d", days.unsigned_abs())
        };
        let cert_file = self.dir.join(format!("{stem}.pem"));
        let key_file = self.dir.join(format!("{stem}.key"));
        write_public(&cert_file, &cert.pem())?;
        write_private(&key_file, &key.serialize_pem())?;
        Ok((cert_file, key_file))
    }

    /// Writes a CRL signed by this CA revoking the certificates with these serial numbers (big
    /// endian bytes, as read from the certificates), valid from yesterday for 30 days; returns
    /// its path (`<name>-crl.pem`, replaced on each call).
    pub fn write_crl(&self, revoked_serials: &[Vec<u8>]) -> Result<PathBuf> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).context("loading the CA key")?;
        let issuer = Issuer::from_params(&self.ca_params, &ca_key);
        let now = OffsetDateTime::now_utc();
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::days(1),
            next_update: now + time::Duration::days(30),
            crl_number: rcgen::SerialNumber::from(vec![1u8]),
            issuing_distribution_point: None,
            revoked_certs: revoked_serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now - time::Duration::hours(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .context("signing the CRL")?;
        let path = self.dir.join(format!("{}-crl.pem", sanitize(&self.name)));
        write_public(&path, &crl.pem().context("encoding the CRL")?)?;
        Ok(path)
    }

    /// Issues a client certificate valid exactly from `not_before` to `not_after` (for expired
    /// and not-yet-valid certificates with known dates). Files are `<name>-client-<stem>.pem`
    /// and `.key`; returns `(cert_file, key_file)`.
    pub fn issue_client_dated(
        &self,
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        stem: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).context("loading the CA key")?;
        let issuer = Issuer::from_params(&self.ca_params, &ca_key);
        let key = KeyPair::generate().context("generating a client key")?;
        let mut params = leaf_params(cn, ExtendedKeyUsagePurpose::ClientAuth, 1);
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing a client certificate")?;
        let base = format!("{}-client-{}", sanitize(&self.name), sanitize(stem));
        let cert_file = self.dir.join(format!("{base}.pem"));
        let key_file = self.dir.join(format!("{base}.key"));
        write_public(&cert_file, &cert.pem())?;
        write_private(&key_file, &key.serialize_pem())?;
        Ok((cert_file, key_file))
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The name given at generation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The options this PKI was generated with.
    pub fn options(&self) -> &PkiOptions {
        &self.options
    }

    /// Common name of the default client certificate.
    pub fn client_cn(&self) -> &str {
        &self.options.client_cn
    }

    /// CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", sanitize(&self.name)))
    }

    /// CA private key (PEM, PKCS#8, mode 0600).
    pub fn ca_key_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.key", sanitize(&self.name)))
    }

    /// Server certificate (PEM) with SANs DNS `localhost` and IP 127.0.0.1.
    pub fn server_cert_file(&self) -> PathBuf {
        self.dir
            .join(format!("{}-server.pem", sanitize(&self.name)))
    }

    /// Server private key (PEM, PKCS#8, mode 0600).
    pub fn server_key_file(&self) -> PathBuf {
        self.dir
            .join(format!("{}-server.key", sanitize(&self.name)))
    }

    /// Default client certificate (PEM).
    pub fn client_cert_file(&self) -> PathBuf {
        self.client_cert.clone()
    }

    /// Default client private key (PEM, PKCS#8, mode 0600).
    pub fn client_key_file(&self) -> PathBuf {
        self.client_key.clone()
    }

    /// A rustls client config trusting this CA and presenting the default client certificate.
    pub fn client_tls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        crate::tls::client_config(
            &self.ca_file(),
            Some((&self.client_cert_file(), &self.client_key_file())),
        )
    }
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::DAY;
    params.not_after = now + time::Duration::days(days);
}

fn leaf_params(cn: &str, eku: ExtendedKeyUsagePurpose, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "siterelay testkit");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days);
    params
}

/// Keeps file names portable: anything but ASCII alphanumerics, `-`, `_` and `.` becomes `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_public(path: &Path, pem: &str) -> Result<()> {
    fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(())
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The mode above only applies to newly created files.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    f.write_all(pem.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
