//! NHS number format check (Modulus 11), as used by `crate::hl7::normalise`.
//!
//! A valid NHS number is exactly ten ASCII digits whose tenth digit is the
//! Modulus 11 check digit of the first nine. Only the compact form is
//! accepted: HL7 feeds and PDS carry the number without spaces, so a spaced
//! (`999 000 0018`) or otherwise formatted value is reported as not valid and
//! the central side sees the identifier exactly as the sender wrote it,
//! rather than a "valid" number that would not match the same patient's
//! other records.
//!
//! Deliberately NOT done here: no trimming, no range checks (the never-issued
//! `999` test range and all-zero numbers pass if their check digit is right),
//! no lookup or verification against PDS: "valid" means well formed only.

/// True if `s` is exactly ten ASCII digits with a correct Modulus 11 check digit.
pub fn nhs_number_valid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    check_digit(&b[..9]) == Some(b[9] - b'0')
}

/// The Modulus 11 check digit for the first nine digits of an NHS number, or
/// `None` if `first_nine` is not nine ASCII digits or the computed check is 10
/// (no valid NHS number starts with those nine digits).
pub fn nhs_check_digit(first_nine: &str) -> Option<u8> {
    let b = first_nine.as_bytes();
    if b.len() != 9 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    check_digit(b)
}

/// Weights 10 down to 2 on nine ASCII digits; check = 11 - (sum mod 11),
/// 11 becomes 0 and 10 has no check digit.
fn check_digit(nine: &[u8]) -> Option<u8> {
    let sum: u32 = nine
        .iter()
        .zip((2..=10u32).rev())
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        c => u8::try_from(c).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhs_numbers_are_checked_with_modulus_11() {
        let table: &[(&str, &str, bool)] = &[
            ("a valid number in the 999 test range", "9990000018", true),
            ("another valid test number", "9990000026", true),
            ("a check digit of 11 becomes 0", "9990000050", true),
            ("a wrong check digit", "9990000019", false),
            (
                "a check digit computing to 10 is never valid",
                "9990000000",
                false,
            ),
            (
                "the same nine digits with any tenth digit",
                "9990000009",
                false,
            ),
            ("nine digits are too short", "999000001", false),
            ("eleven digits are too long", "99900000180", false),
            ("the empty string", "", false),
            ("spaces are not accepted", "999 000 0018", false),
            (
                "surrounding whitespace is not trimmed",
                " 9990000018",
                false,
            ),
            ("letters are not digits", "99900000A8", false),
            (
                "non-ASCII digits are not digits",
                "999000001\u{0668}",
                false,
            ),
            ("a sign is not a digit", "+990000018", false),
        ];
        for (name, number, valid) in table {
            assert_eq!(nhs_number_valid(number), *valid, "{name}: {number}");
        }
    }

    #[test]
    fn check_digits_generate_valid_numbers_in_the_test_range() {
        let mut made = 0;
        for n in 0..200u32 {
            let nine = format!("999{n:06}");
            match nhs_check_digit(&nine) {
                Some(c) => {
                    made += 1;
                    let full = format!("{nine}{c}");
                    assert!(nhs_number_valid(&full), "{full}");
                    let wrong = format!("{nine}{}", (c + 1) % 10);
                    assert!(!nhs_number_valid(&wrong), "{wrong}");
                }
                None => {
                    for last in 0..10 {
                        assert!(!nhs_number_valid(&format!("{nine}{last}")));
                    }
                }
            }
        }
        assert!(made > 150, "most prefixes have a check digit");
        assert_eq!(nhs_check_digit("999000001"), Some(8));
        assert_eq!(nhs_check_digit("999000005"), Some(0));
        assert_eq!(nhs_check_digit("999000000"), None);
        assert_eq!(nhs_check_digit("99900000"), None);
        assert_eq!(nhs_check_digit("99900000x"), None);
    }
}
