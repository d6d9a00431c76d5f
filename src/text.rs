//! Text that leaves the box's own control: what a terminal shows and what health and the
//! inventory carry. A sender chooses these bytes, so they are made harmless before they reach a
//! terminal (escape sequences) or a report (size).

use std::borrow::Cow;
use std::fmt::Write;

/// The longest string health and the inventory carry for any one value a sender or a file
/// chose (an application name, a certificate subject, an error text). Longer ones are cut at a
/// character boundary and end with [`TRUNCATED`].
pub const REPORT_MAX_CHARS: usize = 256;

/// What ends a string cut by [`bounded`].
pub const TRUNCATED: &str = "…[truncated]";

/// `s`, or its first [`REPORT_MAX_CHARS`] characters followed by [`TRUNCATED`].
pub fn bounded(s: &str) -> Cow<'_, str> {
    bounded_to(s, REPORT_MAX_CHARS)
}

/// `s`, or its first `max_chars` characters followed by [`TRUNCATED`].
pub fn bounded_to(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        None => Cow::Borrowed(s),
        Some((at, _)) => Cow::Owned(format!("{}{TRUNCATED}", &s[..at])),
    }
}

/// A character a terminal may act on rather than show: C0 and C1 controls (ESC, CSI, BEL,
/// backspace...), DEL, and the Unicode bidirectional overrides that reorder what is shown.
fn is_hazard(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` made safe to print to a terminal: every control character except newline and tab, and
/// every bidirectional override, is written as a visible escape (`\x1b`, `\u{202e}`).
pub fn for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| is_hazard(c) && c != '\n' && c != '\t') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c == '\n' || c == '\t' || !is_hazard(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// A JSON document made safe to print to a terminal and still the same JSON: serde_json already
/// escapes C0 controls inside strings; this escapes DEL, the C1 controls and the bidirectional
/// overrides as `\uXXXX` too (they can only occur inside strings).
pub fn json_for_terminal(json: &str) -> Cow<'_, str> {
    if !json.chars().any(is_hazard_in_json) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_hazard_in_json(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn is_hazard_in_json(c: char) -> bool {
    is_hazard(c) && !matches!(c, '\n' | '\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_obeyed() {
        let hostile =
            "MSH|^~\\&|\u{1b}]0;owned\u{7}\u{1b}[2J|X\u{8}\u{9b}31m\u{202e}cba\rEND\n\tok";
        let shown = for_terminal(hostile);
        assert_eq!(
            shown,
            "MSH|^~\\&|\\x1b]0;owned\\x07\\x1b[2J|X\\x08\\x9b31m\\u{202e}cba\\x0dEND\n\tok"
        );
        assert!(
            !shown
                .chars()
                .any(|c| is_hazard(c) && c != '\n' && c != '\t')
        );
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        let s = "PID|1||9990000018^^^NHS^NH||ÉTÉ^ANNE\n\tx";
        assert!(matches!(for_terminal(s), Cow::Borrowed(_)));
        assert!(matches!(json_for_terminal(s), Cow::Borrowed(_)));
    }

    #[test]
    fn json_stays_json_with_c1_controls_escaped() {
        let v = serde_json::json!({"raw": "a\u{1b}[2J\u{9b}1m\u{7f}\u{202e}z"});
        let text = serde_json::to_string_pretty(&v).unwrap();
        assert!(text.contains('\u{9b}'), "serde_json leaves C1 as it is");
        let safe = json_for_terminal(&text);
        assert!(!safe.chars().any(|c| is_hazard(c) && c != '\n'));
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn long_strings_are_cut_with_a_marker_at_a_character_boundary() {
        assert_eq!(bounded("PAS"), "PAS");
        let long = "É".repeat(1_000_000);
        let cut = bounded(&long);
        assert_eq!(
            cut.chars().count(),
            REPORT_MAX_CHARS + TRUNCATED.chars().count()
        );
        assert!(cut.ends_with(TRUNCATED));
        assert_eq!(bounded(&"a".repeat(256)).len(), 256);
    }
}
