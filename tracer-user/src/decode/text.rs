//! Names chosen by whoever runs on the host (process names, Unix socket paths, cgroup paths)
//! into text that is safe on every output, and still tells every name apart.
//!
//! A process may call itself anything (`prctl(PR_SET_NAME)`) and a socket path may hold any
//! byte: written raw, an escape sequence retitles or clears the user's terminal and a newline
//! forges a whole log line. So each name is escaped once, where it is decoded:
//! - a byte that is not UTF-8 becomes `\xff`;
//! - a control character becomes `\x1b` (C0 and DEL) or `\u{9b}` (C1), and a character that
//!   reorders text (bidirectional overrides, as in "Trojan Source") `\u{202e}`;
//! - a backslash becomes `\\`,
//!
//! so the mapping is reversible: two names are the same text only if they are the same bytes.

use std::fmt::Write as _;

/// `bytes` as text safe to print anywhere (see the module's documentation).
pub fn untrusted(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || reorders_text(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// Unicode's explicit bidirectional formatting characters and marks.
fn reorders_text(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_unchanged() {
        for name in [
            "nginx",
            "php-fpm8.2",
            "/run/php/php-fpm.sock",
            "café",
            "/system.slice",
        ] {
            assert_eq!(untrusted(name.as_bytes()), name);
        }
    }

    #[test]
    fn control_characters_and_bad_bytes_are_escaped_visibly() {
        assert_eq!(untrusted(b"\x1b]0;owned\x07"), "\\x1b]0;owned\\x07");
        assert_eq!(
            untrusted(b"/x\n2026-11-29T18:00:00Z nginx refused"),
            "/x\\x0a2026-11-29T18:00:00Z nginx refused"
        );
        assert_eq!(untrusted(b"a\x7fb\tc\r"), "a\\x7fb\\x09c\\x0d");
        assert_eq!(untrusted(b"ng\xffinx"), "ng\\xffinx");
        assert_eq!(untrusted("\u{9b}2J".as_bytes()), "\\u{9b}2J");
        assert_eq!(
            untrusted("evil\u{202e}gnp.exe".as_bytes()),
            "evil\\u{202e}gnp.exe"
        );
        // A truncated multi-byte character (comm is cut at 15 bytes) is bytes, not U+FFFD.
        assert_eq!(untrusted(b"caf\xc3"), "caf\\xc3");
    }

    #[test]
    fn distinct_names_stay_distinct() {
        // Without escaping the backslash, the name `\xff` (4 bytes) and the byte 0xff would
        // both read `\xff`; lossy decoding would make both invalid bytes U+FFFD.
        let names: [&[u8]; 6] = [b"\xff", b"\\xff", b"\xfe", b"\\\\xff", b"\x1b", b"\\x1b"];
        let texts: std::collections::BTreeSet<String> =
            names.iter().map(|n| untrusted(n)).collect();
        assert_eq!(texts.len(), names.len(), "{texts:?}");
        for text in &texts {
            assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        }
    }
}
