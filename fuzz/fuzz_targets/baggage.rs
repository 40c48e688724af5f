//! W3C baggage: `sources::baggage_value` and `sources::percent_decode`.
//!
//! Input (lossy UTF-8) split on `\n`: the first line is the key looked up,
//! every further line is one `baggage` header value.
#![no_main]

use std::borrow::Cow;

use envlane::sources::{baggage_value, percent_decode};
use libfuzzer_sys::fuzz_target;

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Every byte as `%XX`.
fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Whether `inner` lies inside one of `outers` (a borrowed result must be
/// a slice of the header it came from).
fn borrowed_from(inner: &str, outers: &[&str]) -> bool {
    let p = inner.as_ptr() as usize;
    outers.iter().any(|o| {
        let start = o.as_ptr() as usize;
        p >= start && p + inner.len() <= start + o.len()
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let key = lines.next().unwrap_or_default();
    let headers: Vec<&str> = lines.collect();

    // percent_decode on every line and the key.
    for s in headers.iter().copied().chain([key]) {
        let decoded = percent_decode(s);
        match &decoded {
            Some(Cow::Borrowed(b)) => {
                assert!(!s.contains('%'));
                assert_eq!(*b, s);
            }
            Some(Cow::Owned(d)) => {
                assert!(s.contains('%'));
                // Each escape turns three bytes into one.
                assert_eq!(d.len(), s.len() - 2 * s.matches('%').count());
                assert!(std::str::from_utf8(d.as_bytes()).is_ok());
                // Fully re-escaped, it decodes to itself.
                assert_eq!(percent_decode(&encode_all(d)).as_deref(), Some(d.as_str()));
            }
            None => {
                // Only a broken escape or non-UTF-8 bytes are refused.
                assert!(s.contains('%'));
            }
        }
        // Escaping everything is always decodable and exact.
        assert_eq!(percent_decode(&encode_all(s)).as_deref(), Some(s));
    }

    let got = baggage_value(headers.iter().copied(), key);

    // Several headers are one comma-separated list.
    let joined = headers.join(",");
    let from_joined = baggage_value([joined.as_str()], key);
    assert_eq!(got.as_deref(), from_joined.as_deref(), "headers vs joined");

    // A member with another key in front changes nothing; anything after a
    // found member changes nothing either.
    let other = if key == "zz-other" {
        "zz-other2"
    } else {
        "zz-other"
    };
    let front = format!("{other}=1");
    let with_front = baggage_value(
        [front.as_str()].into_iter().chain(headers.iter().copied()),
        key,
    );
    assert_eq!(
        got.as_deref(),
        with_front.as_deref(),
        "unrelated member in front"
    );
    if got.is_some() {
        let tail = format!("{key}=tail-value");
        let with_tail = baggage_value(headers.iter().copied().chain([tail.as_str()]), key);
        assert_eq!(
            got.as_deref(),
            with_tail.as_deref(),
            "member appended after a hit"
        );
    }

    // A key with a separator, `=` or surrounding whitespace can never match:
    // keys are the trimmed text before the first `=` of a member.
    if key.contains([',', ';', '=']) || key.starts_with(is_ows) || key.ends_with(is_ows) {
        assert!(got.is_none(), "key {key:?} matched");
    }

    if let Some(v) = &got {
        assert!(std::str::from_utf8(v.as_bytes()).is_ok());
        assert!(
            joined.contains(key),
            "found a value for a key that is not there"
        );
        match v {
            Cow::Borrowed(b) => {
                // Not decoded: a trimmed slice of one member's value.
                assert!(
                    borrowed_from(b, &headers),
                    "value not borrowed from the input"
                );
                assert!(!b.contains([',', ';', '%']), "{b:?}");
                assert!(!b.starts_with(is_ows) && !b.ends_with(is_ows), "{b:?}");
                // The member `key=value` is in the input, modulo whitespace.
                let compact: String = joined.chars().filter(|c| !is_ows(*c)).collect();
                let needle: String = format!("{key}={b}")
                    .chars()
                    .filter(|c| !is_ows(*c))
                    .collect();
                assert!(compact.contains(&needle), "{needle:?} not in the input");
            }
            Cow::Owned(d) => {
                // Decoded from escapes: re-escaping it decodes back.
                assert!(joined.contains('%'));
                assert_eq!(percent_decode(&encode_all(d)).as_deref(), Some(d.as_str()));
                // As a fresh header with the value fully escaped, the same
                // value comes back.
                let fresh = format!("{key}={}", encode_all(d));
                assert_eq!(
                    baggage_value([fresh.as_str()], key).as_deref(),
                    Some(d.as_str())
                );
            }
        }
    }
});
