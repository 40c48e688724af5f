//! Cookies: `sources::cookie_value`.
//!
//! Input (lossy UTF-8) split on `\n`: the first line is the cookie name
//! looked up, every further line is one `cookie` header value.
#![no_main]

use envlane::sources::cookie_value;
use libfuzzer_sys::fuzz_target;

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let name = lines.next().unwrap_or_default();
    let headers: Vec<&str> = lines.collect();

    let got = cookie_value(headers.iter().copied(), name);

    // Several `cookie` headers read as one `; `-joined header.
    let joined = headers.join("; ");
    assert_eq!(
        got,
        cookie_value([joined.as_str()], name),
        "headers vs joined"
    );
    let joined_tight = headers.join(";");
    assert_eq!(got, cookie_value([joined_tight.as_str()], name), "`;` join");

    // An unrelated cookie in front changes nothing; after a hit, a later
    // cookie of the same name changes nothing.
    let other = if name == "zz" { "zz2=1" } else { "zz=1" };
    assert_eq!(
        got,
        cookie_value([other].into_iter().chain(headers.iter().copied()), name),
        "unrelated cookie in front"
    );
    if got.is_some() {
        let later = format!("{name}=later");
        assert_eq!(
            got,
            cookie_value(headers.iter().copied().chain([later.as_str()]), name),
            "same name after a hit"
        );
    }

    // A name holding `;` or `=`, or with surrounding whitespace, never matches.
    if name.contains([';', '=']) || name.starts_with(is_ows) || name.ends_with(is_ows) {
        assert!(got.is_none(), "name {name:?} matched");
    }

    if let Some(v) = got {
        // A slice of one header, inside one `;`-separated pair.
        let p = v.as_ptr() as usize;
        let header = headers
            .iter()
            .find(|h| {
                let start = h.as_ptr() as usize;
                p >= start && p + v.len() <= start + h.len()
            })
            .unwrap_or_else(|| panic!("{v:?} is not a slice of any header"));
        assert!(!v.contains(';'), "{v:?}");
        // Trimmed of whitespace, and of one pair of quotes at most.
        let offset = p - header.as_ptr() as usize;
        let before = &header[..offset];
        let after = &header[offset + v.len()..];
        let quoted = before.ends_with('"') && after.starts_with('"');
        if !quoted {
            assert!(!v.starts_with(is_ows) && !v.ends_with(is_ows), "{v:?}");
        }
        // The text before the value in its pair is `name=` (plus whitespace
        // and the opening quote).
        let pair_start = before.rfind(';').map_or(0, |i| i + 1);
        let lead = &before[pair_start..];
        let lead = if quoted {
            &lead[..lead.len() - 1]
        } else {
            lead
        };
        let key = lead
            .trim_end_matches(is_ows)
            .strip_suffix('=')
            .map(|k| k.trim_matches(is_ows));
        assert_eq!(key, Some(name), "{lead:?}");
    }
});
