//! Property tests of what parses bytes chosen by others: kernel records (any bytes a ring buffer
//! could hold), names and paths (any bytes a process may choose), and the `--upstream` flag.
//! Nothing panics, every output is free of control characters, and escaping loses nothing.
//! (The HTTP request reader is hyper's, fuzzed upstream.)

use proptest::prelude::*;
use tracer_common::{FailureEvent, RecordKind};
use tracer_user::{
    classify::Classified,
    decode::{self, Clock, Failure, Record, text::untrusted},
    export::events::{UpstreamMatch, json_line, text_line},
};

/// The inverse of [`untrusted`], to show that it loses nothing.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).expect("two hex digits"));
            }
            Some('u') => {
                assert_eq!(chars.next(), Some('{'));
                let hex: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let c = char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap();
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            other => panic!("a lone backslash before {other:?} in {text:?}"),
        }
    }
    out
}

fn shows_no_control_characters(text: &str) -> bool {
    !text.chars().any(|c| c.is_control() && c != '\n')
}

/// A failure record whose every byte is arbitrary but for its kind and a valid outcome.
fn failure_record() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u8>(), size_of::<FailureEvent>()),
        0u8..20,
    )
        .prop_map(|(mut bytes, outcome)| {
            bytes[..4].copy_from_slice(&(RecordKind::Failure as u32).to_ne_bytes());
            let at = std::mem::offset_of!(FailureEvent, outcome);
            bytes[at] = outcome;
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn escaping_any_bytes_is_printable_and_reversible(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let text = untrusted(&bytes);
        prop_assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        prop_assert_eq!(unescape(&text), bytes);
    }

    #[test]
    fn any_bytes_from_a_ring_buffer_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = decode::record(&bytes);
    }

    #[test]
    fn any_flag_value_parses_or_fails_cleanly(text in "\\PC{0,40}") {
        let _ = text.parse::<UpstreamMatch>();
    }

    #[test]
    fn every_socket_address_is_an_upstream_flag(mut addr in any::<std::net::SocketAddr>()) {
        // The flow label is no part of an address's text.
        if let std::net::SocketAddr::V6(v6) = &mut addr {
            v6.set_flowinfo(0);
        }
        let text = addr.to_string();
        prop_assert_eq!(text.parse::<UpstreamMatch>(), Ok(UpstreamMatch::Addr(addr)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_failure_record_prints_as_one_clean_line(bytes in failure_record()) {
        let Ok(Record::Failure(event)) = decode::record(&bytes) else {
            return Err(TestCaseError::fail("a failure record of the right size decodes"));
        };
        let clock = Clock::new();
        if let Ok(failure) = Failure::from_event(&event, &clock, &()) {
            let classified = Classified {
                failure,
                root_cause: None,
                proxy_container: None,
                upstream_container: None,
            };
            let text = text_line(&classified);
            prop_assert!(!text.contains('\n') && shows_no_control_characters(&text), "{text:?}");
            let json = json_line(&classified);
            prop_assert!(!json.contains('\n'), "{json}");
            let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
            prop_assert!(parsed["comm"].as_str().is_some_and(shows_no_control_characters));
        }
    }
}
