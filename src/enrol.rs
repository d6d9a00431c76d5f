//! `siterelay enrol`: the appliance's MQTT client identity, made on the box.
//!
//! Two steps, with the central team's CA in between (docs/operations.md, "Enrolling a box"):
//!
//! 1. [`make_key_and_request`]: an ECDSA P-256 key pair is generated here and written to
//!    `mqtt.key_file` (mode 0600 from the moment the file exists, owned by the daemon's user when
//!    run as root; never printed, never over an existing key unless forced), and a certificate
//!    signing request (PKCS#10, PEM) is returned with subject CN = `appliance_id` (O =
//!    `organisation`) and extendedKeyUsage clientAuth. The key never leaves the box.
//! 2. [`check_certificate`] then [`install`]: the certificate the central team signed is checked
//!    against that key, the appliance id, its usage, its dates and the CA before the certificate
//!    and the CA are written (temporary file + rename, mode 0644) to `mqtt.cert_file` and
//!    `mqtt.ca_file`. Each refusal is one sentence naming what is wrong.
//!
//! ECDSA P-256 because rustls (the daemon), OpenSSL (Mosquitto, the central side's `openssl
//! x509 -req`) and every broker the kit covers accept it for client authentication.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::config::Config;
use crate::tls::date;

/// Where enrolment reads and writes, from the configuration's `[mqtt]` table.
#[derive(Debug, Clone)]
pub struct Files {
    /// This box's name: the CN its certificate must carry.
    pub appliance_id: String,
    /// Goes into the request's subject as O, for the central team's records.
    pub organisation: String,
    /// `mqtt.key_file`: where the key is made.
    pub key: PathBuf,
    /// `mqtt.cert_file`: where the signed certificate is installed.
    pub cert: PathBuf,
    /// `mqtt.ca_file`: where the CA is installed.
    pub ca: PathBuf,
}

impl Files {
    /// The three paths must be set (`insecure_plaintext` boxes have no identity to enrol).
    pub fn from_config(cfg: &Config) -> Result<Files, String> {
        let need = |v: &Option<PathBuf>, key: &str| {
            v.clone().ok_or_else(|| {
                format!(
                    "mqtt.{key} is not set in the configuration: enrolment needs mqtt.ca_file, mqtt.cert_file and mqtt.key_file to know where the files go (e.g. /etc/siterelay/tls/{})",
                    match key {
                        "ca_file" => "ca.pem",
                        "cert_file" => "client.pem",
                        _ => "client.key",
                    }
                )
            })
        };
        Ok(Files {
            appliance_id: cfg.appliance_id.clone(),
            organisation: cfg.organisation.clone(),
            key: need(&cfg.mqtt.key_file, "key_file")?,
            cert: need(&cfg.mqtt.cert_file, "cert_file")?,
            ca: need(&cfg.mqtt.ca_file, "ca_file")?,
        })
    }
}

/// Who should own the new key file: the daemon's user (uid, gid), or the caller (`None`).
pub type Owner = Option<(u32, u32)>;

/// The owner for the key: `--owner USER` if given (it must exist); otherwise, when running as
/// root, the `siterelay` user if it exists (the daemon reads the key as that user, and a key
/// readable by anyone else is refused at start-up); otherwise the caller.
pub fn key_owner(requested: Option<&str>) -> Result<Owner, String> {
    if let Some(user) = requested {
        return lookup_user(user)
            .map(Some)
            .ok_or_else(|| format!("no user '{user}' on this box (--owner)"));
    }
    let am_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    Ok(if am_root {
        lookup_user("siterelay")
    } else {
        None
    })
}

/// uid and primary gid of a user, through the system's user database (`getent passwd`).
fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let out = std::process::Command::new("getent")
        .args(["passwd", user])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let mut fields = line.trim().split(':').skip(2);
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    Some((uid, gid))
}

/// What [`make_key_and_request`] made.
#[derive(Debug)]
pub struct Request {
    /// The certificate signing request, PEM.
    pub csr_pem: String,
    /// SHA-256 of the public key (SubjectPublicKeyInfo DER), lower-case hex with colons as
    /// `openssl dgst -sha256 -c` prints it: read it to the central team over the phone, they
    /// compare it with the request they received.
    pub public_key_sha256: String,
}

/// Make the key pair and the certificate request (step 1). Refuses to replace an existing key
/// unless `force` (a certificate issued for the old key would then no longer match).
pub fn make_key_and_request(files: &Files, force: bool, owner: Owner) -> Result<Request, String> {
    if !force && std::fs::symlink_metadata(&files.key).is_ok() {
        return Err(format!(
            "{} already holds a key: enrolling again would replace it, and the certificate issued for it would stop working; give --force to make a new key anyway",
            files.key.display()
        ));
    }
    let dir = parent_dir(&files.key)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("could not generate a key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, files.appliance_id.as_str());
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, files.organisation.as_str());
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| format!("could not make the certificate request: {e}"))?;
    let fingerprint = sha256_hex(&rcgen::PublicKeyData::subject_public_key_info(&key));
    // Private from the first byte: created 0600 (never a wider mode, whatever the umask), chowned
    // before anything is written, then renamed over the old key (with --force) in one step.
    write_atomically(
        &dir,
        &files.key,
        key.serialize_pem().as_bytes(),
        0o600,
        owner,
    )?;
    Ok(Request {
        csr_pem: csr,
        public_key_sha256: fingerprint,
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parent_dir(file: &Path) -> Result<PathBuf, String> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "the directory {} does not exist (the Debian package makes /etc/siterelay/tls; otherwise create it, mode 0750 root:siterelay)",
            dir.display()
        ));
    }
    Ok(dir)
}

/// Write `bytes` to a new temporary file in `dir` with `mode` (and `owner`), fsync it, and
/// rename it to `to`.
fn write_atomically(
    dir: &Path,
    to: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Owner,
) -> Result<(), String> {
    let tmp = temp_path(dir, to);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have taken bits away; never added any.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, to)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("could not write {}: {e}", to.display())
    })
}

fn temp_path(dir: &Path, to: &Path) -> PathBuf {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    dir.join(format!(".{name}.enrol-{}.tmp", std::process::id()))
}

/// A certificate that passed [`check_certificate`], ready for [`install`].
#[derive(Debug)]
pub struct Checked {
    /// The certificate file's bytes as given (leaf first, then any intermediates).
    pub cert_pem: Vec<u8>,
    /// The CA file's bytes as given.
    pub ca_pem: Vec<u8>,
    /// The certificate's subject CN.
    pub cn: String,
    /// Serial number, hex.
    pub serial: String,
    /// Last day of validity.
    pub not_after: String,
}

/// Check the certificate the central team returned (step 2): it must be for this box's key,
/// name this appliance, allow client authentication, be in date, and chain to the CA. `now` is
/// Unix seconds.
pub fn check_certificate(
    files: &Files,
    cert_file: &Path,
    ca_file: &Path,
    now: i64,
) -> Result<Checked, String> {
    let cert_pem = std::fs::read(cert_file)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert_file.display()))?;
    let ca_pem = std::fs::read(ca_file)
        .map_err(|e| format!("cannot read the CA file {}: {e}", ca_file.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", cert_file.display()))?;
    let Some(leaf_der) = chain.first() else {
        return Err(format!(
            "{} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            cert_file.display()
        ));
    };
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", ca_file.display()))?;
    if cas.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected the CA's -----BEGIN CERTIFICATE-----)",
            ca_file.display()
        ));
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).map_err(|e| {
        format!(
            "the certificate in {} cannot be read: {e}",
            cert_file.display()
        )
    })?;
    for der in &cas {
        let (_, ca) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("a certificate in {} cannot be read: {e}", ca_file.display()))?;
        if !ca.is_ca() {
            return Err(format!(
                "{} holds \"{}\", which is not a CA certificate (no basicConstraints CA:TRUE): give the certificate of the CA that signed this box's certificate",
                ca_file.display(),
                cn_of(&ca).unwrap_or_else(|| "(no CN)".into())
            ));
        }
    }

    // The key this box made: the certificate must be for it.
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        format!(
            "cannot read this box's key {} ({e}): run siterelay enrol first to make the key and the request",
            files.key.display()
        )
    })?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| {
            format!(
                "{} is not a usable private key: {}",
                files.key.display(),
                crate::tls::plain(&e)
            )
        })?;
    let spki = signing.public_key();
    if spki.as_ref().map(|s| s.as_ref()) != Some(leaf.tbs_certificate.subject_pki.raw) {
        return Err(format!(
            "the certificate in {} was issued for another key, not this box's key in {}: the central team must sign the request this box's siterelay enrol printed",
            cert_file.display(),
            files.key.display()
        ));
    }

    let cn = cn_of(&leaf);
    if cn.as_deref() != Some(files.appliance_id.as_str()) {
        return Err(format!(
            "the certificate in {} names {}, but this box's appliance_id is \"{}\": the broker would refuse its records; ask for a certificate with CN={}",
            cert_file.display(),
            cn.map(|c| format!("CN=\"{c}\""))
                .unwrap_or_else(|| "no CN".into()),
            files.appliance_id,
            files.appliance_id
        ));
    }

    if let Ok(Some(eku)) = leaf.extended_key_usage()
        && !eku.value.client_auth
        && !eku.value.any
    {
        return Err(format!(
            "the certificate in {} does not allow client authentication (its extendedKeyUsage lacks clientAuth): the broker would refuse it; sign it with extendedKeyUsage = clientAuth",
            cert_file.display()
        ));
    }

    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    if not_after < now {
        return Err(format!(
            "the certificate in {} expired on {} (today is {}): ask for a new one",
            cert_file.display(),
            date(not_after),
            date(now)
        ));
    }
    if not_before > now {
        return Err(format!(
            "the certificate in {} is not valid until {} (today is {} by this box's clock): check the clock (timedatectl) or ask for a certificate valid from today",
            cert_file.display(),
            date(not_before),
            date(now)
        ));
    }

    // The signature chain to the CA, as a TLS server checks a client: webpki's end-entity
    // verification (signatures, CA constraints, clientAuth usage, dates).
    let mut roots = rustls::RootCertStore::empty();
    for der in &cas {
        roots.add(der.clone()).map_err(|e| {
            format!(
                "{} holds a certificate rustls cannot use as a CA: {e}",
                ca_file.display()
            )
        })?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| format!("cannot use the CA in {}: {e}", ca_file.display()))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    if let Err(e) = verifier.verify_client_cert(leaf_der, &chain[1..], at) {
        use rustls::{CertificateError as C, Error as E};
        let why = match &e {
            E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
                "it was not signed by that CA (or by an intermediate given after it in the certificate file)".to_string()
            }
            E::InvalidCertificate(C::InvalidPurpose) => {
                "it does not allow client authentication".to_string()
            }
            other => crate::tls::plain(other),
        };
        return Err(format!(
            "the certificate in {} does not chain to the CA in {}: {why}",
            cert_file.display(),
            ca_file.display()
        ));
    }

    Ok(Checked {
        cn: files.appliance_id.clone(),
        serial: leaf.tbs_certificate.raw_serial_as_string(),
        not_after: date(not_after),
        cert_pem,
        ca_pem,
    })
}

fn cn_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Install a checked certificate and its CA: both written whole to temporary files first, then
/// renamed into place, the CA first, the certificate last (a running daemon takes the set when
/// the certificate changes, or on `systemctl reload siterelay`). Mode 0644: neither is secret.
/// `ca` false keeps the CA file in place (it was the one checked against).
pub fn install(files: &Files, checked: &Checked, ca: bool) -> Result<(), String> {
    let cert_dir = parent_dir(&files.cert)?;
    if ca {
        let ca_dir = parent_dir(&files.ca)?;
        write_atomically(&ca_dir, &files.ca, &checked.ca_pem, 0o644, None)?;
    }
    write_atomically(&cert_dir, &files.cert, &checked.cert_pem, 0o644, None)
}

/// Command-line arguments of `siterelay enrol`.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrolArgs {
    /// Write the certificate request to FILE instead of stdout.
    #[arg(long, value_name = "FILE", conflicts_with = "install_cert")]
    pub csr: Option<PathBuf>,
    /// Make a new key even though mqtt.key_file already holds one (the certificate issued for
    /// the old key stops working once the new one is installed).
    #[arg(long, conflicts_with = "install_cert")]
    pub force: bool,
    /// Owner of the new key file. Default: the `siterelay` user when run as root (the daemon
    /// reads the key as that user), else the caller.
    #[arg(long, value_name = "USER", conflicts_with = "install_cert")]
    pub owner: Option<String>,
    /// Step 2: check the certificate the central team signed (this box's key, CN =
    /// appliance_id, clientAuth, in date, chains to the CA) and install it as mqtt.cert_file.
    #[arg(long, value_name = "CERT.pem")]
    pub install_cert: Option<PathBuf>,
    /// With --install-cert: the CA certificate to check against and install as mqtt.ca_file.
    /// Without it, the CA already in mqtt.ca_file is used and left as it is.
    #[arg(long, value_name = "CA.pem", requires = "install_cert")]
    pub ca: Option<PathBuf>,
}

/// `siterelay enrol`: exit 0 when the key and request were made or the certificate installed,
/// 1 on any refusal (one sentence on stderr).
pub fn cli(config: &Path, args: &EnrolArgs) -> std::process::ExitCode {
    match run_cli(config, args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siterelay enrol: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The configuration as far as enrolment needs it: the TLS files not existing yet is the
/// normal case here, so only a configuration that cannot be read, or a bad appliance_id, stops it.
fn enrol_files(config: &Path) -> Result<Files, String> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| format!("cannot read the configuration {}: {e}", config.display()))?;
    let (cfg, problems) = crate::config::parse_all(&text);
    let blocking: Vec<_> = problems
        .iter()
        .filter(|p| cfg.is_none() || p.key == "appliance_id" || p.key == "organisation")
        .cloned()
        .collect();
    match cfg {
        Some(cfg) if blocking.is_empty() => Files::from_config(&cfg),
        _ => Err(format!(
            "the configuration cannot be used (siterelay check-config lists the same):\n{}",
            crate::config::ConfigError {
                file: config.to_path_buf(),
                problems: blocking,
            }
        )),
    }
}

fn run_cli(config: &Path, args: &EnrolArgs) -> Result<(), String> {
    let files = enrol_files(config)?;
    if let Some(cert) = &args.install_cert {
        let ca = args.ca.clone().unwrap_or_else(|| files.ca.clone());
        let now = jiff::Timestamp::now().as_second();
        let checked = check_certificate(&files, cert, &ca, now)?;
        install(&files, &checked, args.ca.is_some())?;
        println!(
            "Installed the certificate for {} (serial {}, valid until {}) as {}{}.",
            checked.cn,
            checked.serial,
            checked.not_after,
            files.cert.display(),
            if args.ca.is_some() {
                format!(", and the CA as {}", files.ca.display())
            } else {
                String::new()
            }
        );
        println!(
            "Next: sudo systemctl reload siterelay (a running daemon takes the new certificate without losing a record), or sudo systemctl start siterelay if it is not running yet; then siterelay status."
        );
        return Ok(());
    }
    let owner = key_owner(args.owner.as_deref())?;
    let req = make_key_and_request(&files, args.force, owner)?;
    match &args.csr {
        Some(out) => {
            let dir = parent_dir(out)?;
            write_atomically(&dir, out, req.csr_pem.as_bytes(), 0o644, None)?;
        }
        None => print!("{}", req.csr_pem),
    }
    eprintln!(
        "Made a new private key (ECDSA P-256) in {} (mode 0600{}); it stays on this box.",
        files.key.display(),
        match owner {
            Some((uid, _)) => format!(", owner uid {uid}"),
            None => String::new(),
        }
    );
    eprintln!(
        "Certificate request for CN={} {}: send it to the central team to sign (docs/operations.md, \"Enrolling a box\").",
        files.appliance_id,
        match &args.csr {
            Some(out) => format!("written to {}", out.display()),
            None => "printed above".to_string(),
        }
    );
    eprintln!(
        "Public key SHA-256 (they compare it with the request they receive): {}",
        req.public_key_sha256
    );
    eprintln!("Then: siterelay enrol --install-cert CERT.pem --ca CA.pem");
    Ok(())
}
