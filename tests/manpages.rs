//! The manual pages and shell completions the Debian package ships: made by the real binary,
//! rendered by the real `man` (man-db) without a single groff warning, and siterelay.toml(5)
//! holding every configuration key docs/configuration.md documents, so the two cannot drift.

mod common;

use std::path::Path;
use std::process::Command;

use common::BIN;

fn pages(dir: &Path) -> Vec<std::path::PathBuf> {
    let out = Command::new(BIN)
        .args(["manpages", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(Into::into)
        .collect()
}

/// `man -l FILE` as plain text (overstrike removed); panics on any groff warning.
fn render(page: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-l", "-P", "cat"])
        .arg(page)
        .env("MANWIDTH", "120")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap_or_else(|e| panic!("man (apt-get install man-db) cannot run: {e}"));
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && warnings.trim().is_empty(),
        "{} renders with warnings:\n{warnings}",
        page.display()
    );
    // Bold and underline come as "X\bX" / "_\bX" when not on a terminal.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    text
}

#[test]
fn every_manual_page_renders_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let pages = pages(dir.path());
    let names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "siterelay.8",
        "siterelay-enrol.8",
        "siterelay-send.8",
        "siterelay-status.8",
        "siterelay-queue-held-retry.8",
        "siterelay.toml.5",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("manpages")),
        "the hidden packaging command has no page"
    );
    for p in &pages {
        let text = render(p);
        assert!(text.contains("NAME"), "{}: {text}", p.display());
    }
    let main = render(&dir.path().join("siterelay.8"));
    assert!(main.contains("siterelay-enrol(8)"), "{main}");
    assert!(main.contains("siterelay.toml(5)"), "{main}");
    let status = render(&dir.path().join("siterelay-status.8"));
    assert!(
        status.contains("3 the daemon is not answering"),
        "status's exit codes are in its page: {status}"
    );
}

/// The keys docs/configuration.md documents: the first cell of its tables, when it is a key in
/// backticks (`| `host` | ...`, `| `mqtt.keep_alive_secs` | ...`).
fn documented_keys() -> Vec<String> {
    let doc = include_str!("../docs/configuration.md");
    let mut keys: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |").map(|(k, _)| k.to_string()))
        .filter(|k| {
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.[]".contains(c))
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[test]
fn every_configuration_key_of_the_reference_is_in_siterelay_toml_5() {
    let keys = documented_keys();
    for known in [
        "appliance_id",
        "data_dir",
        "host",
        "key_file",
        "max_message_bytes",
        "client_ca_file",
        "allow_names",
        "mqtt.keep_alive_secs",
    ] {
        assert!(
            keys.iter().any(|k| k == known),
            "{known} among the documented keys {keys:?}"
        );
    }
    assert!(keys.len() >= 40, "only {} keys found: {keys:?}", keys.len());
    let dir = tempfile::tempdir().unwrap();
    pages(dir.path());
    let page = render(&dir.path().join("siterelay.toml.5"));
    let missing: Vec<&String> = keys.iter().filter(|k| !page.contains(k.as_str())).collect();
    assert!(
        missing.is_empty(),
        "siterelay.toml(5) lacks {missing:?}\n{page}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish_know_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in [
            "enrol",
            "check-config",
            "send",
            "install-cert",
            "server-name",
        ] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
        assert!(
            !script.contains("manpages"),
            "{shell}: the hidden packaging command is not offered"
        );
    }
    // The bash script is valid bash.
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("siterelay.bash");
    std::fs::write(&f, &out.stdout).unwrap();
    let st = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(st.success(), "bash -n on the completion script");
}
