//! The checks `siterelay run` makes before it starts and `siterelay check-config` prints: one
//! function, [`check_file`], so the two can never disagree.
//!
//! [`crate::config::parse_all`] reads the file (every type error, each with its key and line)
//! and runs the semantic checks; this module adds what needs the machine: the TLS material
//! (each certificate's dates, the client certificate against its key and against
//! `appliance_id`, the CA file holding a CA), the data directory, listeners that would collide
//! at bind time, and serial device paths. Each finding is an error (start-up refuses) or a
//! warning (start-up logs it and goes on).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::{self, Config, Problem};
use crate::tls::date;

/// Certificates expiring within this many days draw a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// What [`check_file`] found.
#[derive(Debug)]
pub struct Checked {
    /// The file that was read.
    pub file: PathBuf,
    /// The configuration, when it has no error.
    pub config: Option<Config>,
    /// Problems that stop start-up, in file order.
    pub errors: Vec<Problem>,
    /// Problems worth a person's attention that do not stop start-up.
    pub warnings: Vec<Problem>,
}

impl Checked {
    /// One line per problem: `file:line: key: message`, warnings marked `warning:`.
    pub fn lines(&self) -> Vec<String> {
        let at = |p: &Problem| match p.line {
            Some(l) => format!("{}:{l}", self.file.display()),
            None => self.file.display().to_string(),
        };
        let what = |p: &Problem| {
            if p.key.is_empty() {
                p.message.clone()
            } else {
                format!("{}: {}", p.key, p.message)
            }
        };
        let mut all: Vec<(Option<usize>, bool, String)> = self
            .errors
            .iter()
            .map(|p| (p.line, false, format!("{}: {}", at(p), what(p))))
            .chain(
                self.warnings
                    .iter()
                    .map(|p| (p.line, true, format!("{}: warning: {}", at(p), what(p)))),
            )
            .collect();
        all.sort_by_key(|(line, warning, _)| (line.unwrap_or(usize::MAX), *warning));
        all.into_iter().map(|(_, _, l)| l).collect()
    }
}

/// Read and check a configuration file, and the machine it is to run on, as start-up does.
pub fn check_file(path: &Path) -> Checked {
    let mut out = Checked {
        file: path.to_path_buf(),
        config: None,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            out.errors.push(problem(
                "",
                format!("cannot read the configuration file: {e}"),
            ));
            return out;
        }
    };
    let (cfg, problems) = config::parse_all(&text);
    out.errors = problems;
    let Some(cfg) = cfg else {
        return out;
    };
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    // Files the semantic checks already found unreadable are not read again.
    let unreadable: Vec<String> = out.errors.iter().map(|p| p.key.clone()).collect();
    check_environment(&cfg, &unreadable, &mut errors, &mut warnings);
    for w in config::warnings(path, &cfg) {
        warnings.push(problem("", w));
    }
    for mut p in errors {
        p.line = config::line_of_key(&text, &p.key);
        out.errors.push(p);
    }
    for mut p in warnings {
        p.line = config::line_of_key(&text, &p.key);
        out.warnings.push(p);
    }
    out.errors.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    if out.errors.is_empty() {
        out.config = Some(cfg);
    }
    out
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
        line: None,
    }
}

/// Every check that needs the machine, on a configuration that parsed. `skip` lists keys whose
/// files were already reported.
fn check_environment(
    cfg: &Config,
    skip: &[String],
    errors: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) {
    let now = jiff::Timestamp::now().as_second();
    let m = &cfg.mqtt;
    let readable =
        |key: &str, f: &Option<PathBuf>| f.clone().filter(|_| !skip.iter().any(|k| k == key));
    let ca = readable("mqtt.ca_file", &m.ca_file);
    let cert = readable("mqtt.cert_file", &m.cert_file);
    let key = readable("mqtt.key_file", &m.key_file);
    if let Some(ca) = &ca {
        check_ca_file(ca, "mqtt.ca_file", now, errors, warnings);
    }
    if let Some(cert) = &cert {
        if let Some(cn) = check_leaf(cert, "mqtt.cert_file", now, errors, warnings)
            && cn != cfg.appliance_id
        {
            warnings.push(problem(
                "mqtt.cert_file",
                format!(
                    "the certificate's common name (CN) is \"{cn}\" but appliance_id is \"{}\": a broker that takes the CN as the user name (docs/broker/) refuses this appliance's records (NotAuthorized); issue a certificate for \"{}\" or correct appliance_id",
                    cfg.appliance_id, cfg.appliance_id
                ),
            ));
        }
        if let Some(key) = &key {
            check_pair(cert, key, "mqtt.key_file", "mqtt.cert_file", errors);
        }
    }
    // The same builder start-up uses: anything else rustls refuses is refused here too.
    if let (Some(ca), Some(cert), Some(key)) = (&ca, &cert, &key)
        && errors.is_empty()
        && let Err(e) = crate::tls::mqtt_client_config(ca, cert, key)
    {
        errors.push(problem("mqtt.cert_file", e.to_string()));
    }
    for (i, f) in cfg.mllp.iter().enumerate() {
        let Some(t) = &f.tls else { continue };
        let at = |k: &str| format!("mllp[{i}].tls.{k}");
        if skip.contains(&at("cert_file")) || skip.contains(&at("key_file")) {
            continue;
        }
        check_leaf(&t.cert_file, &at("cert_file"), now, errors, warnings);
        check_pair(
            &t.cert_file,
            &t.key_file,
            &at("key_file"),
            &at("cert_file"),
            errors,
        );
        if let Some(ca) = &t.client_ca_file
            && !skip.contains(&at("client_ca_file"))
        {
            check_ca_file(ca, &at("client_ca_file"), now, errors, warnings);
        }
    }
    check_data_dir(&cfg.data_dir, errors);
    check_listeners(cfg, errors);
    check_devices(cfg, errors, warnings);
}

/// The certificates of a PEM file, parsed; `None` when the file cannot be read (reported by
/// the configuration checks).
fn certs(path: &Path) -> Option<Vec<Vec<u8>>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .ok()?
        .filter_map(|c| c.ok())
        .map(|c| c.to_vec())
        .collect();
    Some(certs)
}

fn common_name(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// A certificate's dates: an error when expired or not yet valid, a warning when it expires
/// within [`EXPIRY_WARNING_DAYS`].
fn check_dates(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    what: &str,
    key: &str,
    now: i64,
    errors: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) {
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    if not_after < now {
        errors.push(problem(
            key,
            format!(
                "{what} expired on {} (today is {}): renew it",
                date(not_after),
                date(now)
            ),
        ));
    } else if not_before > now {
        errors.push(problem(
            key,
            format!(
                "{what} is not valid until {} (today is {} by this box's clock): check the clock (timedatectl) or the certificate",
                date(not_before),
                date(now)
            ),
        ));
    } else {
        let days = (not_after - now).div_euclid(86_400);
        if days < EXPIRY_WARNING_DAYS {
            warnings.push(problem(
                key,
                format!(
                    "{what} expires on {}, in {days} day(s): renew it before then",
                    date(not_after)
                ),
            ));
        }
    }
}

/// A CA file: every certificate in it must be a CA, and in date.
fn check_ca_file(
    path: &Path,
    key: &str,
    now: i64,
    errors: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) {
    let Some(ders) = certs(path) else { return };
    for der in &ders {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            errors.push(problem(
                key,
                format!(
                    "'{}' holds a certificate that cannot be read",
                    path.display()
                ),
            ));
            continue;
        };
        let cn = common_name(&cert).unwrap_or_else(|| "(no CN)".into());
        if !cert.is_ca() {
            errors.push(problem(
                key,
                format!(
                    "'{}' holds \"{cn}\", which is not a CA certificate (no basicConstraints CA:TRUE): give the certificate of the CA that issued it",
                    path.display()
                ),
            ));
            continue;
        }
        check_dates(
            &cert,
            &format!("the CA certificate \"{cn}\""),
            key,
            now,
            errors,
            warnings,
        );
    }
}

/// A leaf certificate file: its first certificate in date and not a CA. Returns its CN.
fn check_leaf(
    path: &Path,
    key: &str,
    now: i64,
    errors: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Option<String> {
    let ders = certs(path)?;
    let der = ders.first()?;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        errors.push(problem(
            key,
            format!(
                "'{}' holds a certificate that cannot be read",
                path.display()
            ),
        ));
        return None;
    };
    let cn = common_name(&cert);
    let name = cn.clone().unwrap_or_else(|| "(no CN)".into());
    check_dates(
        &cert,
        &format!("the certificate \"{name}\""),
        key,
        now,
        errors,
        warnings,
    );
    cn
}

/// The private key must be the one the certificate was issued for.
fn check_pair(cert: &Path, key: &Path, key_key: &str, cert_key: &str, errors: &mut Vec<Problem>) {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let Some(ders) = certs(cert) else { return };
    let Some(der) = ders.first() else { return };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der) else {
        return;
    };
    let Ok(pk) = PrivateKeyDer::from_pem_file(key) else {
        return;
    };
    let provider = rustls::crypto::ring::default_provider();
    let signing = match provider.key_provider.load_private_key(pk) {
        Ok(s) => s,
        Err(e) => {
            errors.push(problem(
                key_key,
                format!(
                    "'{}' is not a usable private key: {}",
                    key.display(),
                    crate::tls::plain(&e)
                ),
            ));
            return;
        }
    };
    if let Some(spki) = signing.public_key()
        && spki.as_ref() != parsed.tbs_certificate.subject_pki.raw
    {
        errors.push(problem(
            key_key,
            format!(
                "'{}' is not the private key of the certificate in {cert_key} ('{}'): the two must be a pair (the certificate was issued for another key)",
                key.display(),
                cert.display()
            ),
        ));
    }
}

/// The data directory must exist and be writable, or be creatable.
fn check_data_dir(dir: &Path, errors: &mut Vec<Problem>) {
    let key = "data_dir";
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => errors.push(problem(
            key,
            format!("'{}' exists and is not a directory", dir.display()),
        )),
        Ok(_) => {
            let probe = dir.join(format!(".siterelay-check-{}", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
            {
                Ok(_) => {
                    let _ = std::fs::remove_file(&probe);
                }
                Err(e) => errors.push(problem(
                    key,
                    format!(
                        "'{}' is not writable by this user ({e}): the outbox is stored there (chown it to the daemon's user)",
                        dir.display()
                    ),
                )),
            }
        }
        Err(_) => {
            // Not there: the daemon creates it, so the nearest existing ancestor must be a
            // directory it may write in.
            let mut up = dir.parent();
            while let Some(p) = up {
                if let Ok(m) = std::fs::metadata(p) {
                    let writable = m.is_dir() && crate::sys::may_write_in(p);
                    if !writable {
                        errors.push(problem(
                            key,
                            format!(
                                "'{}' does not exist and cannot be created: '{}' is {} (create the directory, owned by the daemon's user)",
                                dir.display(),
                                p.display(),
                                if m.is_dir() { "not writable by this user" } else { "not a directory" }
                            ),
                        ));
                    }
                    return;
                }
                up = p.parent();
            }
        }
    }
}

/// Two feeds on the same port where one listens on every address (0.0.0.0 or [::]) cannot
/// both bind. (The same address twice is a configuration check.)
fn check_listeners(cfg: &Config, errors: &mut Vec<Problem>) {
    let addrs: Vec<(usize, SocketAddr)> = cfg
        .mllp
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.listen.parse().ok().map(|a| (i, a)))
        .collect();
    for (j, b) in &addrs {
        if b.port() == 0 {
            continue;
        }
        let clash = addrs.iter().take_while(|(i, _)| i < j).find(|(_, a)| {
            let (every, other) = if a.ip().is_unspecified() {
                (a, b)
            } else {
                (b, a)
            };
            a.port() == b.port()
                && a.ip() != b.ip()
                && every.ip().is_unspecified()
                // [::] takes the port for IPv4 too (Linux's default, bindv6only = 0).
                && (every.is_ipv6() || other.is_ipv4())
        });
        if let Some((i, a)) = clash {
            errors.push(problem(
                format!("mllp[{j}].listen"),
                format!(
                    "port {} is also taken by mllp[{i}] (\"{a}\"): a feed on 0.0.0.0 or [::] takes its port on every address, so both cannot listen; give each feed its own port",
                    b.port()
                ),
            ));
        }
    }
}

/// Serial device paths: a missing device is waited for (a warning); a path that is there but
/// is not a character device is an error.
fn check_devices(cfg: &Config, errors: &mut Vec<Problem>, warnings: &mut Vec<Problem>) {
    use std::os::unix::fs::FileTypeExt;
    for (i, s) in cfg.serial.iter().enumerate() {
        let key = format!("serial[{i}].device");
        if !s.device.is_absolute() {
            continue; // a configuration check
        }
        match std::fs::metadata(&s.device) {
            Err(_) => warnings.push(problem(
                key,
                format!(
                    "'{}' is not there now: siterelay waits for it and opens it when it appears (check the cable and the name under /dev/serial/by-id/)",
                    s.device.display()
                ),
            )),
            Ok(m) if !m.file_type().is_char_device() => errors.push(problem(
                key,
                format!(
                    "'{}' is not a serial port (not a character device)",
                    s.device.display()
                ),
            )),
            Ok(_) => {}
        }
    }
}
