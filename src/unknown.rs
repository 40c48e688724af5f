//! Fields of a plugin config that this build does not know. The filter
//! ignores them (a newer companion may add one during an upgrade, as Envoy
//! ignores unknown xDS fields); `envlane-sync validate` refuses them.
//!
//! The known names come from the serde derives themselves (the field list
//! serde passes to `deserialize_struct`), so they cannot drift from the
//! schema. The scan is one pass over the bytes, without building a JSON tree.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use serde::de::{self, Deserialize, Deserializer, Visitor};

use crate::config::{
    CallerEntry, CallerWorkloadEntry, EdgeRule, EnvAlias, EnvEntry, PluginConfig, ServiceEntry,
};

/// At most this many unknown fields are reported.
pub const MAX_REPORTED: usize = 16;

/// The paths (`services[2].weight`) of the fields in `json` that the config
/// types do not have, in document order, at most [`MAX_REPORTED`]. Input that
/// is not a JSON object yields what was found before the scan stopped.
pub fn unknown_fields(json: &[u8]) -> Vec<String> {
    let mut scan = Scan {
        bytes: json,
        at: 0,
        found: Vec::new(),
    };
    scan.skip_ws();
    if scan.peek() == Some(b'{') {
        scan.object(Shape::Config, &mut Vec::new());
    }
    scan.found
}

/// Which config type an object is.
#[derive(Clone, Copy)]
enum Shape {
    Config,
    Alias,
    Env,
    Service,
    Caller,
    CallerWorkload,
    EdgeRule,
}

impl Shape {
    fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Config => fields_of::<PluginConfig>(),
            Self::Alias => fields_of::<EnvAlias>(),
            Self::Env => fields_of::<EnvEntry>(),
            Self::Service => fields_of::<ServiceEntry>(),
            Self::Caller => fields_of::<CallerEntry>(),
            Self::CallerWorkload => fields_of::<CallerWorkloadEntry>(),
            Self::EdgeRule => fields_of::<EdgeRule>(),
        }
    }

    /// The shape of the objects in the list held by `key`, if it is one.
    fn list_of(self, key: &str) -> Option<Shape> {
        match (self, key) {
            (Self::Config, "envAliases") => Some(Self::Alias),
            (Self::Config, "envs") => Some(Self::Env),
            (Self::Config, "services") => Some(Self::Service),
            (Self::Config, "callers") => Some(Self::Caller),
            (Self::Config, "callerWorkloads") => Some(Self::CallerWorkload),
            (Self::Config, "edgeRules") => Some(Self::EdgeRule),
            _ => None,
        }
    }
}

/// The serialized field names of a derived struct: what serde hands to
/// `deserialize_struct`, caught by a deserializer that reads nothing else.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    match T::deserialize(FieldCatcher) {
        Err(Caught(Some(fields))) => fields,
        _ => &[],
    }
}

struct FieldCatcher;

#[derive(Debug)]
struct Caught(Option<&'static [&'static str]>);

impl fmt::Display for Caught {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field list")
    }
}

impl std::error::Error for Caught {}

impl de::Error for Caught {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Caught(None)
    }
}

impl<'de> Deserializer<'de> for FieldCatcher {
    type Error = Caught;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Caught> {
        Err(Caught(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Caught> {
        Err(Caught(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Appends `.key` (or `key` at the top), or `["key"]` (JSON-quoted) when the
/// key is empty or not a plain name, so every path names its field.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&serde_json::to_string(key).unwrap_or_else(|_| "\"?\"".into()));
        path.push(']');
    }
}

/// One step of the path to a value; rendered only for a reported field.
enum Step<'a> {
    Key(Cow<'a, str>),
    Index(usize),
}

fn render(path: &[Step<'_>]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(key) => push_key(&mut out, key),
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
    found: Vec<String>,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// At `{`: checks each key against `shape`, descends into known lists.
    /// Returns false when the input ends or is malformed.
    fn object(&mut self, shape: Shape, path: &mut Vec<Step<'a>>) -> bool {
        self.at += 1;
        let known = shape.fields();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'}') => {
                    self.at += 1;
                    return true;
                }
                Some(b',') => {
                    self.at += 1;
                    continue;
                }
                Some(b'"') => {}
                _ => return false,
            }
            let Some(key) = self.string() else {
                return false;
            };
            self.skip_ws();
            if self.peek() != Some(b':') {
                return false;
            }
            self.at += 1;
            self.skip_ws();
            let ok = if !known.contains(&key.as_ref()) {
                if self.found.len() < MAX_REPORTED {
                    path.push(Step::Key(key));
                    self.found.push(render(path));
                    path.pop();
                }
                self.skip_value()
            } else {
                match shape.list_of(&key) {
                    Some(item) if self.peek() == Some(b'[') => {
                        path.push(Step::Key(key));
                        let ok = self.list(item, path);
                        path.pop();
                        ok
                    }
                    _ => self.skip_value(),
                }
            };
            if !ok {
                return false;
            }
        }
    }

    /// At `[`: each object element is checked as `shape`.
    fn list(&mut self, shape: Shape, path: &mut Vec<Step<'a>>) -> bool {
        self.at += 1;
        let mut index = 0usize;
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b']') => {
                    self.at += 1;
                    return true;
                }
                Some(b',') => {
                    self.at += 1;
                    index += 1;
                    continue;
                }
                Some(b'{') => {
                    path.push(Step::Index(index));
                    let ok = self.object(shape, path);
                    path.pop();
                    if !ok {
                        return false;
                    }
                }
                Some(_) => {
                    if !self.skip_value() {
                        return false;
                    }
                }
                None => return false,
            }
        }
    }

    /// At `"`: the decoded string (escapes included), after its closing quote.
    /// Borrowed from the input unless it has escapes (no allocation per key).
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.at;
        self.at += 1;
        let mut escaped = false;
        loop {
            let b = self.peek()?;
            self.at += 1;
            match b {
                b'\\' => {
                    escaped = true;
                    self.at += 1;
                }
                b'"' => break,
                _ => {}
            }
        }
        let bytes: &'a [u8] = self.bytes;
        let raw = bytes.get(start..self.at)?;
        if escaped {
            serde_json::from_slice::<String>(raw).ok().map(Cow::Owned)
        } else {
            std::str::from_utf8(raw.get(1..raw.len().checked_sub(1)?)?)
                .ok()
                .map(Cow::Borrowed)
        }
    }

    /// Skips one value of any kind; nested containers without recursion.
    fn skip_value(&mut self) -> bool {
        self.skip_ws();
        match self.peek() {
            None => false,
            Some(b'"') => self.string().is_some(),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                loop {
                    match self.peek() {
                        None => return false,
                        Some(b'"') => {
                            if self.string().is_none() {
                                return false;
                            }
                        }
                        Some(b'{' | b'[') => {
                            depth += 1;
                            self.at += 1;
                        }
                        Some(b'}' | b']') => {
                            depth = depth.saturating_sub(1);
                            self.at += 1;
                            if depth == 0 {
                                return true;
                            }
                        }
                        Some(_) => self.at += 1,
                    }
                }
            }
            Some(_) => {
                // A number or a literal: up to the next delimiter.
                while matches!(self.peek(), Some(c) if !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    self.at += 1;
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn field_lists_come_from_the_derives() {
        assert!(Shape::Config.fields().contains(&"envHeader"));
        assert!(Shape::Config.fields().contains(&"services"));
        assert_eq!(Shape::Alias.fields(), ["header", "cookie"]);
        assert_eq!(Shape::Env.fields(), ["name", "subset"]);
        assert_eq!(
            Shape::Service.fields(),
            ["host", "ports", "envs", "targetPorts", "endpoints"]
        );
        assert_eq!(Shape::Caller.fields(), ["env", "ips"]);
        assert_eq!(
            Shape::CallerWorkload.fields(),
            ["env", "namespace", "workloads"]
        );
        assert!(Shape::EdgeRule.fields().contains(&"previewHost"));
    }

    #[test]
    fn unknown_fields_table() {
        let cases: &[(&str, &[&str])] = &[
            ("{}", &[]),
            (r#"{"envHeader":"x","mode":"host"}"#, &[]),
            (
                r#"{"newThing":{"a":[1,{"b":2}]},"mode":"host"}"#,
                &["newThing"],
            ),
            (
                r#"{"envs":[{"name":"a","color":"red"},{"name":"b"}],"zz":1}"#,
                &["envs[0].color", "zz"],
            ),
            (
                r#"{"services":[{"host":"a","ports":[80],"envs":[0]},{"host":"b","weight":3,"ports":[1],"envs":[]}]}"#,
                &["services[1].weight"],
            ),
            (
                r#"{"callers":[{"env":0,"ips":[],"zone":"a"}],"edgeRules":[{"previewHost":"{env}.x","weight":1}],"callerWorkloads":[{"env":0,"namespace":"a","workloads":[],"x":1}]}"#,
                &[
                    "callers[0].zone",
                    "edgeRules[0].weight",
                    "callerWorkloads[0].x",
                ],
            ),
            (
                r#"{"envAliases":[{"header":"x"},{"headr":"y"}]}"#,
                &["envAliases[1].headr"],
            ),
            (r#"{"env\u0048eader":"x","a\"b":true}"#, &[r#"["a\"b"]"#]),
            // Found by fuzzing: an empty key must still name a field.
            (r#"{"":""}"#, &[r#"[""]"#]),
            (r#"{"envs":[{"name":"a","":1}]}"#, &[r#"envs[0][""]"#]),
            (r#"{"a.b":1}"#, &[r#"["a.b"]"#]),
            (
                " {\n \"x\" : -1.5e3 , \"y\":null,\"z\":\"}\"}",
                &["x", "y", "z"],
            ),
            ("[1,2]", &[]),
            ("{\"a\":", &["a"]),
            ("", &[]),
        ];
        for (json, want) in cases {
            assert_eq!(unknown_fields(json.as_bytes()), *want, "{json}");
        }
    }

    #[test]
    fn reports_at_most_the_limit() {
        let json: String = format!(
            "{{{}}}",
            (0..40)
                .map(|i| format!("\"f{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(unknown_fields(json.as_bytes()).len(), MAX_REPORTED);
    }
}
