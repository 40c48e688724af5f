//! Reading an env out of header values: W3C baggage and cookies. Pure
//! string functions; the caller decides which headers to feed in.

use std::borrow::Cow;

/// Optional whitespace, as HTTP and W3C baggage define it.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// The value of `key` in W3C `baggage` header values (several headers are one
/// comma-separated list). Members look like `key = value ; prop ; k=v`: the
/// properties are ignored, whitespace around parts is dropped and the value
/// is percent-decoded. The first member with the key wins. A member whose
/// value does not decode to UTF-8 is skipped.
pub fn baggage_value<'a, I>(headers: I, key: &str) -> Option<Cow<'a, str>>
where
    I: IntoIterator<Item = &'a str>,
{
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .find_map(|member| {
            let kv = member.split(';').next().unwrap_or("");
            let (k, v) = kv.split_once('=')?;
            if trim_ows(k) != key {
                return None;
            }
            percent_decode(trim_ows(v))
        })
}

/// Decodes `%XX` escapes; `None` for a broken escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = hex(bytes.next()?)?;
            let lo = hex(bytes.next()?)?;
            out.push(hi << 4 | lo);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The value of cookie `name` in `cookie` header values (`a=1; b=2`), with
/// RFC 6265's optional double quotes removed.
pub fn cookie_value<'a, I>(headers: I, name: &str) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    headers
        .into_iter()
        .flat_map(|h| h.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            if trim_ows(k) != name {
                return None;
            }
            let v = trim_ows(v);
            Some(
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_table() {
        let cases: &[(&[&str], &str, Option<&str>)] = &[
            (&["lane=dev-feature1"], "lane", Some("dev-feature1")),
            (&["a=1,lane=x"], "lane", Some("x")),
            (&["a=1 , lane = x ; ttl=3 ; p"], "lane", Some("x")),
            (&["\tlane\t=\tx\t"], "lane", Some("x")),
            (
                &["a=1", "lane=second-header"],
                "lane",
                Some("second-header"),
            ),
            (&["lane=first", "lane=second"], "lane", Some("first")),
            (&["lane=dev%2Eproj1"], "lane", Some("dev.proj1")),
            (&["lane=dev%2eproj1"], "lane", Some("dev.proj1")),
            (&["lane=%ZZ,lane=ok"], "lane", Some("ok")),
            (&["lane=%E2%82%AC"], "lane", Some("€")),
            (&["lane=%FF"], "lane", None),
            (&["mylane=x"], "lane", None),
            (&["Lane=x"], "lane", None),
            (&["lane"], "lane", None),
            (&["lane="], "lane", Some("")),
            (&[""], "lane", None),
            (&[], "lane", None),
            (&["k=v;lane=x"], "lane", None),
        ];
        for (headers, key, want) in cases {
            let got = baggage_value(headers.iter().copied(), key);
            assert_eq!(got.as_deref(), *want, "{headers:?}");
        }
    }

    #[test]
    fn cookie_table() {
        let cases: &[(&[&str], &str, Option<&str>)] = &[
            (&["VirtualEnv=dev.proj2"], "VirtualEnv", Some("dev.proj2")),
            (&["a=1; VirtualEnv=dev; b=2"], "VirtualEnv", Some("dev")),
            (&["a=1;VirtualEnv=\"dev\""], "VirtualEnv", Some("dev")),
            (&["a=1", "VirtualEnv=x"], "VirtualEnv", Some("x")),
            (&["virtualenv=x"], "VirtualEnv", None),
            (&["XVirtualEnv=x"], "VirtualEnv", None),
            (&["VirtualEnv"], "VirtualEnv", None),
            (&["t=a=b; VirtualEnv=x=y"], "VirtualEnv", Some("x=y")),
        ];
        for (headers, name, want) in cases {
            assert_eq!(
                cookie_value(headers.iter().copied(), name),
                *want,
                "{headers:?}"
            );
        }
    }
}
