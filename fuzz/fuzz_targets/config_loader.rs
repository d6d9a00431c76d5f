//! Arbitrary configuration text through `config::parse_all`, the reading and checking of the
//! file that `siterelay check-config` and `siterelay run` share (`preflight::check_file` reads
//! the file and calls it; what follows there needs the machine: certificate files, the data
//! directory, serial devices). Must never panic, and every problem about something in the file
//! must name its line (the operator is told where to look); only a problem about something the
//! file does not hold at all ("no feeds configured") may come without one. Note: the checks read the PEM files the text names
//! (any path, as check-config does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use siterelay::config;
use siterelay::preflight::Checked;

fuzz_target!(|data: &[u8]| {
    // A file that is not UTF-8 is refused by `read_to_string` before this point.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (cfg, problems) = config::parse_all(text);
    let lines = text.split('\n').count();
    for p in &problems {
        match p.line {
            Some(line) => {
                assert!(
                    (1..=lines).contains(&line),
                    "line {line} of a {lines}-line file: {p:?}"
                )
            }
            // Only a problem about something the file does not hold at all ("no feeds
            // configured") may come without a line: one whose key is in the file must say where.
            None => assert!(
                config::line_of_key(text, &p.key).is_none(),
                "a problem without a line, though its key is on line {:?}: {p:?}",
                config::line_of_key(text, &p.key)
            ),
        }
        assert!(!p.message.is_empty());
    }
    // `cfg` is what could be read, with or without problems: `check_file` decides on them.
    let _ = cfg;
    // What check-config prints.
    let checked = Checked {
        file: "c.toml".into(),
        config: None,
        errors: problems,
        warnings: Vec::new(),
    };
    for l in checked.lines() {
        assert!(l.starts_with("c.toml:"), "{l}");
    }
});
