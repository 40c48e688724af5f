//! Small validated names: an environment, a service host, a splitter.
//! Each has a `try_new` and is valid from then on, so the rest of the code
//! never re-checks them.

use std::fmt;

/// Longest env value accepted, in bytes (header, baggage, label or table).
pub const MAX_ENV_LEN: usize = 128;
/// Most levels an env may have (`a.b.c` has 3).
pub const MAX_ENV_LEVELS: usize = 8;

/// The character that separates env levels (`.` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splitter(u8);

impl Splitter {
    /// A splitter is one printable ASCII character that is not a letter or a digit.
    pub fn try_new(s: &str) -> Result<Self, String> {
        match s.as_bytes() {
            [b] if b.is_ascii_graphic() && !b.is_ascii_alphanumeric() => Ok(Self(*b)),
            _ => Err(format!(
                "must be one printable ASCII character that is not a letter or digit, got `{s}`"
            )),
        }
    }

    pub fn byte(self) -> u8 {
        self.0
    }
}

impl Default for Splitter {
    fn default() -> Self {
        Self(b'.')
    }
}

/// Why an env value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvError {
    Empty,
    TooLong,
    TooManyLevels,
    EmptySegment,
    BadCharacter,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty",
            Self::TooLong => "longer than 128 bytes",
            Self::TooManyLevels => "more than 8 levels",
            Self::EmptySegment => "has an empty level",
            Self::BadCharacter => "has a character outside [A-Za-z0-9_-]",
        })
    }
}

/// Checks an env value: levels split by `splitter`, each a non-empty run of
/// `[A-Za-z0-9_-]` (minus the splitter itself), at most 128 bytes and 8 levels.
/// Returns the number of levels.
pub fn check_env(value: &str, splitter: Splitter) -> Result<usize, EnvError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(EnvError::Empty);
    }
    if bytes.len() > MAX_ENV_LEN {
        return Err(EnvError::TooLong);
    }
    let mut levels = 1;
    let mut segment_len = 0;
    for &b in bytes {
        if b == splitter.byte() {
            if segment_len == 0 {
                return Err(EnvError::EmptySegment);
            }
            levels += 1;
            segment_len = 0;
        } else if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            segment_len += 1;
        } else {
            return Err(EnvError::BadCharacter);
        }
    }
    if segment_len == 0 {
        return Err(EnvError::EmptySegment);
    }
    if levels > MAX_ENV_LEVELS {
        return Err(EnvError::TooManyLevels);
    }
    Ok(levels)
}

/// A valid environment name such as `dev.proj1.user1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvName(Box<str>);

impl EnvName {
    pub fn try_new(value: &str, splitter: Splitter) -> Result<Self, EnvError> {
        check_env(value, splitter)?;
        Ok(Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Itself, then each shorter prefix that ends at a splitter: the fallback
    /// chain from most to least specific (`a.b.c`, `a.b`, `a`).
    pub fn chain(&self, splitter: Splitter) -> Chain<'_> {
        Chain::new(&self.0, splitter)
    }
}

impl fmt::Display for EnvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Iterator over an env's levels, most specific first. Whole levels only:
/// `dev.proj-abc` yields `dev.proj-abc`, `dev`; never `dev.proj-ab`.
#[derive(Debug, Clone)]
pub struct Chain<'a> {
    rest: Option<&'a str>,
    splitter: u8,
}

impl<'a> Chain<'a> {
    /// `value` must already have passed [`check_env`].
    pub fn new(value: &'a str, splitter: Splitter) -> Self {
        Self {
            rest: (!value.is_empty()).then_some(value),
            splitter: splitter.byte(),
        }
    }
}

impl<'a> Iterator for Chain<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let current = self.rest?;
        self.rest = current
            .as_bytes()
            .iter()
            .rposition(|&b| b == self.splitter)
            .and_then(|cut| current.get(..cut));
        Some(current)
    }
}

/// A DNS host name as used in `:authority` and Service FQDNs: lower-case
/// labels of `[a-z0-9-]`, split by dots, at most 253 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceHost(Box<str>);

impl ServiceHost {
    pub fn try_new(value: &str) -> Result<Self, String> {
        if value.is_empty() || value.len() > 253 {
            return Err(format!("host `{value}` must be 1 to 253 bytes"));
        }
        for label in value.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!(
                    "host `{value}` must be lower-case DNS labels of [a-z0-9-]"
                ));
            }
        }
        Ok(Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DestinationRule subset name: a DNS-1123 label (`[a-z0-9-]`, at most 63
/// bytes, alphanumeric at both ends), which is what Istio accepts there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubsetName(Box<str>);

impl SubsetName {
    pub fn try_new(value: &str) -> Result<Self, String> {
        let b = value.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric);
        if ok {
            Ok(Self(value.into()))
        } else {
            Err(format!(
                "subset `{value}` must be a DNS-1123 label: [a-z0-9-], at most 63, alphanumeric ends"
            ))
        }
    }

    /// The subset name envlane uses for an env when the table names none.
    ///
    /// An env that already is a DNS-1123 label keeps its name (`dev`,
    /// `dev-feature1`). Any other (upper case, `.` or `_`, too long) is
    /// lower-cased, `.`/`_` become `-`, and a hash of the exact original name
    /// is appended, so `dev.proj1` and `dev_proj1` get different subsets.
    /// The hash suffix is 10 hex digits (40 bits) of FNV-1a.
    pub fn for_env(env: &EnvName) -> Self {
        match Self::try_new(env.as_str()) {
            Ok(same) => same,
            Err(_) => Self::hashed(env.as_str(), 10),
        }
    }

    /// `env` lower-cased, with every other character as `-`, cut to fit, then
    /// `-` and `hex_digits` (1 to 16) hex digits of the FNV-1a hash of `env`.
    /// Always a valid subset name. `envlane-sync` uses a longer hash when
    /// two envs still share a name.
    pub fn hashed(env: &str, hex_digits: usize) -> Self {
        let digits = hex_digits.clamp(1, 16);
        let mut base: String = env
            .chars()
            .map(|c| match c {
                'A'..='Z' => c.to_ascii_lowercase(),
                'a'..='z' | '0'..='9' => c,
                _ => '-',
            })
            .collect();
        base.truncate(62 - digits);
        let base = base.trim_matches('-');
        let hash = format!("{:016x}", fnv1a64(env.as_bytes()));
        let hash = hash.get(16 - digits..).unwrap_or(&hash);
        let name = if base.is_empty() {
            format!("env-{hash}")
        } else {
            format!("{base}-{hash}")
        };
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubsetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// FNV-1a, 64 bit: stable across builds and platforms (subset names depend on it).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot() -> Splitter {
        Splitter::default()
    }

    #[test]
    fn env_validation_table() {
        let long = "a".repeat(129);
        let max = "a".repeat(128);
        let cases: &[(&str, Result<usize, EnvError>)] = &[
            ("dev", Ok(1)),
            ("dev.proj1.user1", Ok(3)),
            ("Dev_x-1.P2", Ok(2)),
            ("", Err(EnvError::Empty)),
            (".dev", Err(EnvError::EmptySegment)),
            ("dev.", Err(EnvError::EmptySegment)),
            ("dev..x", Err(EnvError::EmptySegment)),
            ("dev proj", Err(EnvError::BadCharacter)),
            ("dev/proj", Err(EnvError::BadCharacter)),
            ("dév", Err(EnvError::BadCharacter)),
            ("a.b.c.d.e.f.g.h", Ok(8)),
            ("a.b.c.d.e.f.g.h.i", Err(EnvError::TooManyLevels)),
            (long.as_str(), Err(EnvError::TooLong)),
            (max.as_str(), Ok(1)),
        ];
        for (value, want) in cases {
            assert_eq!(check_env(value, dot()), *want, "`{value}`");
        }
    }

    #[test]
    fn custom_splitter_makes_dot_invalid_and_dash_a_level() {
        let dash = Splitter::try_new("-").unwrap();
        assert_eq!(check_env("dev-proj1", dash), Ok(2));
        assert_eq!(check_env("dev.proj1", dash), Err(EnvError::BadCharacter));
        let chain: Vec<_> = Chain::new("a-b-c", dash).collect();
        assert_eq!(chain, ["a-b-c", "a-b", "a"]);
    }

    #[test]
    fn splitter_rules() {
        for ok in [".", "-", "/", "_", "~"] {
            assert!(Splitter::try_new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ab", "a", "1", " ", "é"] {
            assert!(Splitter::try_new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_is_whole_levels_most_specific_first() {
        let cases: &[(&str, &[&str])] = &[
            ("dev", &["dev"]),
            ("dev.proj1.user1", &["dev.proj1.user1", "dev.proj1", "dev"]),
            ("dev.proj-abc", &["dev.proj-abc", "dev"]),
            ("dev-feature10", &["dev-feature10"]),
        ];
        for (env, want) in cases {
            let env = EnvName::try_new(env, dot()).unwrap();
            let got: Vec<_> = env.chain(dot()).collect();
            assert_eq!(&got, want);
        }
    }

    #[test]
    fn host_validation() {
        for ok in ["go", "go.demo.svc.cluster.local", "a-b.c1"] {
            assert!(ServiceHost::try_new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Go",
            "go..x",
            "-go",
            "go-",
            "go_x",
            "go:80",
            &"a".repeat(64),
        ] {
            assert!(ServiceHost::try_new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn subset_names_are_dns_labels_and_do_not_collide() {
        let names = [
            "dev",
            "dev.proj1",
            "dev_proj1",
            "dev-proj1",
            "Dev.Proj1",
            "dev.proj1.feature1",
            "_",
            "main",
            "dev-feature1",
        ];
        let subsets: Vec<_> = names
            .iter()
            .map(|n| SubsetName::for_env(&EnvName::try_new(n, dot()).unwrap()))
            .collect();
        for s in &subsets {
            assert!(SubsetName::try_new(s.as_str()).is_ok(), "{s}");
        }
        let mut unique: Vec<_> = subsets.iter().map(SubsetName::as_str).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{subsets:?}");
        assert_eq!(subsets[0].as_str(), "dev");
        assert_eq!(subsets[8].as_str(), "dev-feature1");
        assert!(subsets[1].as_str().starts_with("dev-proj1-"));
        // Long lossy names are cut, and still differ by their hash.
        let long_a = ["Level_Number_A"; 8].join(".");
        let long_b = ["Level_Number_B"; 8].join(".");
        let a = SubsetName::for_env(&EnvName::try_new(&long_a, dot()).unwrap());
        let b = SubsetName::for_env(&EnvName::try_new(&long_b, dot()).unwrap());
        assert!(
            a.as_str().len() <= 63 && SubsetName::try_new(a.as_str()).is_ok(),
            "{a}"
        );
        assert_ne!(a, b);
        let max = SubsetName::for_env(&EnvName::try_new(&"x".repeat(128), dot()).unwrap());
        assert!(max.as_str().len() <= 63, "{max}");
    }
}
