//! A catalogue of broken configurations, each run through the real `siterelay check-config`,
//! each with the exact output expected: every problem listed in one run, each naming the file,
//! the line, the key and what to do; errors exit 1, warnings alone exit 0. The certificates
//! (expired, not yet valid, expiring soon, another appliance's, a leaf given as a CA, a key
//! that is not the certificate's) are made here, with fixed dates where the message shows one.
//!
//! `siterelay run` uses the same function (`siterelay::preflight::check_file`): the last test
//! shows it refusing a configuration check-config refuses, with the same lines.

use std::path::Path;
use std::process::Command;

use siterelay_testkit::pki::Pki;

const BIN: &str = env!("CARGO_BIN_EXE_siterelay");

/// The files every case may point at, in one temporary directory.
struct Kit {
    dir: tempfile::TempDir,
    /// The date the "soon" certificate expires on.
    soon: String,
}

impl Kit {
    fn new() -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path(), "cat").unwrap();
        let p = |name: &str| dir.path().join(name);
        let (c, k) = pki.issue_client("box-1").unwrap();
        std::fs::rename(c, p("client.pem")).unwrap();
        std::fs::rename(k, p("client.key")).unwrap();
        let (c, k) = pki.issue_client("box-2").unwrap();
        std::fs::rename(c, p("other.pem")).unwrap();
        std::fs::rename(k, p("other.key")).unwrap();
        let ymd = rcgen::date_time_ymd;
        let dated = |stem: &str, from, to| {
            let (c, k) = pki.issue_client_dated("box-1", from, to, stem).unwrap();
            std::fs::rename(c, p(&format!("{stem}.pem"))).unwrap();
            std::fs::rename(k, p(&format!("{stem}.key"))).unwrap();
        };
        dated("expired", ymd(2023, 2, 1), ymd(2024, 2, 1));
        dated("future", ymd(2099, 1, 1), ymd(2100, 1, 1));
        // Ten and a half days from now: "in 10 day(s)" whatever the time of the run.
        let now = time::OffsetDateTime::now_utc();
        let soon = now + time::Duration::hours(10 * 24 + 12);
        dated("soon", now - time::Duration::DAY, soon);
        let soon = format!(
            "{:04}-{:02}-{:02}",
            soon.year(),
            u8::from(soon.month()),
            soon.day()
        );
        // A CA certificate that expired on 2024-02-01.
        let mut ca = rcgen::CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "old test CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.not_before = ymd(2020, 1, 1);
        ca.not_after = ymd(2024, 2, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(p("old-ca.pem"), ca.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(p("a-file"), "not a directory").unwrap();
        std::fs::write(p("not-a-port"), "").unwrap();
        Kit { dir, soon }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

const BASE: &str = r#"organisation = "RXX"
appliance_id = "box-1"
data_dir = "{dir}/data"

[mqtt]
host = "localhost"
port = 8883
ca_file = "{dir}/cat-ca.pem"
cert_file = "{dir}/client.pem"
key_file = "{dir}/client.key"

[[mllp]]
name = "adt"
listen = "127.0.0.1:2575"
"#;

/// One broken configuration: what to change in [`BASE`] (pairs of from, to; a `to` only is
/// appended), and the exact output (stderr, then stdout) with `{dir}` for the kit's directory.
struct Case {
    name: &'static str,
    edits: &'static [(&'static str, &'static str)],
    ok: bool,
    expected: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "a port given as a string names the key, the form and the line",
        edits: &[("port = 8883", "port = \"18883\"")],
        ok: false,
        expected: "c.toml:7: mqtt.port: expected a port number (integer 1-65535), found the string \"18883\"
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a type error does not hide the problems after it",
        edits: &[
            ("port = 8883", "port = \"18883\""),
            ("listen = \"127.0.0.1:2575\"", "listen = \"127.0.0.1:2575\"\nmax_connections = \"lots\"\nidle_timeout = \"ten minutes\""),
            ("appliance_id = \"box-1\"", "appliance_id = \"box 1\""),
        ],
        ok: false,
        expected: "c.toml:2: appliance_id: must be 1-64 characters of letters, digits, '-' or '_' (it becomes an MQTT topic level)
c.toml:7: mqtt.port: expected a port number (integer 1-65535), found the string \"18883\"
c.toml:9: warning: mqtt.cert_file: the certificate's common name (CN) is \"box-1\" but appliance_id is \"box 1\": a broker that takes the CN as the user name (docs/broker/) refuses this appliance's records (NotAuthorized); issue a certificate for \"box 1\" or correct appliance_id
c.toml:15: mllp[0].max_connections: expected a whole number (0 or more), found the string \"lots\"
c.toml:16: mllp[0].idle_timeout: 'ten minutes' is not a duration: use e.g. \"30s\", \"10m\", \"2h\", \"7d\", \"500ms\" or an integer number of seconds
4 error(s), 1 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a misspelt key is named with the key it probably meant",
        edits: &[("host = \"localhost\"", "host = \"localhost\"\nhots = \"x\"")],
        ok: false,
        expected: "c.toml:7: mqtt.hots: unknown key (did you mean `host`?): remove it or fix its spelling (see docs/configuration.md)
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a missing required key is named with its table and does not hide a later problem",
        edits: &[
            ("host = \"localhost\"\n", ""),
            ("name = \"adt\"", "name = \"adt\"\nmax_message_bytes = true"),
        ],
        ok: false,
        expected: "c.toml:5: mqtt.host: is required: add it (see docs/configuration.md)
c.toml:13: mllp[0].max_message_bytes: expected a size: a number of bytes or a string such as \"512 MiB\" or \"2 GiB\"
2 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a boolean given as a string",
        edits: &[("", "\n[records]\ninclude_raw = \"yes\"\n")],
        ok: false,
        expected: "c.toml:17: records.include_raw: expected true or false (no quotes), found the string \"yes\"
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a choice outside its list names the choices",
        edits: &[("port = 8883", "port = 8883\nprotocol = \"4\"")],
        ok: false,
        expected: "c.toml:8: mqtt.protocol: \"4\" is not one of the choices: use \"5\" or \"3.1.1\"
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a listen address that is not one",
        edits: &[("127.0.0.1:2575", "127.0.0.1:99999")],
        ok: false,
        expected: "c.toml:14: mllp[0].listen: '127.0.0.1:99999' is not a socket address: use IP:PORT, e.g. \"0.0.0.0:2575\" or \"[::]:2575\"
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "the same address twice",
        edits: &[("", "\n[[mllp]]\nname = \"lab\"\nlisten = \"127.0.0.1:2575\"\n")],
        ok: false,
        expected: "c.toml:18: mllp[1].listen: address 127.0.0.1:2575 is used by another feed
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "the same port on 0.0.0.0 and 127.0.0.1",
        edits: &[("", "\n[[mllp]]\nname = \"lab\"\nlisten = \"0.0.0.0:2575\"\n")],
        ok: false,
        expected: "c.toml:18: mllp[1].listen: port 2575 is also taken by mllp[0] (\"127.0.0.1:2575\"): a feed on 0.0.0.0 or [::] takes its port on every address, so both cannot listen; give each feed its own port
c.toml: warning: mllp[1] (lab) listens on 0.0.0.0:2575 with no allow list and no client certificates: anyone who can reach the port can inject clinical messages (set allow = [\"<the senders' addresses>/32\", ...])
1 error(s), 1 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "the same port on [::] and 127.0.0.1 (IPv6's every-address takes IPv4 too)",
        edits: &[("", "\n[[mllp]]\nname = \"lab\"\nlisten = \"[::]:2575\"\n")],
        ok: false,
        expected: "c.toml:18: mllp[1].listen: port 2575 is also taken by mllp[0] (\"127.0.0.1:2575\"): a feed on 0.0.0.0 or [::] takes its port on every address, so both cannot listen; give each feed its own port
c.toml: warning: mllp[1] (lab) listens on [::]:2575 with no allow list and no client certificates: anyone who can reach the port can inject clinical messages (set allow = [\"<the senders' addresses>/32\", ...])
1 error(s), 1 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a client certificate with another certificate's key",
        edits: &[("{dir}/client.key", "{dir}/other.key")],
        ok: false,
        expected: "c.toml:10: mqtt.key_file: '{dir}/other.key' is not the private key of the certificate in mqtt.cert_file ('{dir}/client.pem'): the two must be a pair (the certificate was issued for another key)
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a leaf certificate given as the CA file",
        edits: &[("{dir}/cat-ca.pem", "{dir}/cat-server.pem")],
        ok: false,
        expected: "c.toml:8: mqtt.ca_file: '{dir}/cat-server.pem' holds \"localhost\", which is not a CA certificate (no basicConstraints CA:TRUE): give the certificate of the CA that issued it
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "an expired client certificate is an error with its date as a date",
        edits: &[("{dir}/client.", "{dir}/expired."), ("{dir}/client.", "{dir}/expired.")],
        ok: false,
        expected: "c.toml:9: mqtt.cert_file: the certificate \"box-1\" expired on 2024-02-01 (today is {today}): renew it
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a client certificate not valid yet is an error that points at the clock",
        edits: &[("{dir}/client.", "{dir}/future."), ("{dir}/client.", "{dir}/future.")],
        ok: false,
        expected: "c.toml:9: mqtt.cert_file: the certificate \"box-1\" is not valid until 2099-01-01 (today is {today} by this box's clock): check the clock (timedatectl) or the certificate
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "an expired CA certificate",
        edits: &[("{dir}/cat-ca.pem", "{dir}/old-ca.pem")],
        ok: false,
        expected: "c.toml:8: mqtt.ca_file: the CA certificate \"old test CA\" expired on 2024-02-01 (today is {today}): renew it
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a client certificate expiring within 30 days is a warning only",
        edits: &[("{dir}/client.", "{dir}/soon."), ("{dir}/client.", "{dir}/soon.")],
        ok: true,
        expected: "c.toml:9: warning: mqtt.cert_file: the certificate \"box-1\" expires on {in10}, in 10 day(s): renew it before then
c.toml: OK (1 MLLP feed(s), 0 serial port(s), broker localhost:8883), 1 warning(s)
",
    },
    Case {
        name: "a client certificate for another appliance is a warning naming both",
        edits: &[("{dir}/client.", "{dir}/other."), ("{dir}/client.", "{dir}/other.")],
        ok: true,
        expected: "c.toml:9: warning: mqtt.cert_file: the certificate's common name (CN) is \"box-2\" but appliance_id is \"box-1\": a broker that takes the CN as the user name (docs/broker/) refuses this appliance's records (NotAuthorized); issue a certificate for \"box-1\" or correct appliance_id
c.toml: OK (1 MLLP feed(s), 0 serial port(s), broker localhost:8883), 1 warning(s)
",
    },
    Case {
        name: "a certificate file that is not there",
        edits: &[("{dir}/client.pem", "{dir}/nope.pem")],
        ok: false,
        expected: "c.toml:9: mqtt.cert_file: cannot read '{dir}/nope.pem': No such file or directory (os error 2) (check the path and that the siterelay user may read it)
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a key file holding a certificate",
        edits: &[("{dir}/client.key", "{dir}/client.pem")],
        ok: false,
        expected: "c.toml:10: mqtt.key_file: '{dir}/client.pem' does not contain a PEM private key (-----BEGIN PRIVATE KEY----- or RSA/EC PRIVATE KEY)
c.toml: warning: start-up will refuse this: {dir}/client.pem is readable by everyone (mode 0644): the appliance's private key must be readable by its owner only; fix it with: chmod 600 {dir}/client.pem
1 error(s), 1 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a data_dir that cannot be created",
        edits: &[("{dir}/data", "{dir}/a-file/data")],
        ok: false,
        expected: "c.toml:3: data_dir: '{dir}/a-file/data' does not exist and cannot be created: '{dir}/a-file' is not a directory (create the directory, owned by the daemon's user)
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a data_dir that is a file",
        edits: &[("{dir}/data", "{dir}/a-file")],
        ok: false,
        expected: "c.toml:3: data_dir: '{dir}/a-file' exists and is not a directory
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a serial device path that is a plain file",
        edits: &[("", "\n[[serial]]\nname = \"chem\"\ndevice = \"{dir}/not-a-port\"\nprotocol = \"astm\"\n")],
        ok: false,
        expected: "c.toml:18: serial[0].device: '{dir}/not-a-port' is not a serial port (not a character device)
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a serial device that is not plugged in is a warning (siterelay waits for it)",
        edits: &[("", "\n[[serial]]\nname = \"chem\"\ndevice = \"{dir}/ttyUSB9\"\nprotocol = \"astm\"\n")],
        ok: true,
        expected: "c.toml:18: warning: serial[0].device: '{dir}/ttyUSB9' is not there now: siterelay waits for it and opens it when it appears (check the cable and the name under /dev/serial/by-id/)
c.toml: OK (1 MLLP feed(s), 1 serial port(s), broker localhost:8883), 1 warning(s)
",
    },
    Case {
        name: "a serial protocol given as a number",
        edits: &[("", "\n[[serial]]\nname = \"chem\"\ndevice = \"/dev/null\"\nprotocol = 5\nbaud = \"fast\"\n")],
        ok: false,
        expected: "c.toml:19: serial[0].protocol: expected one of its names in double quotes (see docs/configuration.md)
c.toml:20: serial[0].baud: expected a whole number (0 or more), found the string \"fast\"
2 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "an MLLP listener certificate that has expired",
        edits: &[("", "tls = { cert_file = \"{dir}/expired.pem\", key_file = \"{dir}/expired.key\" }\n")],
        ok: false,
        expected: "c.toml:15: mllp[0].tls.cert_file: the certificate \"box-1\" expired on 2024-02-01 (today is {today}): renew it
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
    Case {
        name: "a key given under its old and its new name",
        edits: &[("port = 8883", "port = 8883\nkeep_alive = \"30s\"\nkeep_alive_secs = 30")],
        ok: false,
        expected: "c.toml:9: mqtt.keep_alive_secs: is the old name of `keep_alive`, which is also given: keep `keep_alive` only
1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md
",
    },
];

fn date_in_days(days: i64) -> String {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * days);
    t.strftime("%Y-%m-%d").to_string()
}

fn config_text(kit: &Kit, case: &Case) -> String {
    let mut text = BASE.to_string();
    for (from, to) in case.edits {
        if from.is_empty() {
            text.push_str(to);
        } else {
            assert!(
                text.contains(from),
                "{}: `{from}` not in the base",
                case.name
            );
            text = text.replacen(from, to, 1);
        }
    }
    text.replace("{dir}", &kit.path().display().to_string())
}

/// Run the binary in the kit's directory on `c.toml`: (exit success, stderr then stdout, with
/// the kit's directory written `{dir}`).
fn run(kit: &Kit, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--config", "c.toml"])
        .current_dir(kit.path())
        .env_remove("SITERELAY_CONFIG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.success(),
        text.replace(&kit.path().display().to_string(), "{dir}"),
    )
}

#[test]
fn the_base_configuration_of_the_catalogue_is_clean() {
    let kit = Kit::new();
    std::fs::write(
        kit.path().join("c.toml"),
        BASE.replace("{dir}", &kit.path().display().to_string()),
    )
    .unwrap();
    let (ok, out) = run(&kit, &["check-config"]);
    assert!(ok, "{out}");
    assert_eq!(
        out,
        "c.toml: OK (1 MLLP feed(s), 0 serial port(s), broker localhost:8883)\n"
    );
}

#[test]
fn every_broken_configuration_in_the_catalogue_gets_its_exact_message() {
    assert!(CASES.len() >= 20, "the catalogue has {} cases", CASES.len());
    let kit = Kit::new();
    let mut failures = Vec::new();
    for case in CASES {
        std::fs::write(kit.path().join("c.toml"), config_text(&kit, case)).unwrap();
        let (ok, out) = run(&kit, &["check-config"]);
        let expected = case
            .expected
            .replace("{today}", &date_in_days(0))
            .replace("{in10}", &kit.soon);
        if ok != case.ok || out != expected {
            failures.push(format!(
                "--- {}\nexit ok: {ok} (expected {})\ngot:\n{out}expected:\n{expected}",
                case.name, case.ok
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn run_refuses_what_check_config_refuses_with_the_same_lines() {
    let kit = Kit::new();
    for name in [
        "a client certificate with another certificate's key",
        "the same port on 0.0.0.0 and 127.0.0.1",
        "an expired client certificate is an error with its date as a date",
    ] {
        let case = CASES.iter().find(|c| c.name == name).unwrap();
        std::fs::write(kit.path().join("c.toml"), config_text(&kit, case)).unwrap();
        let (ok, checked) = run(&kit, &["check-config"]);
        assert!(!ok);
        let (ok, ran) = run(&kit, &["run"]);
        assert!(!ok, "run started with: {name}");
        let problem = checked.lines().next().unwrap();
        assert!(ran.contains(problem), "{name}: run said:\n{ran}");
        assert!(
            !ran.contains("KeyMismatch"),
            "the mismatch is said once, in plain words:\n{ran}"
        );
        assert!(
            !kit.path().join("data/outbox.sqlite").exists(),
            "nothing was opened"
        );
    }
}

#[test]
fn a_configuration_file_that_is_not_there_is_one_plain_error() {
    let kit = Kit::new();
    let (ok, out) = run(&kit, &["check-config"]);
    assert!(!ok);
    assert_eq!(
        out,
        "c.toml: cannot read the configuration file: No such file or directory (os error 2)\n1 error(s), 0 warning(s): siterelay run would refuse this configuration; see docs/configuration.md\n"
    );
}
