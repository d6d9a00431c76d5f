//! Character sets named in MSH-18 and decoding of a whole message to text.
//!
//! Supports the five sets siterelay accepts: `ASCII`, `8859/1` (Latin-1),
//! `8859/15` (Latin-9), `UNICODE UTF-8` and `windows-1252` (Latin-1 with
//! printable characters in 0x80-0x9F, as Windows PCs beside analysers send:
//! `€ „ “ ” – —`; not in HL7 table 0211, so MSH-18 may name it
//! `WINDOWS-1252` or `CP1252`). [`decode`] turns raw message bytes into a
//! `String`; [`Charset::encode_lossy`] goes the other way for text we write
//! (ACKs).
//!
//! Deliberately NOT done here: no guessing or sniffing of undeclared
//! charsets (the caller passes a configured default), no ISO 2022 code
//! extensions (only the first MSH-18 repetition is considered by callers),
//! no UTF-16/32 or other multibyte sets (they are `Unsupported`), and no
//! HL7 escape handling (see `crate::hl7::header::unescape`). Errors carry
//! byte offsets, never message content.

use std::fmt;

/// A character set siterelay can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Charset {
    /// 7-bit US-ASCII (MSH-18 `ASCII`, also the HL7 default).
    Ascii,
    /// ISO 8859-1 (MSH-18 `8859/1`).
    Latin1,
    /// ISO 8859-15 (MSH-18 `8859/15`).
    Latin9,
    /// UTF-8 (MSH-18 `UNICODE UTF-8`).
    Utf8,
    /// Windows code page 1252 (MSH-18 `WINDOWS-1252` or `CP1252`, any case; not in HL7 table 0211).
    Windows1252,
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CharsetError {
    /// MSH-18 names a character set that is not supported.
    #[error("unsupported character set in MSH-18 ({name:?})")]
    Unsupported {
        /// The MSH-18 value (a short code from HL7 table 0211, not patient data),
        /// cut to at most 40 characters.
        name: String,
    },
    /// A byte >= 0x80 in a message declared (or defaulted) as ASCII.
    #[error("byte at offset {offset} is not ASCII")]
    NotAscii {
        /// Offset of the first offending byte in the message.
        offset: usize,
    },
    /// Invalid UTF-8 in a message declared (or defaulted) as UTF-8.
    #[error("invalid UTF-8 at byte offset {offset}")]
    InvalidUtf8 {
        /// Offset of the first byte of the invalid sequence in the message.
        offset: usize,
    },
}

/// Latin-9 code points that differ from Latin-1, by byte.
const LATIN9_DIFF: [(u8, char); 8] = [
    (0xA4, '\u{20AC}'), // €
    (0xA6, '\u{0160}'), // Š
    (0xA8, '\u{0161}'), // š
    (0xB4, '\u{017D}'), // Ž
    (0xB8, '\u{017E}'), // ž
    (0xBC, '\u{0152}'), // Œ
    (0xBD, '\u{0153}'), // œ
    (0xBE, '\u{0178}'), // Ÿ
];

/// Windows-1252 characters for the bytes 0x80-0x9F. The five bytes the code page leaves
/// undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) map to the C1 control of the same value, as the
/// WHATWG Encoding Standard (and so every browser) does.
const WINDOWS_1252_C1: [char; 32] = [
    '\u{20AC}', '\u{0081}', '\u{201A}', '\u{0192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{02C6}', '\u{2030}', '\u{0160}', '\u{2039}', '\u{0152}', '\u{008D}', '\u{017D}', '\u{008F}',
    '\u{0090}', '\u{2018}', '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{02DC}', '\u{2122}', '\u{0161}', '\u{203A}', '\u{0153}', '\u{009D}', '\u{017E}', '\u{0178}',
];

impl Charset {
    /// Maps an MSH-18 value (case-insensitive, surrounding spaces ignored) to
    /// a charset; `None` for anything else, including an empty value.
    pub fn from_msh18(value: &str) -> Option<Charset> {
        let v = value.trim();
        if v.eq_ignore_ascii_case("ASCII") {
            Some(Charset::Ascii)
        } else if v.eq_ignore_ascii_case("8859/1") {
            Some(Charset::Latin1)
        } else if v.eq_ignore_ascii_case("8859/15") {
            Some(Charset::Latin9)
        } else if v.eq_ignore_ascii_case("UNICODE UTF-8") {
            Some(Charset::Utf8)
        } else if v.eq_ignore_ascii_case("WINDOWS-1252") || v.eq_ignore_ascii_case("CP1252") {
            Some(Charset::Windows1252)
        } else {
            None
        }
    }

    /// The HL7 table 0211 name, as written in MSH-18 (e.g. `UNICODE UTF-8`); for Windows-1252,
    /// which the table lacks, its IANA name `windows-1252`.
    pub fn charset_name(self) -> &'static str {
        match self {
            Charset::Ascii => "ASCII",
            Charset::Latin1 => "8859/1",
            Charset::Latin9 => "8859/15",
            Charset::Utf8 => "UNICODE UTF-8",
            Charset::Windows1252 => "windows-1252",
        }
    }

    /// Whether every byte is one character (Latin-1, Latin-9, Windows-1252).
    pub(crate) fn single_byte(self) -> bool {
        matches!(
            self,
            Charset::Latin1 | Charset::Latin9 | Charset::Windows1252
        )
    }

    /// Decodes one byte of a single-byte charset. Bytes >= 0x80 are mapped as
    /// Latin-1 for `Ascii` and `Utf8` too (only meaningful for Latin sets).
    pub(crate) fn byte_to_char(self, b: u8) -> char {
        if self == Charset::Windows1252 && (0x80..=0x9F).contains(&b) {
            return WINDOWS_1252_C1[usize::from(b - 0x80)];
        }
        if self == Charset::Latin9
            && (0xA4..=0xBE).contains(&b)
            && let Some(&(_, c)) = LATIN9_DIFF.iter().find(|(byte, _)| *byte == b)
        {
            return c;
        }
        char::from(b)
    }

    /// Length in UTF-8 of `bytes` once decoded by [`Charset::push_lossy`]
    /// (exact for Latin sets and valid UTF-8), to size buffers up front.
    pub(crate) fn decoded_len(self, bytes: &[u8]) -> usize {
        if self.single_byte() && !bytes.is_ascii() {
            bytes.iter().map(|&b| self.byte_to_char(b).len_utf8()).sum()
        } else {
            bytes.len()
        }
    }

    /// Appends `bytes` to `out` without failing: Latin sets map byte by byte,
    /// the others go through UTF-8 with U+FFFD for invalid sequences.
    pub(crate) fn push_lossy(self, out: &mut String, bytes: &[u8]) {
        if self.single_byte() && !bytes.is_ascii() {
            out.extend(bytes.iter().map(|&b| self.byte_to_char(b)));
        } else {
            out.push_str(&String::from_utf8_lossy(bytes));
        }
    }

    /// Encodes `text` in this charset; characters it cannot represent become `?`.
    pub fn encode_lossy(self, text: &str) -> Vec<u8> {
        if self == Charset::Utf8 || text.is_ascii() {
            return text.as_bytes().to_vec();
        }
        text.chars()
            .map(|c| match self {
                Charset::Ascii | Charset::Utf8 => ascii_or_question(c),
                Charset::Latin1 => u8::try_from(u32::from(c)).unwrap_or(b'?'),
                Charset::Windows1252 => match u8::try_from(u32::from(c)) {
                    // Latin-1 characters outside 0x80-0x9F keep their byte.
                    Ok(b) if !(0x80..=0x9F).contains(&b) => b,
                    // The rest: the byte whose table entry it is (the five undefined bytes map
                    // to their C1 control both ways), else unrepresentable.
                    _ => WINDOWS_1252_C1
                        .iter()
                        .position(|&t| t == c)
                        .map_or(b'?', |i| 0x80 + i as u8),
                },
                Charset::Latin9 => {
                    if let Some(&(b, _)) = LATIN9_DIFF.iter().find(|(_, ch)| *ch == c) {
                        b
                    } else if LATIN9_DIFF
                        .iter()
                        .any(|(b, _)| u32::from(*b) == u32::from(c))
                    {
                        // Latin-1 character whose byte Latin-9 reuses.
                        b'?'
                    } else {
                        u8::try_from(u32::from(c)).unwrap_or(b'?')
                    }
                }
            })
            .collect()
    }
}

fn ascii_or_question(c: char) -> u8 {
    if c.is_ascii() { c as u8 } else { b'?' }
}

impl fmt::Display for Charset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.charset_name())
    }
}

/// Decodes a whole message. `declared` is the MSH-18 value (first
/// repetition); when it is `None` or blank, `default` applies. A declared
/// but unknown charset is an error, never silently replaced by `default`.
///
/// # Errors
/// [`CharsetError::Unsupported`] for an unknown declaration; `NotAscii` or
/// `InvalidUtf8` (with the byte offset) when the bytes do not fit the charset.
pub fn decode(
    message: &[u8],
    declared: Option<&str>,
    default: Charset,
) -> Result<String, CharsetError> {
    let charset = match declared {
        Some(name) if !name.trim().is_empty() => {
            Charset::from_msh18(name).ok_or_else(|| CharsetError::Unsupported {
                name: name.chars().take(40).collect(),
            })?
        }
        _ => default,
    };
    if message.is_ascii() {
        // Fast path: identical in every supported charset.
        return Ok(String::from_utf8(message.to_vec()).unwrap_or_default());
    }
    match charset {
        Charset::Ascii => {
            let offset = message.iter().position(|&b| b >= 0x80).unwrap_or(0);
            Err(CharsetError::NotAscii { offset })
        }
        Charset::Utf8 => {
            String::from_utf8(message.to_vec()).map_err(|e| CharsetError::InvalidUtf8 {
                offset: e.utf8_error().valid_up_to(),
            })
        }
        Charset::Latin1 | Charset::Latin9 | Charset::Windows1252 => {
            let mut out = String::with_capacity(charset.decoded_len(message));
            charset.push_lossy(&mut out, message);
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msh18_names_map_case_insensitively_to_charsets() {
        let table: &[(&str, Option<Charset>)] = &[
            ("ASCII", Some(Charset::Ascii)),
            ("ascii", Some(Charset::Ascii)),
            ("8859/1", Some(Charset::Latin1)),
            ("8859/15", Some(Charset::Latin9)),
            ("UNICODE UTF-8", Some(Charset::Utf8)),
            ("unicode utf-8", Some(Charset::Utf8)),
            (" UNICODE UTF-8 ", Some(Charset::Utf8)),
            ("UNICODE UTF-16", None),
            ("8859/2", None),
            ("ISO IR87", None),
            ("UTF8", None),
            ("WINDOWS-1252", Some(Charset::Windows1252)),
            ("windows-1252", Some(Charset::Windows1252)),
            ("CP1252", Some(Charset::Windows1252)),
            ("cp1252", Some(Charset::Windows1252)),
            ("WINDOWS-1250", None),
            ("", None),
        ];
        for (name, expected) in table {
            assert_eq!(Charset::from_msh18(name), *expected, "{name:?}");
        }
    }

    #[test]
    fn charset_names_round_trip_through_msh18() {
        for cs in [
            Charset::Ascii,
            Charset::Latin1,
            Charset::Latin9,
            Charset::Utf8,
            Charset::Windows1252,
        ] {
            assert_eq!(Charset::from_msh18(cs.charset_name()), Some(cs));
        }
        assert_eq!(Charset::Utf8.charset_name(), "UNICODE UTF-8");
    }

    #[test]
    fn decode_follows_declared_charset_or_default() {
        type Row = (
            &'static str,
            &'static [u8],
            Option<&'static str>,
            Charset,
            Result<&'static str, CharsetError>,
        );
        let table: &[Row] = &[
            (
                "ascii passes everywhere",
                b"PID|TEST^PATIENT",
                Some("ASCII"),
                Charset::Utf8,
                Ok("PID|TEST^PATIENT"),
            ),
            (
                "ascii bytes under latin1",
                b"abc",
                Some("8859/1"),
                Charset::Ascii,
                Ok("abc"),
            ),
            (
                "no declaration uses default",
                b"M\xfcller",
                None,
                Charset::Latin1,
                Ok("M\u{fc}ller"),
            ),
            (
                "blank declaration uses default",
                b"M\xfcller",
                Some("  "),
                Charset::Latin1,
                Ok("M\u{fc}ller"),
            ),
            (
                "latin1 maps bytes one to one",
                b"\xa4\xa6\xe9\xff",
                Some("8859/1"),
                Charset::Ascii,
                Ok("\u{a4}\u{a6}\u{e9}\u{ff}"),
            ),
            (
                "latin9 differs in eight code points",
                b"\xa4\xa6\xa8\xb4\xb8\xbc\xbd\xbe\xe9",
                Some("8859/15"),
                Charset::Ascii,
                Ok("\u{20ac}\u{160}\u{161}\u{17d}\u{17e}\u{152}\u{153}\u{178}\u{e9}"),
            ),
            (
                "utf8 decodes",
                "M\u{fc}ller \u{20ac}".as_bytes(),
                Some("UNICODE UTF-8"),
                Charset::Ascii,
                Ok("M\u{fc}ller \u{20ac}"),
            ),
            (
                "ascii rejects high bytes with offset",
                b"abc\xe9d",
                Some("ASCII"),
                Charset::Utf8,
                Err(CharsetError::NotAscii { offset: 3 }),
            ),
            (
                "default ascii rejects high bytes",
                b"\x80",
                None,
                Charset::Ascii,
                Err(CharsetError::NotAscii { offset: 0 }),
            ),
            (
                "utf8 rejects invalid bytes with offset",
                b"ab\xc3\x28",
                Some("UNICODE UTF-8"),
                Charset::Ascii,
                Err(CharsetError::InvalidUtf8 { offset: 2 }),
            ),
            (
                "utf8 rejects truncated sequence",
                b"abcd\xe2\x82",
                None,
                Charset::Utf8,
                Err(CharsetError::InvalidUtf8 { offset: 4 }),
            ),
            (
                "unknown declaration is unsupported even for ascii bytes",
                b"abc",
                Some("UNICODE UTF-16"),
                Charset::Utf8,
                Err(CharsetError::Unsupported {
                    name: "UNICODE UTF-16".into(),
                }),
            ),
        ];
        for (name, bytes, declared, default, expected) in table {
            let got = decode(bytes, *declared, *default);
            assert_eq!(got, expected.clone().map(String::from), "{name}");
        }
    }

    #[test]
    fn windows_1252_decodes_quotes_euro_and_dashes_that_latin1_turns_into_controls() {
        let bytes = b"\x84Probe h\xe4molytisch\x93 \x80 3.5\x965.0";
        let text = "\u{201e}Probe h\u{e4}molytisch\u{201c} \u{20ac} 3.5\u{2013}5.0";
        assert_eq!(text, "„Probe hämolytisch“ € 3.5–5.0");
        assert_eq!(
            decode(bytes, None, Charset::Windows1252).as_deref(),
            Ok(text)
        );
        assert_eq!(
            decode(bytes, Some("CP1252"), Charset::Ascii).as_deref(),
            Ok(text)
        );
        // The same bytes read as Latin-1: invisible C1 controls, what analysers' users saw.
        let latin1 = decode(bytes, None, Charset::Latin1).unwrap();
        assert!(
            latin1.contains('\u{84}') && latin1.contains('\u{93}') && latin1.contains('\u{96}')
        );
        // Every byte 0x80-0x9F: the 27 printable characters, the 5 undefined bytes as C1 controls.
        let high: Vec<u8> = (0x80..=0x9F).collect();
        let decoded = decode(&high, None, Charset::Windows1252).unwrap();
        assert_eq!(
            decoded,
            "€\u{81}‚ƒ„…†‡ˆ‰Š‹Œ\u{8d}Ž\u{8f}\u{90}‘’“”•–—˜™š›œ\u{9d}žŸ"
        );
        // 0xA0-0xFF are Latin-1.
        assert_eq!(
            decode(b"\xa0\xa4\xe9\xff", None, Charset::Windows1252).unwrap(),
            "\u{a0}\u{a4}\u{e9}\u{ff}"
        );
    }

    #[test]
    fn decode_errors_do_not_contain_message_content() {
        let err = decode(b"TEST^PATIENT\xe9", Some("ASCII"), Charset::Ascii).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("TEST"), "{text}");
        assert_eq!(text, "byte at offset 12 is not ASCII");
    }

    #[test]
    fn encode_lossy_round_trips_representable_text() {
        let table: &[(Charset, &str, &[u8])] = &[
            (Charset::Ascii, "plain", b"plain"),
            (Charset::Ascii, "M\u{fc}ller", b"M?ller"),
            (Charset::Utf8, "M\u{fc}ller", "M\u{fc}ller".as_bytes()),
            (Charset::Latin1, "M\u{fc}ller \u{20ac}", b"M\xfcller ?"),
            (
                Charset::Latin9,
                "\u{20ac}\u{160}\u{178}\u{e9}",
                b"\xa4\xa6\xbe\xe9",
            ),
            (Charset::Latin9, "\u{a4}", b"?"),
            (
                Charset::Windows1252,
                "\u{201e}Probe h\u{e4}molytisch\u{201c} \u{20ac} 3.5\u{2013}5.0",
                b"\x84Probe h\xe4molytisch\x93 \x80 3.5\x965.0",
            ),
            // A C1 control Windows-1252 replaced by a printable character has no byte.
            (Charset::Windows1252, "\u{84}\u{3a9}", b"??"),
        ];
        for (cs, text, expected) in table {
            assert_eq!(cs.encode_lossy(text), expected.to_vec(), "{cs} {text:?}");
        }
        let all: Vec<u8> = (0u8..=255).collect();
        for cs in [Charset::Latin1, Charset::Latin9, Charset::Windows1252] {
            let text = decode(&all, Some(cs.charset_name()), Charset::Ascii).unwrap();
            assert_eq!(cs.encode_lossy(&text), all, "{cs}");
        }
    }
}
