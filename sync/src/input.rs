//! Offline input: `kubectl get ns,pods,svc -A -o yaml|json` output (a `List`
//! with `items`, a single object, or multi-document YAML), and the
//! `--settings` file.

use envlane::config::PluginConfig;
use k8s_openapi::api::core::v1 as corev1;
use serde_json::Value;

use crate::selector::LabelSelector;

use crate::model::{Namespace, Pod, Service, VirtualService};

#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub virtual_services: Vec<VirtualService>,
}

/// Refuses a snapshot `render` would turn into nothing without saying why:
/// no Kubernetes objects at all, no Namespace objects, or no namespace the
/// selector opts in.
pub fn check_snapshot(snap: &Snapshot, selector: &LabelSelector) -> Result<(), String> {
    let hint = "(want the output of `kubectl get ns,pods,svc,virtualservices -A -o yaml`)";
    if snap.namespaces.is_empty()
        && snap.pods.is_empty()
        && snap.services.is_empty()
        && snap.virtual_services.is_empty()
    {
        return Err(format!(
            "no Namespace, Pod, Service or VirtualService objects {hint}"
        ));
    }
    if snap.namespaces.is_empty() {
        return Err(format!(
            "no Namespace objects: only namespaces opted in by their labels are rendered {hint}"
        ));
    }
    if !snap
        .namespaces
        .iter()
        .any(|ns| !ns.terminating && selector.matches(&ns.labels))
    {
        return Err(format!(
            "none of the {} namespaces is opted in by --namespace-selector {selector}",
            snap.namespaces.len()
        ));
    }
    Ok(())
}

/// Parses a YAML or JSON document stream into values (JSON is parsed as
/// JSON, which is much faster for large inputs).
pub fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut out = Vec::new();
        for doc in serde_json::Deserializer::from_str(trimmed).into_iter::<Value>() {
            out.push(doc.map_err(|e| format!("invalid JSON: {e}"))?);
        }
        return Ok(out);
    }
    // The input is the user's own file, possibly a whole cluster: no size
    // budget. Spellings YAML 1.2 would read as numbers but `kubectl`-style
    // emitters leave plain (`0755`, `1_000`) stay strings.
    let mut options = serde_saphyr::Options::default();
    options.budget = None;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| format!("invalid YAML: {e}"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Reads Namespaces, Pods, Services and VirtualServices out of `kubectl get ... -o yaml|json`
/// output; other kinds are ignored.
pub fn read_snapshot(text: &str) -> Result<Snapshot, String> {
    let mut snap = Snapshot::default();
    let mut pending = parse_documents(text)?;
    pending.reverse();
    while let Some(doc) = pending.pop() {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        match kind {
            k if k == "List" || k.ends_with("List") => {
                if let Some(Value::Array(items)) = doc.get("items") {
                    // Keep the document order.
                    pending.extend(items.iter().rev().cloned());
                }
            }
            "Namespace" => {
                let ns: corev1::Namespace = from_value(doc, "Namespace")?;
                snap.namespaces.push(Namespace::from(&ns));
            }
            "Pod" => {
                let pod: corev1::Pod = from_value(doc, "Pod")?;
                snap.pods.push(Pod::from(&pod));
            }
            "Service" => {
                let svc: corev1::Service = from_value(doc, "Service")?;
                snap.services.push(Service::from(&svc));
            }
            "VirtualService" => {
                let text = |p: &str| doc.pointer(p).and_then(Value::as_str).unwrap_or_default();
                let spec = doc.get("spec").cloned().unwrap_or_default();
                snap.virtual_services.push(VirtualService::from_spec(
                    text("/metadata/namespace"),
                    text("/metadata/name"),
                    &spec,
                ));
            }
            _ => {}
        }
    }
    Ok(snap)
}

/// Label values and selectors are strings; a YAML scalar that was read as a
/// number or boolean (an unquoted `true`, `8080`) becomes its text again.
fn stringify_map(map: Option<&mut Value>) {
    if let Some(Value::Object(map)) = map {
        for v in map.values_mut() {
            match v {
                Value::Number(n) => *v = Value::String(n.to_string()),
                Value::Bool(b) => *v = Value::String(b.to_string()),
                Value::Null => *v = Value::String(String::new()),
                _ => {}
            }
        }
    }
}

fn from_value<T: serde::de::DeserializeOwned>(mut v: Value, kind: &str) -> Result<T, String> {
    stringify_map(v.pointer_mut("/metadata/labels"));
    stringify_map(v.pointer_mut("/spec/selector"));
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    serde_json::from_value(v).map_err(|e| format!("{kind} {name}: {e}"))
}

/// Parses a settings file (JSON or YAML): a PluginConfig without `envs` and
/// `services`. Errors name the bad field.
pub fn parse_settings(text: &str) -> Result<PluginConfig, String> {
    let docs = parse_documents(text)?;
    let value = match docs.as_slice() {
        [] => Value::Object(Default::default()),
        [one] => one.clone(),
        _ => return Err("settings: expected one document".into()),
    };
    if !value.is_object() {
        return Err("settings: expected a mapping".into());
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    let config = envlane::config::parse(&bytes).map_err(|e| e.to_string())?;
    if !config.envs.is_empty() || !config.services.is_empty() {
        return Err(
            "settings: `envs` and `services` are written by envlane-sync; leave them out".into(),
        );
    }
    Ok(config)
}

/// The strict check of a whole plugin config (JSON or YAML): what the filter
/// checks, plus unknown fields (the filter ignores them; this refuses them).
/// Returns a one-line summary.
pub fn validate_plugin_config(text: &str) -> Result<String, String> {
    let docs = parse_documents(text)?;
    let value = match docs.as_slice() {
        [one] if one.is_object() => one.clone(),
        [_] => return Err("expected a mapping".into()),
        _ => return Err("expected one document".into()),
    };
    let bytes = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    let config = envlane::config::parse(&bytes).map_err(|e| e.to_string())?;
    let table = envlane::table::RoutingTable::compile(&config, &Default::default())
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "valid: {} services, {} envs, {} (service, env) pairs, mode {:?}",
        table.service_count(),
        config.envs.len(),
        table.pair_count(),
        config.mode
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_json_yaml_and_errors() {
        let s = parse_settings(r#"{"defaultEnv":"dev"}"#).unwrap();
        assert_eq!(s.default_env.as_deref(), Some("dev"));
        let s = parse_settings("defaultEnv: main\nbaggageKey: lane\nmode: host\n").unwrap();
        assert_eq!(s.baggage_key.as_deref(), Some("lane"));
        assert_eq!(s.mode, envlane::config::Mode::Host);
        assert_eq!(parse_settings("").unwrap(), PluginConfig::default());
        let e = parse_settings("envHeadr: x\n").unwrap_err();
        assert!(e.contains("envHeadr"), "{e}");
        let e = parse_settings(r#"{"envs":[{"name":"dev"}]}"#).unwrap_err();
        assert!(e.contains("envs"), "{e}");
    }

    #[test]
    fn large_inputs_and_unquoted_label_values() {
        // More documents than serde-saphyr's default budget allows.
        let big = "---\nkind: Other\n".repeat(1100);
        assert!(read_snapshot(&big).unwrap().pods.is_empty());
        let yaml = "\
kind: Pod
metadata:
  name: p
  namespace: demo
  labels: {version: 2, canary: true, mode: 0755, size: 1_000}
";
        let snap = read_snapshot(yaml).unwrap();
        let labels = &snap.pods[0].labels;
        assert_eq!(labels["version"], "2");
        assert_eq!(labels["canary"], "true");
        assert_eq!(labels["mode"], "0755");
        assert_eq!(labels["size"], "1_000");
    }

    #[test]
    fn reads_lists_and_multi_doc_yaml() {
        let yaml = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: demo, labels: {envlane.io/enabled: \"true\"}}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: demo, labels: {app: a, virtual-env: dev}}
status:
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: demo}
spec:
  selector: {app: a}
  ports: [{port: 8080, targetPort: http}]
";
        let snap = read_snapshot(yaml).unwrap();
        assert_eq!(snap.namespaces.len(), 1);
        assert_eq!(
            snap.namespaces[0]
                .labels
                .get("envlane.io/enabled")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(snap.pods.len(), 1);
        assert!(snap.pods[0].ready);
        assert_eq!(snap.services[0].ports[0].port, 8080);
        assert_eq!(
            snap.services[0].ports[0].target_port,
            Some(Value::String("http".into()))
        );

        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Pod","metadata":{"name":"q","namespace":"demo",
             "deletionTimestamp":"2024-01-01T00:00:00Z"},
             "status":{"conditions":[{"type":"Ready","status":"True"}]}}]}"#;
        let snap = read_snapshot(json).unwrap();
        assert!(!snap.pods[0].ready, "terminating pods are not Ready");
    }
}
