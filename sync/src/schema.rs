//! `envlane-sync schema` and `envlane-sync settings`: the plugin config's
//! JSON Schema and the filter settings, both made from the filter's own types
//! (`envlane::config`). scripts/gen_manifests.py writes the manifests from
//! this output, so no name or rule of the config is kept twice.

use envlane::config::PluginConfig;
use serde_json::Value;

/// The JSON Schema (draft 2020-12) of the plugin config, pretty-printed.
pub fn schema_json() -> Result<String, String> {
    pretty(envlane::config::json_schema())
}

/// The settings in `text` (a `--settings` file: JSON or YAML, no table), or
/// the defaults; checked as envlane-sync checks `--settings`.
pub fn settings(text: Option<&str>) -> Result<PluginConfig, String> {
    let mut settings = match text {
        Some(text) => crate::input::parse_settings(text)?,
        None => PluginConfig::default(),
    };
    settings.revision = None;
    envlane::table::RoutingTable::compile(&settings, &envlane::table::Node::default())
        .map_err(|e| format!("settings: {e}"))?;
    Ok(settings)
}

/// `settings` as a `--settings` file: the config without what envlane-sync
/// writes itself (the table and its revision), pretty-printed.
pub fn settings_json(settings: &PluginConfig) -> Result<String, String> {
    let mut value = serde_json::to_value(settings).map_err(|e| e.to_string())?;
    if let Value::Object(map) = &mut value {
        for table_field in ["envs", "services", "revision"] {
            map.remove(table_field);
        }
    }
    pretty(value)
}

/// Two-space indent, keys sorted (whatever serde_json's features), one final
/// newline: the bytes depend only on the value.
fn pretty(value: Value) -> Result<String, String> {
    let mut text = serde_json::to_string_pretty(&sorted(value)).map_err(|e| e.to_string())?;
    text.push('\n');
    Ok(text)
}

fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_settings_have_no_table_and_read_back() {
        let text = settings_json(&settings(None).unwrap()).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        for key in ["envs", "services", "revision"] {
            assert!(value.get(key).is_none(), "{key} in {text}");
        }
        assert_eq!(settings(Some(&text)).unwrap(), PluginConfig::default());
    }

    #[test]
    fn settings_overrides_are_checked() {
        let host = settings(Some(r#"{"mode":"host"}"#)).unwrap();
        assert_eq!(host.mode, envlane::config::Mode::Host);
        assert!(settings(Some(r#"{"mode":"hots"}"#)).is_err());
        assert!(settings(Some(r#"{"envHeadr":"x"}"#)).is_err());
        assert!(settings(Some(r#"{"splitter":"ab"}"#)).is_err());
        let revised = settings(Some(r#"{"revision":"r1"}"#)).unwrap();
        assert_eq!(revised.revision, None);
    }

    #[test]
    fn keys_are_sorted_at_every_depth() {
        let text =
            pretty(serde_json::json!({"b": {"d": 1, "c": 2}, "a": [{"f": 1, "e": 2}]})).unwrap();
        assert_eq!(
            text.split_whitespace().collect::<String>(),
            r#"{"a":[{"e":2,"f":1}],"b":{"c":2,"d":1}}"#
        );
        assert!(text.ends_with("}\n"));
    }
}
