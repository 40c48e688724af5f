//! Env names: `check_env`, `EnvName::try_new`, the fallback `Chain`, and the
//! names derived from an env (subsets, hosts).
//!
//! Input: byte 0 is the splitter candidate (`Splitter::try_new` on it; the
//! default `.` when refused), the rest is the env value.
#![no_main]

use envlane::names::{
    check_env, Chain, EnvError, EnvName, ServiceHost, Splitter, SubsetName, MAX_ENV_LEN,
    MAX_ENV_LEVELS,
};
use libfuzzer_sys::fuzz_target;

/// The rule as the docs state it, written over `split` rather than a byte
/// scan: levels split by the splitter, each a non-empty run of
/// `[A-Za-z0-9_-]`; the first problem from the left wins, the level count is
/// checked last.
fn reference(value: &str, splitter: u8) -> Result<usize, EnvError> {
    if value.is_empty() {
        return Err(EnvError::Empty);
    }
    if value.len() > MAX_ENV_LEN {
        return Err(EnvError::TooLong);
    }
    let mut levels = 0;
    for segment in value.as_bytes().split(|&b| b == splitter) {
        if segment.is_empty() {
            return Err(EnvError::EmptySegment);
        }
        if !segment
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(EnvError::BadCharacter);
        }
        levels += 1;
    }
    if levels > MAX_ENV_LEVELS {
        return Err(EnvError::TooManyLevels);
    }
    Ok(levels)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };

    // Splitter: exactly the printable ASCII non-alphanumerics.
    let candidate = String::from_utf8_lossy(&[first]).into_owned();
    let tried = Splitter::try_new(&candidate);
    let expected_ok = first.is_ascii_graphic() && !first.is_ascii_alphanumeric();
    assert_eq!(tried.is_ok(), expected_ok, "splitter {first:#04x}");
    if let Ok(s) = tried {
        assert_eq!(s.byte(), first);
    }
    let splitter = tried.unwrap_or_default();
    let sb = splitter.byte();

    // Non-UTF-8 input is still exercised (as U+FFFD, always a bad character).
    let value = String::from_utf8_lossy(rest);
    let value: &str = &value;

    let got = check_env(value, splitter);
    assert_eq!(
        got,
        reference(value, sb),
        "check_env({value:?}, {:?})",
        sb as char
    );

    let name = EnvName::try_new(value, splitter);
    assert_eq!(name.is_ok(), got.is_ok());

    match (got, name) {
        (Ok(levels), Ok(name)) => {
            assert_eq!(name.as_str(), value);
            assert_eq!(name.to_string(), value);
            assert!((1..=MAX_ENV_LEVELS).contains(&levels));
            assert!(value.len() <= MAX_ENV_LEN);
            assert_eq!(
                levels,
                1 + value.bytes().filter(|&b| b == sb).count(),
                "levels = splitters + 1"
            );

            // The chain: the value, then each prefix ending at a splitter,
            // most specific first; as many elements as levels, each one valid
            // with one level fewer than the one before.
            let chain: Vec<&str> = name.chain(splitter).collect();
            assert_eq!(chain.len(), levels, "{value:?}: {chain:?}");
            assert_eq!(chain.first().copied(), Some(value));
            for (i, level) in chain.iter().enumerate() {
                assert!(
                    value.starts_with(level),
                    "{level:?} not a prefix of {value:?}"
                );
                if i > 0 {
                    assert_eq!(value.as_bytes().get(level.len()), Some(&sb));
                }
                assert_eq!(check_env(level, splitter), Ok(levels - i));
            }
            for pair in chain.windows(2) {
                assert!(pair[1].len() < pair[0].len());
                assert_eq!(pair[0].as_bytes().get(pair[1].len()), Some(&sb));
            }
            let last = chain.last().copied().unwrap_or_default();
            assert!(!last.as_bytes().contains(&sb));
            // Chain::new on the same text agrees with EnvName::chain.
            assert!(Chain::new(value, splitter).eq(chain.iter().copied()));

            // The subset derived from any valid env is a valid subset name,
            // and an env that already is one keeps its name.
            let subset = SubsetName::for_env(&name);
            assert!(subset.as_str().len() <= 63, "{subset}");
            assert!(SubsetName::try_new(subset.as_str()).is_ok(), "{subset}");
            if SubsetName::try_new(value).is_ok() {
                assert_eq!(subset.as_str(), value);
            } else {
                assert_ne!(subset.as_str(), value);
            }
        }
        (Err(_), Err(_)) => {}
        (got, name) => panic!("check_env {got:?} but EnvName::try_new {name:?}"),
    }

    // Chain on text that never passed check_env: must not panic or loop, and
    // still yields only prefixes, each shorter than the one before.
    let mut prev_len = usize::MAX;
    for level in Chain::new(value, splitter).take(value.len() + 2) {
        assert!(value.starts_with(level));
        assert!(level.len() < prev_len);
        prev_len = level.len();
    }

    // Hashed subset names are valid for any text and any digit count.
    let digits = usize::from(first % 20);
    let hashed = SubsetName::hashed(value, digits);
    assert!(SubsetName::try_new(hashed.as_str()).is_ok(), "{hashed}");
    let clamped = digits.clamp(1, 16);
    let tail = hashed.as_str().rsplit('-').next().unwrap_or_default();
    assert_eq!(tail.len(), clamped, "{hashed}");
    assert!(tail.bytes().all(|b| b.is_ascii_hexdigit()));

    // Service hosts: accepted ones are lower-case DNS names.
    if let Ok(host) = ServiceHost::try_new(value) {
        assert_eq!(host.as_str(), value);
        assert!((1..=253).contains(&value.len()));
        assert!(value
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-')));
        assert!(value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
    }
});
