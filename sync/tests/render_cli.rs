//! `envlane-sync render` on the fixtures in testdata/: golden output,
//! determinism, and the objects checked against Istio's CRD schemas.
//! `UPDATE_GOLDEN=1 cargo nextest run -p envlane-sync` rewrites the golden files.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use envlane::config::PluginConfig;
use envlane::table::{Node, RoutingTable};
use serde_json::Value;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn render(fixture: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
        .arg("render")
        .arg("-f")
        .arg(testdata(&format!("{fixture}.yaml")))
        .arg("--settings")
        .arg(testdata(&format!("{fixture}.settings.json")))
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "render {fixture}: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap()
}

fn table_of(docs: &[Value]) -> PluginConfig {
    let wp = docs.iter().find(|d| d["kind"] == "WasmPlugin").unwrap();
    serde_json::from_value(wp["spec"]["pluginConfig"].clone()).unwrap()
}

/// `host: env,env` per service.
fn pairs(t: &PluginConfig) -> Vec<String> {
    t.services
        .iter()
        .map(|s| {
            let envs: Vec<&str> = s
                .envs
                .iter()
                .map(|&i| t.envs[i as usize].name.as_str())
                .collect();
            format!("{}: {}", s.host, envs.join(","))
        })
        .collect()
}

fn golden(fixture: &str, got: &str) {
    let path = testdata(&format!("{fixture}.expected.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        got,
        want,
        "{} differs (UPDATE_GOLDEN=1 to rewrite)",
        path.display()
    );
}

/// `Kind/name` of each rendered object, in output order.
fn kinds(docs: &[serde_json::Value]) -> Vec<String> {
    docs.iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn alibaba_fixture() {
    let (yaml, _) = render("alibaba", &[]);
    let d = docs(&yaml);
    let kinds = kinds(&d);
    assert_eq!(
        kinds,
        [
            "WasmPlugin/envlane",
            "DestinationRule/envlane-go",
            "DestinationRule/envlane-java",
            "DestinationRule/envlane-node",
            "EnvoyFilter/envlane-routes.demo.go",
            "EnvoyFilter/envlane-routes.demo.java",
            "EnvoyFilter/envlane-routes.demo.node",
        ]
    );
    let t = table_of(&d);
    assert_eq!(t.default_env.as_deref(), Some("dev"));
    assert_eq!(
        pairs(&t),
        [
            "go.demo.svc.cluster.local: dev,dev.proj2",
            "java.demo.svc.cluster.local: dev,dev.proj1,dev.proj1.feature1",
            "node.demo.svc.cluster.local: dev,dev.proj1",
        ]
    );
    assert!(
        !yaml.contains("dev.proj3"),
        "the un-Ready pod's env is not written"
    );
    assert!(t.envs.iter().all(|e| e.subset.is_some()));
    RoutingTable::compile(&t, &Node::default()).unwrap();
    assert!(t.services.iter().all(|s| s.ports == [8080]));
    golden("alibaba", &yaml);
}

#[test]
fn endpoint_fixture() {
    let (yaml, _) = render("endpoint", &[]);
    let d = docs(&yaml);
    let kinds = kinds(&d);
    // No DestinationRule: one EnvoyFilter per Service with its clusters.
    assert_eq!(
        kinds,
        [
            "WasmPlugin/envlane",
            "EnvoyFilter/envlane-routes.demo.go",
            "EnvoyFilter/envlane-routes.demo.java",
            "EnvoyFilter/envlane-routes.demo.node",
        ]
    );
    let t = table_of(&d);
    assert_eq!(
        pairs(&t),
        [
            "go.demo.svc.cluster.local: dev,dev.proj2",
            "java.demo.svc.cluster.local: dev,dev.proj1,dev.proj1.feature1",
            "node.demo.svc.cluster.local: dev,dev.proj1",
        ]
    );
    let java = &t.services[1];
    assert_eq!(
        (java.ports.clone(), java.target_ports.clone()),
        (vec![8080, 9090], vec![9080, 9091])
    );
    assert_eq!(java.endpoints.len(), 3);
    assert!(java.endpoints.iter().all(|ips| ips.count() == 1));
    let table = RoutingTable::compile(&t, &Node::default()).unwrap();
    // Each EnvoyFilter: the ports' ORIGINAL_DST clusters, then the route patches mapping them.
    for ef in d.iter().filter(|o| o["kind"] == "EnvoyFilter") {
        let patches = ef["spec"]["configPatches"].as_array().unwrap();
        let clusters: Vec<&str> = patches
            .iter()
            .filter(|p| p["applyTo"] == "CLUSTER")
            .map(|p| p["patch"]["value"]["name"].as_str().unwrap())
            .collect();
        let svc = ef["metadata"]["name"]
            .as_str()
            .unwrap()
            .rsplit('.')
            .next()
            .unwrap();
        let fqdn = format!("{svc}.demo.svc.cluster.local");
        let want: Vec<String> = table
            .cluster_targets()
            .iter()
            .filter(|t| t.fqdn == fqdn)
            .flat_map(|t| t.targets.iter().map(|s| s.to_string()))
            .collect();
        assert_eq!(clusters, want, "{svc}");
        let sans = &patches[0]["patch"]["value"]["transport_socket"]["typed_config"]
            ["common_tls_context"]["combined_validation_context"]["default_validation_context"]
            ["match_typed_subject_alt_names"];
        let app = if svc == "java" { "springboot" } else { svc };
        assert_eq!(
            sans[0]["matcher"]["exact"],
            format!("spiffe://cluster.local/ns/demo/sa/{app}")
        );
    }
    golden("endpoint", &yaml);
}

#[test]
fn swimlane_fixture() {
    let (yaml, _) = render("swimlane", &[]);
    let t = table_of(&docs(&yaml));
    assert_eq!(t.default_env.as_deref(), Some("main"));
    assert_eq!(t.baggage_key.as_deref(), Some("lane"));
    assert_eq!(
        pairs(&t),
        [
            "goods.demo.svc.cluster.local: dev-feature1,dev-feature2,main",
            "pricing.demo.svc.cluster.local: dev-feature1,main",
        ]
    );
    let subsets: Vec<&str> = t
        .envs
        .iter()
        .map(|e| e.subset.as_deref().unwrap())
        .collect();
    assert_eq!(
        subsets,
        ["dev-feature1", "dev-feature2", "main"],
        "DNS labels keep their names"
    );
    golden("swimlane", &yaml);
}

#[test]
fn output_is_deterministic_and_stats_go_to_stderr() {
    let (a, _) = render("alibaba", &[]);
    let (b, stderr) = render("alibaba", &["--stats"]);
    assert_eq!(a, b);
    assert!(
        stderr.contains("render:") && stderr.contains(" ms "),
        "{stderr}"
    );
}

#[test]
fn json_input_gives_the_same_output() {
    let yaml_in = std::fs::read_to_string(testdata("alibaba.yaml")).unwrap();
    let value: Value = serde_saphyr::from_str(&yaml_in).unwrap();
    let dir = std::env::temp_dir().join(format!("envlane-sync-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("alibaba.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
        .args(["render", "--settings"])
        .arg(testdata("alibaba.settings.json"))
        .arg("-f")
        .arg(&json_path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success());
    let (yaml, _) = render("alibaba", &[]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), yaml);
}

#[test]
fn host_mode_on_the_fixture() {
    let dir = std::env::temp_dir().join(format!("envlane-sync-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let settings = dir.join("settings.yaml");
    std::fs::write(&settings, "defaultEnv: dev\nmode: host\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
        .args(["render", "-f"])
        .arg(testdata("alibaba.yaml"))
        .arg("--settings")
        .arg(&settings)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = docs(&String::from_utf8(out.stdout).unwrap());
    let services: Vec<&Value> = d.iter().filter(|o| o["kind"] == "Service").collect();
    assert_eq!(services.len(), 7);
    assert!(d.iter().all(|o| o["kind"] != "DestinationRule"));
    let t = table_of(&d);
    for s in &services {
        let name = s["metadata"]["name"].as_str().unwrap();
        let env = s["spec"]["selector"]["virtual-env"].as_str().unwrap();
        let subset = t
            .envs
            .iter()
            .find(|e| e.name == env)
            .unwrap()
            .subset
            .clone()
            .unwrap();
        assert!(name.ends_with(&format!("-{subset}")), "{name} {subset}");
        assert_eq!(s["spec"]["ports"][0]["port"], 8080);
    }
}

#[test]
fn bad_input_fails_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
        .args(["render", "-f", "/nonexistent/x.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.yaml"));
}

/// Issue 15: `render` printed nothing and exited 0 for input it could make
/// nothing of, printed each error twice, with colour codes into a pipe.
#[test]
fn render_refuses_input_it_can_make_nothing_of_in_one_plain_line() {
    let ns = |labels: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels: {{{labels}}}\n")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not Kubernetes",
            "hello: world\n".into(),
            "no Namespace, Pod, Service or VirtualService objects",
        ),
        (
            "no namespaces",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: a\n".into(),
            "no Namespace objects",
        ),
        (
            "none opted in",
            ns(""),
            "none of the 1 namespaces is opted in by --namespace-selector envlane.io/enabled=true",
        ),
        (
            "bad YAML on line 2",
            "apiVersion: v1\nkind: [x\n".into(),
            "line 2",
        ),
    ];
    for (what, input, says) in cases {
        let mut child = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
            .args(["render", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit 0");
        assert!(out.stdout.is_empty(), "{what}: wrote objects");
        assert!(err.contains(says), "{what}: {err}");
        assert_eq!(
            err.matches("envlane-sync:").count(),
            1,
            "{what}: printed more than once: {err}"
        );
        assert!(
            !err.contains('\u{1b}'),
            "{what}: colour codes into a pipe: {err:?}"
        );
    }
    // An opted-in namespace renders (exit 0) even with nothing in it.
    let out = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
        .args(["render", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            std::io::Write::write_all(
                &mut c.stdin.take().unwrap(),
                ns("envlane.io/enabled: 'true'").as_bytes(),
            )?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `validate` is strict where the filter is forgiving: unknown fields and
/// every limit are errors that name the field.
#[test]
fn validate_is_strict_and_names_the_field() {
    let dir = std::env::temp_dir().join(format!("envlane-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports = vec!["8080"; 8000].join(",");
    let cases: Vec<(&str, String, bool, &str)> = vec![
        (
            "good.json",
            r#"{"defaultEnv":"dev","envs":[{"name":"dev"}],"services":[{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0]}]}"#.into(),
            true,
            "valid: 1 services, 1 envs, 1 (service, env) pairs",
        ),
        ("good.yaml", "mode: host\nenvs: []\n".into(), true, "valid: 0 services"),
        ("unknown.json", r#"{"envs":[{"name":"dev","weight":1}]}"#.into(), false, "field `envs[0].weight`: unknown field"),
        (
            "ports.json",
            format!(r#"{{"envs":[{{"name":"dev"}}],"services":[{{"host":"a","ports":[{ports}],"envs":[0]}}]}}"#),
            false,
            "more than 64 ports (limit)",
        ),
        ("index.json", r#"{"services":[{"host":"a","ports":[80],"envs":[3]}]}"#.into(), false, "field `services[0].envs[0]`"),
        ("list.json", "[1]".into(), false, "expected a mapping"),
    ];
    for (name, text, ok, says) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
            .args(["validate", path.to_str().unwrap()])
            .output()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.success(), ok, "{name}: {printed}");
        assert!(printed.contains(says), "{name}: {printed}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--settings",
        "--env-label",
        "--namespace-selector",
        "--wasm-plugin-name",
        "--wasm-url",
        "--wasm-sha256",
        "--listen",
        "--debounce",
        "--resync",
        "--max-backoff",
        "--log-level",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

/// Finds `kind`'s `version` schema in Istio's CRDs (../shared/istio, when present).
fn crd_spec_schema(kind: &str, version: &str) -> Option<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio/crds.gen.yaml");
    let text = std::fs::read_to_string(path).ok()?;
    let crds: Vec<Value> = serde_saphyr::from_multiple(&text).ok()?;
    let crd = crds.iter().find(|c| c["spec"]["names"]["kind"] == kind)?;
    let v = crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == version)?;
    Some(v["schema"]["openAPIV3Schema"]["properties"]["spec"].clone())
}

/// A small structural check: every field is in the schema, enums hold.
fn check(value: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{path}: {value} not in {allowed:?}"));
        }
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let sub = if schema["properties"].is_object() {
                    &schema["properties"][k]
                } else {
                    &schema["additionalProperties"]
                };
                if sub.is_null() {
                    errors.push(format!("{path}.{k}: not in the schema"));
                } else {
                    check(v, sub, &format!("{path}.{k}"), errors);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check(v, &schema["items"], &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

#[test]
fn objects_fit_istio_crd_schemas() {
    let Some(wasm) = crd_spec_schema("WasmPlugin", "v1alpha1") else {
        eprintln!("../shared/istio/crds.gen.yaml not found: schema check skipped");
        return;
    };
    let dr = crd_spec_schema("DestinationRule", "v1").unwrap();
    let ef = crd_spec_schema("EnvoyFilter", "v1alpha3").unwrap();
    let (yaml, _) = render("alibaba", &["--wasm-sha256", &"0".repeat(64)]);
    let mut errors = Vec::new();
    let mut checked = BTreeSet::new();
    for doc in docs(&yaml) {
        let schema = match doc["kind"].as_str() {
            Some("WasmPlugin") => &wasm,
            Some("DestinationRule") => &dr,
            Some("EnvoyFilter") => &ef,
            _ => continue,
        };
        checked.insert(doc["kind"].as_str().unwrap_or_default().to_string());
        check(&doc["spec"], schema, "spec", &mut errors);
    }
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(checked.len(), 3, "{checked:?}");
}
