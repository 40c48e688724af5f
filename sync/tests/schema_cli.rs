//! `envlane-sync schema` and `envlane-sync settings`.
//!
//! The schema is a valid draft 2020-12 schema; it accepts every config and
//! settings file shipped, and on each sample below it says what the filter's
//! own checks say (strict parse + `RoutingTable::compile`): the samples only
//! break rules a schema can express. No Python: the `jsonschema` crate.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use envlane::config::{PluginConfig, SCHEMA_ID, SCHEMA_TITLE};
use envlane::limits::{MAX_ALIASES, MAX_PORTS_PER_SERVICE};
use envlane::names::{MAX_ENV_LEN, MAX_ENV_LEVELS};
use envlane::table::{Node, RoutingTable};
use serde_json::{json, Value};

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_envlane-sync"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn schema() -> Value {
    let out = run(&["schema"], None);
    assert!(out.ok, "schema: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).unwrap()
}

/// What the filter (and `envlane-sync validate`) says of a config.
fn filter_check(doc: &Value) -> Result<(), String> {
    let config =
        envlane::config::parse(&serde_json::to_vec(doc).unwrap()).map_err(|e| e.to_string())?;
    RoutingTable::compile(&config, &Node::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn schema_errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc).map(|e| e.to_string()).collect()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn json_files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

fn service(ports: Value, envs: Value) -> Value {
    json!({"host": "go.demo.svc.cluster.local", "ports": ports, "envs": envs})
}

#[test]
fn schema_is_draft_2020_12_from_the_rust_types() {
    let s = schema();
    jsonschema::draft202012::meta::validate(&s).unwrap();
    assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert_eq!(s["title"], SCHEMA_TITLE);
    assert_eq!(s["$id"], SCHEMA_ID);
    assert_eq!(s, envlane::config::json_schema());
    assert_eq!(s["additionalProperties"], false);
    for (name, def) in s["$defs"].as_object().unwrap() {
        if def["type"] == "object" {
            assert_eq!(def["additionalProperties"], false, "{name}");
        }
    }
    // The defaults in the schema are the filter's: a config stating one is
    // the empty config. Every field that is not an Option states one.
    let mut stated = 0;
    for (field, prop) in s["properties"].as_object().unwrap() {
        if let Some(default) = prop.get("default") {
            let doc = serde_json::to_vec(&json!({ field: default })).unwrap();
            let config = envlane::config::parse(&doc).unwrap();
            assert_eq!(config, PluginConfig::default(), "{field}");
            stated += 1;
        }
    }
    assert!(stated >= 12, "{stated} defaults");
    // Stable text: two runs print the same bytes, keys sorted.
    let out = run(&["schema"], None).stdout;
    assert_eq!(out, run(&["schema"], None).stdout);
    assert!(out.ends_with("}\n") && out.starts_with("{\n  \"$defs\""));
}

#[test]
fn schema_accepts_every_shipped_config_and_settings_file() {
    let v = validator();
    let configs = json_files("integration/configs", ".json");
    let settings = json_files("sync/testdata", ".settings.json");
    assert!(
        configs.len() >= 2 && settings.len() >= 2,
        "{configs:?} {settings:?}"
    );
    for path in configs.iter().chain(&settings) {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            schema_errors(&v, &doc),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
        filter_check(&doc).unwrap();
    }
}

#[test]
fn schema_and_filter_agree_on_good_configs() {
    let v = validator();
    let max_levels = ["a"; MAX_ENV_LEVELS].join(".");
    let longest_env = "e".repeat(MAX_ENV_LEN);
    let longest_host = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(longest_host.len(), 253);
    let all_ports: Vec<u16> = (1..=MAX_PORTS_PER_SERVICE as u16).collect();
    let good = [
        json!({}),
        json!({"mode": "host", "hostTemplate": "{name}-{subset}.{namespace}.svc.{clusterDomain}"}),
        json!({"hostTemplate": "{subset}"}),
        json!({"envAliases": [{"header": "x-lane"}, {"cookie": "lane"}, {"header": "x-b", "cookie": null}]}),
        json!({"envAliases": vec![json!({"header": "x-lane"}); MAX_ALIASES]}),
        json!({"defaultEnv": max_levels, "envs": [{"name": "A_b-1.c"}, {"name": longest_env}]}),
        json!({"splitter": "-", "envs": [{"name": "dev-proj1"}]}),
        json!({"splitter": "/", "defaultEnv": "dev/proj1"}),
        json!({"baggageKey": null, "defaultEnv": null, "revision": null, "envs": [{"name": "dev", "subset": null}]}),
        json!({"baggageKey": "lane", "envHeader": "X-Lane", "debugHeader": "x-why", "debug": true}),
        json!({"edge": true, "autoInject": false, "envLabel": "example.com/lane", "clusterDomain": "corp.internal"}),
        json!({"envs": [{"name": "dev", "subset": "a".repeat(63)}], "services": [service(json!([1, 65535]), json!([0]))]}),
        json!({"services": [service(json!(all_ports), json!([]))]}),
        json!({"services": [{"host": longest_host, "ports": [80], "envs": []}]}),
    ];
    for doc in &good {
        assert_eq!(
            schema_errors(&v, doc),
            Vec::<String>::new(),
            "schema refuses {doc}"
        );
        filter_check(doc).unwrap_or_else(|e| panic!("filter refuses {doc}: {e}"));
    }
}

#[test]
fn schema_and_filter_refuse_bad_configs() {
    let v = validator();
    let too_deep = ["a"; MAX_ENV_LEVELS + 1].join(".");
    let too_many_ports: Vec<u16> = (1..=MAX_PORTS_PER_SERVICE as u16 + 1).collect();
    let bad = [
        ("unknown field at the top", json!({"envheader": "x"})),
        ("snake_case field", json!({"env_header": "x"})),
        ("removed field", json!({"routeHeader": "x-envlane-cluster"})),
        (
            "unknown field in an env",
            json!({"envs": [{"name": "dev", "color": "red"}]}),
        ),
        (
            "unknown field in a service",
            json!({"services": [{"host": "a.b", "ports": [80], "envs": [], "weight": 1}]}),
        ),
        (
            "unknown field in an alias",
            json!({"envAliases": [{"header": "x-a", "query": "a"}]}),
        ),
        ("header name with a space", json!({"envHeader": "x env"})),
        ("empty header name", json!({"envHeader": ""})),
        ("pseudo-header", json!({"debugHeader": ":authority"})),
        (
            "alias header not a token",
            json!({"envAliases": [{"header": "x/lane"}]}),
        ),
        ("baggage key not a token", json!({"baggageKey": "la ne"})),
        (
            "port 0",
            json!({"services": [service(json!([0]), json!([]))]}),
        ),
        (
            "port 65536",
            json!({"services": [service(json!([65536]), json!([]))]}),
        ),
        (
            "no ports",
            json!({"services": [service(json!([]), json!([]))]}),
        ),
        (
            "ports over the limit",
            json!({"services": [service(json!(too_many_ports), json!([]))]}),
        ),
        (
            "ports missing",
            json!({"services": [{"host": "a.b", "envs": []}]}),
        ),
        (
            "negative env index",
            json!({"services": [service(json!([80]), json!([-1]))]}),
        ),
        (
            "upper-case host",
            json!({"services": [{"host": "Go.demo", "ports": [80], "envs": []}]}),
        ),
        (
            "host over 253",
            json!({"services": [{"host": format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62)), "ports": [80], "envs": []}]}),
        ),
        (
            "aliases over the limit",
            json!({"envAliases": vec![json!({"header": "x-lane"}); MAX_ALIASES + 1]}),
        ),
        (
            "alias with both",
            json!({"envAliases": [{"header": "x-a", "cookie": "a"}]}),
        ),
        ("alias with none", json!({"envAliases": [{}]})),
        ("cookie with =", json!({"envAliases": [{"cookie": "a=b"}]})),
        ("letter splitter", json!({"splitter": "a"})),
        ("two-char splitter", json!({"splitter": "::"})),
        ("bad mode", json!({"mode": "header"})),
        ("env with a slash", json!({"envs": [{"name": "dev/proj"}]})),
        ("empty level", json!({"envs": [{"name": "dev..x"}]})),
        ("too many levels", json!({"defaultEnv": too_deep})),
        (
            "env too long",
            json!({"envs": [{"name": "e".repeat(MAX_ENV_LEN + 1)}]}),
        ),
        ("empty env", json!({"envs": [{"name": ""}]})),
        (
            "subset not a DNS label",
            json!({"envs": [{"name": "dev", "subset": "Dev_1"}]}),
        ),
        (
            "subset over 63",
            json!({"envs": [{"name": "dev", "subset": "a".repeat(64)}]}),
        ),
        (
            "template without subset",
            json!({"hostTemplate": "{name}.{namespace}.svc"}),
        ),
        (
            "unknown placeholder",
            json!({"hostTemplate": "{name}-{subset}.{ns}"}),
        ),
        ("autoInject as a string", json!({"autoInject": "true"})),
        (
            "bad cluster domain",
            json!({"clusterDomain": "Cluster.Local"}),
        ),
        ("empty env label", json!({"envLabel": ""})),
        ("env label over 317", json!({"envLabel": "l".repeat(318)})),
    ];
    for (what, doc) in &bad {
        assert!(!v.is_valid(doc), "schema accepts {what}: {doc}");
        assert!(filter_check(doc).is_err(), "filter accepts {what}: {doc}");
    }
    // Not an object: refused by the schema and by `validate` (serde alone
    // would read `[]` as a struct of defaults).
    for doc in [json!([]), json!("x"), json!(null)] {
        assert!(!v.is_valid(&doc), "schema accepts {doc}");
    }
}

#[test]
fn settings_prints_the_defaults_without_the_table() {
    let out = run(&["settings"], None);
    assert!(out.ok, "{}", out.stderr);
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    for table in ["envs", "services", "revision"] {
        assert!(doc.get(table).is_none(), "{table}: {}", out.stdout);
    }
    assert_eq!(
        envlane::config::parse(out.stdout.as_bytes()).unwrap(),
        PluginConfig::default()
    );
    assert!(validator().is_valid(&doc));
}

#[test]
fn settings_reads_overrides_strictly() {
    let out = run(
        &["settings", "--settings", "-"],
        Some("mode: host\ndefaultEnv: dev\n"),
    );
    assert!(out.ok, "{}", out.stderr);
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["mode"], "host");
    assert_eq!(doc["defaultEnv"], "dev");
    assert_eq!(doc["envHeader"], envlane::config::DEFAULT_ENV_HEADER);
    let file = repo("sync/testdata/swimlane.settings.json");
    let out = run(&["settings", "--settings", file.to_str().unwrap()], None);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap()["baggageKey"],
        "lane"
    );

    for (input, names) in [
        (r#"{"envHeadr": "x"}"#, "envHeadr"),
        (r#"{"splitter": "ab"}"#, "splitter"),
        (r#"{"envs": [{"name": "dev"}]}"#, "envs"),
    ] {
        let out = run(&["settings", "--settings", "-"], Some(input));
        assert!(!out.ok, "accepted {input}");
        assert!(out.stdout.is_empty());
        assert!(out.stderr.contains(names), "{input}: {}", out.stderr);
    }
}

#[test]
fn help_names_the_commands() {
    let out = run(&["--help"], None);
    assert!(out.ok);
    for command in ["schema", "settings"] {
        assert!(
            out.stdout.contains(&format!("\n  {command} ")),
            "{}",
            out.stdout
        );
        let help = run(&[command, "--help"], None);
        assert!(
            help.ok && help.stdout.contains("Usage: envlane-sync"),
            "{}",
            help.stderr
        );
    }
    assert!(!run(&["schema", "extra"], None).ok);
}
