//! Equality-based label selectors (`a=b,c!=d,e,!f`), as `kubectl -l` writes
//! them: used for `--namespace-selector`.

use std::fmt;

use crate::model::Labels;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A parsed selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
    text: String,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(key(k)?, value(v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(key(k)?, value(v)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(key(k)?)
            } else {
                Requirement::Exists(key(part)?)
            };
            requirements.push(req);
        }
        Ok(Self {
            requirements,
            text: text.trim().to_string(),
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

impl LabelSelector {
    /// The selector as a CEL expression over `labels` (a map that may be
    /// absent: `has_labels` says whether it is there).
    pub fn to_cel(&self, has_labels: &str, labels: &str) -> String {
        // Keys and values are checked to hold no quote or backslash.
        let quote = |s: &str| format!("'{s}'");
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!(
                    "({has_labels} && {k} in {labels} && {labels}[{k}] == {v})",
                    k = quote(k),
                    v = quote(v)
                ),
                Requirement::NotEquals(k, v) => format!(
                    "!({has_labels} && {k} in {labels} && {labels}[{k}] == {v})",
                    k = quote(k),
                    v = quote(v)
                ),
                Requirement::Exists(k) => format!("({has_labels} && {} in {labels})", quote(k)),
                Requirement::NotExists(k) => format!("!({has_labels} && {} in {labels})", quote(k)),
            })
            .collect();
        if parts.is_empty() {
            "true".into()
        } else {
            parts.join(" && ")
        }
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.len() <= 317
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!(
            "`{k}` is not a label key (only `k=v`, `k!=v`, `k`, `!k` are supported)"
        ))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("`{v}` is not a label value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_table() {
        let on = labels(&[("envlane.io/enabled", "true"), ("team", "a")]);
        let off = labels(&[("envlane.io/enabled", "false")]);
        let none = labels(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("envlane.io/enabled=true", [true, false, false]),
            ("envlane.io/enabled==true", [true, false, false]),
            ("envlane.io/enabled!=true", [false, true, true]),
            ("envlane.io/enabled", [true, true, false]),
            ("!envlane.io/enabled", [false, false, true]),
            ("envlane.io/enabled=true, team=a", [true, false, false]),
            ("", [true, true, true]),
        ];
        for (text, want) in cases {
            let s = LabelSelector::parse(text).unwrap();
            let got = [s.matches(&on), s.matches(&off), s.matches(&none)];
            assert_eq!(&got, want, "{text}");
        }
    }

    #[test]
    fn set_based_syntax_is_refused() {
        assert!(LabelSelector::parse("env in (a,b)").is_err());
        assert!(LabelSelector::parse("a=b c").is_err());
    }
}
