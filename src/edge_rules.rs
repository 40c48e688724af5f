//! Env assignment at the edge: the ingress gateway's rules that give a
//! request entering the mesh its env (a header or cookie value in a list, a
//! stable percentage of values, or a per-env preview host). Compiled once
//! per config; evaluated on the request as it arrived, before edge hygiene
//! removes what outsiders must not set. Pure.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use crate::config::{ConfigError, EdgeRule, PREVIEW_ENV_PLACEHOLDER};
use crate::decide::Headers;
use crate::names::{check_env, fnv1a64, EnvName, Splitter};
use crate::sources::cookie_value;
use crate::table::{header_name, FxHasher};

/// Buckets of the percentage hash: a rule's `percent` is kept to hundredths.
pub const PERCENT_BUCKETS: u64 = 10_000;

/// The bucket (0..[`PERCENT_BUCKETS`]) of a value: FNV-1a 64 of its bytes,
/// modulo the bucket count. Stable across builds and platforms, so a user
/// stays in or out of a percentage rule as long as the rule is unchanged.
pub fn percent_bucket(value: &[u8]) -> u64 {
    fnv1a64(value) % PERCENT_BUCKETS
}

#[derive(Debug)]
enum Input {
    Header(Box<str>),
    Cookie(Box<str>),
}

#[derive(Debug)]
enum Test {
    Values(HashSet<Box<[u8]>, BuildHasherDefault<FxHasher>>),
    /// Buckets below this match.
    Share(u64),
}

#[derive(Debug)]
enum Rule {
    Value {
        input: Input,
        test: Test,
        env: EnvName,
    },
    /// `prefix{env}suffix`, lower-case.
    Preview { prefix: Box<str>, suffix: Box<str> },
}

/// The compiled rules, in order.
#[derive(Debug, Default)]
pub struct EdgeRules {
    rules: Box<[Rule]>,
}

/// The env a rule gave, and which rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub env: String,
    /// Index into `edgeRules`.
    pub rule: usize,
}

impl EdgeRules {
    pub fn compile(rules: &[EdgeRule], splitter: Splitter) -> Result<Self, ConfigError> {
        let compiled = rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile_rule(i, r, splitter))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rules: compiled.into(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The first rule that matches the request, and the env it gives.
    pub fn assign(&self, headers: &impl Headers, splitter: Splitter) -> Option<Assigned> {
        self.rules.iter().enumerate().find_map(|(i, rule)| {
            rule.env_for(headers, splitter)
                .map(|env| Assigned { env, rule: i })
        })
    }
}

impl Rule {
    fn env_for(&self, headers: &impl Headers, splitter: Splitter) -> Option<String> {
        match self {
            Rule::Value { input, test, env } => {
                let value: &[u8] = match input {
                    Input::Header(name) => headers.values(name).next()?,
                    Input::Cookie(name) => cookie_value(
                        headers
                            .values("cookie")
                            .filter_map(|v| std::str::from_utf8(v).ok()),
                        name,
                    )?
                    .as_bytes(),
                };
                let hit = match test {
                    Test::Values(set) => set.contains(value),
                    Test::Share(below) => percent_bucket(value) < *below,
                };
                hit.then(|| env.as_str().to_string())
            }
            Rule::Preview { prefix, suffix } => {
                let authority = headers.values(":authority").next()?;
                let authority = std::str::from_utf8(authority).ok()?;
                let host = crate::table::split_authority(authority)?.0;
                let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
                let env = host.strip_prefix(&**prefix)?.strip_suffix(&**suffix)?;
                check_env(env, splitter).ok()?;
                Some(env.to_string())
            }
        }
    }
}

fn compile_rule(i: usize, r: &EdgeRule, splitter: Splitter) -> Result<Rule, ConfigError> {
    let field = |f: &str| format!("edgeRules[{i}]{f}");
    if let Some(template) = &r.preview_host {
        if r.header.is_some()
            || r.cookie.is_some()
            || r.env.is_some()
            || !r.values.is_empty()
            || r.percent.is_some()
        {
            return Err(ConfigError::new(
                field(""),
                "a `previewHost` rule takes its env from the host: no `env`, `header`, `cookie`, `values` or `percent`",
            ));
        }
        return preview(template, &field(".previewHost"));
    }
    let input = match (&r.header, &r.cookie) {
        (Some(h), None) => Input::Header(header_name(&field(".header"), h)?),
        (None, Some(c)) if !c.is_empty() && !c.contains([';', '=', ' ', ',']) => {
            Input::Cookie(c.as_str().into())
        }
        (None, Some(c)) => {
            return Err(ConfigError::new(
                field(".cookie"),
                format!("`{c}` is not a cookie name"),
            ))
        }
        _ => {
            return Err(ConfigError::new(
                field(""),
                "set exactly one of `header`, `cookie` and `previewHost`",
            ))
        }
    };
    let env = match &r.env {
        Some(e) => EnvName::try_new(e, splitter)
            .map_err(|err| ConfigError::new(field(".env"), format!("`{e}` {err}")))?,
        None => return Err(ConfigError::new(field(".env"), "is required")),
    };
    let test = match (r.values.is_empty(), r.percent) {
        (false, None) => Test::Values(
            r.values
                .iter()
                .map(|v| v.as_bytes().into())
                .collect::<HashSet<_, _>>(),
        ),
        (true, Some(p)) if (0.0..=100.0).contains(&p) => {
            // Hundredths of a percent: the bucket count.
            Test::Share((p * 100.0).round() as u64)
        }
        (true, Some(p)) => {
            return Err(ConfigError::new(
                field(".percent"),
                format!("{p} is not between 0 and 100"),
            ))
        }
        _ => {
            return Err(ConfigError::new(
                field(""),
                "set exactly one of `values` (a non-empty list) and `percent`",
            ))
        }
    };
    Ok(Rule::Value { input, test, env })
}

fn preview(template: &str, field: &str) -> Result<Rule, ConfigError> {
    let lower = template.to_ascii_lowercase();
    let (prefix, suffix) = lower
        .split_once(PREVIEW_ENV_PLACEHOLDER)
        .filter(|(p, s)| !(p.contains('{') || s.contains('{') || (p.is_empty() && s.is_empty())))
        .ok_or_else(|| {
            ConfigError::new(
                field,
                format!("`{template}` must hold `{PREVIEW_ENV_PLACEHOLDER}` once, with more text"),
            )
        })?;
    let host_text = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !host_text(prefix) || !host_text(suffix) {
        return Err(ConfigError::new(
            field,
            format!("`{template}` is not a host name around `{PREVIEW_ENV_PLACEHOLDER}`"),
        ));
    }
    Ok(Rule::Preview {
        prefix: prefix.into(),
        suffix: suffix.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::HeaderMap;

    fn rule(json: &str) -> EdgeRule {
        serde_json::from_str(json).unwrap()
    }

    fn rules(json: &[&str]) -> EdgeRules {
        let r: Vec<EdgeRule> = json.iter().map(|j| rule(j)).collect();
        EdgeRules::compile(&r, Splitter::default()).unwrap()
    }

    fn assign(rules: &EdgeRules, headers: &[(&str, &str)]) -> Option<(String, usize)> {
        let wire = HeaderMap::encode(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        let map = HeaderMap::parse(&wire).unwrap();
        rules
            .assign(&map, Splitter::default())
            .map(|a| (a.env, a.rule))
    }

    /// The value with bucket `b`, found by search (for exact boundaries).
    fn value_in_bucket(pred: impl Fn(u64) -> bool) -> String {
        (0..100_000)
            .map(|i| format!("user-{i}"))
            .find(|v| pred(percent_bucket(v.as_bytes())))
            .unwrap()
    }

    #[test]
    fn first_matching_rule_wins() {
        let low = value_in_bucket(|b| b < 1000);
        let high = value_in_bucket(|b| b >= 1000);
        let r = rules(&[
            r#"{"env":"dev.proj1","header":"x-user","values":["alice","bob"]}"#,
            r#"{"env":"dev.proj2","cookie":"uid","values":["carol"]}"#,
            r#"{"env":"canary","header":"x-user","percent":10}"#,
            r#"{"previewHost":"{env}.preview.example.com"}"#,
        ]);
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<(&'a str, usize)>);
        let cases: &[Case] = &[
            (&[("x-user", "alice")], Some(("dev.proj1", 0))),
            (
                &[("x-user", "bob"), ("cookie", "uid=carol")],
                Some(("dev.proj1", 0)),
            ),
            (&[("cookie", "a=1; uid=carol")], Some(("dev.proj2", 1))),
            (&[("cookie", "uid=dave")], None),
            (&[("x-user", &low)], Some(("canary", 2))),
            (&[("x-user", &high)], None),
            (
                &[(":authority", "dev.proj1.preview.example.com")],
                Some(("dev.proj1", 3)),
            ),
            (
                &[(":authority", "Dev.Proj1.Preview.Example.com:443")],
                Some(("dev.proj1", 3)),
            ),
            (
                &[(":authority", "dev.proj1.preview.example.com.")],
                Some(("dev.proj1", 3)),
            ),
            (&[(":authority", "preview.example.com")], None),
            (&[(":authority", "a..b.preview.example.com")], None),
            (&[(":authority", "x.example.com")], None),
            // A listed value beats the host.
            (
                &[
                    ("x-user", "alice"),
                    (":authority", "qa.preview.example.com"),
                ],
                Some(("dev.proj1", 0)),
            ),
            (&[], None),
        ];
        for (headers, want) in cases {
            let got = assign(&r, headers);
            let want = want.map(|(e, i)| (e.to_string(), i));
            assert_eq!(got, want, "{headers:?}");
        }
    }

    #[test]
    fn percent_is_stable_and_close_to_its_share() {
        let r = rules(&[r#"{"env":"canary","header":"x-user","percent":12.5}"#]);
        let hits = (0..20_000)
            .filter(|i| assign(&r, &[("x-user", &format!("user-{i}"))]).is_some())
            .count();
        // 12.5% of 20,000 = 2,500; FNV spreads these well within 10%.
        assert!((2250..=2750).contains(&hits), "{hits}");
        // The same value always gets the same answer; 0 and 100 are exact.
        let a = assign(&r, &[("x-user", "user-7")]);
        assert_eq!(a, assign(&r, &[("x-user", "user-7")]));
        let none = rules(&[r#"{"env":"canary","header":"x-user","percent":0}"#]);
        let all = rules(&[r#"{"env":"canary","header":"x-user","percent":100}"#]);
        for i in 0..500 {
            let h = [("x-user", format!("u{i}"))];
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(assign(&none, &h), None);
            assert!(assign(&all, &h).is_some());
        }
    }

    #[test]
    fn bad_rules_are_refused_with_their_field() {
        for (json, field) in [
            (r#"{"env":"dev","values":["a"]}"#, "edgeRules[0]"),
            (
                r#"{"env":"dev","header":"x","cookie":"y","values":["a"]}"#,
                "edgeRules[0]",
            ),
            (
                r#"{"env":"dev","header":"x:y","values":["a"]}"#,
                "edgeRules[0].header",
            ),
            (
                r#"{"env":"dev","cookie":"a=b","values":["a"]}"#,
                "edgeRules[0].cookie",
            ),
            (r#"{"header":"x","values":["a"]}"#, "edgeRules[0].env"),
            (
                r#"{"env":"dev..x","header":"x","values":["a"]}"#,
                "edgeRules[0].env",
            ),
            (r#"{"env":"dev","header":"x"}"#, "edgeRules[0]"),
            (
                r#"{"env":"dev","header":"x","values":["a"],"percent":5}"#,
                "edgeRules[0]",
            ),
            (
                r#"{"env":"dev","header":"x","percent":101}"#,
                "edgeRules[0].percent",
            ),
            (
                r#"{"env":"dev","header":"x","percent":-1}"#,
                "edgeRules[0].percent",
            ),
            (
                r#"{"previewHost":"preview.example.com"}"#,
                "edgeRules[0].previewHost",
            ),
            (
                r#"{"previewHost":"{env}.{env}.example.com"}"#,
                "edgeRules[0].previewHost",
            ),
            (r#"{"previewHost":"{env}"}"#, "edgeRules[0].previewHost"),
            (
                r#"{"previewHost":"{env}.ex ample.com"}"#,
                "edgeRules[0].previewHost",
            ),
            (
                r#"{"previewHost":"{env}.p.com","env":"dev"}"#,
                "edgeRules[0]",
            ),
        ] {
            let err = EdgeRules::compile(&[rule(json)], Splitter::default()).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }
}
