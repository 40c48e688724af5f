//! The filter's decision alone, natively: `decide::resolve` (the fallback walk)
//! and `decide::plan` (the whole per-request decision, reading headers from a
//! plain map as the Wasm glue reads them from the host) by table size and by
//! how many env levels are looked up.
//!
//! `cargo bench --bench resolve` (or `./build.sh bench`, which runs this too).
//! Tables are `services × envs` pairs: every service has the envs `dev` (the
//! default) and `dev.team0 .. dev.team{envs-2}`. A request with env
//! `dev.team3` finds its subset at level 1; `dev.team3.u1` at level 2 (one
//! fallback); `dev.team3.u1.x` at 3; `dev.team3.u1.x.y` at 4.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use envlane::config::{self as cfg, EnvEntry, PluginConfig, ServiceEntry};
use envlane::decide::{plan, resolve, Plan};
use envlane::table::{Node, RoutingTable};
use envlane::wire::HeaderMap;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{allocs_per_call, live, peak, reset_peak};

/// (label, services, envs per service)
const SIZES: &[(&str, usize, usize)] = &[("10", 1, 10), ("1k", 100, 10), ("100k", 10_000, 10)];

fn config(services: usize, envs: usize) -> PluginConfig {
    let mut env_list = vec![EnvEntry {
        name: "dev".into(),
        subset: Some("dev".into()),
    }];
    for t in 0..envs.saturating_sub(1) {
        env_list.push(EnvEntry {
            name: format!("dev.team{t}"),
            subset: Some(format!("dev-team{t}")),
        });
    }
    let ids: Vec<u32> = (0..env_list.len() as u32).collect();
    PluginConfig {
        default_env: Some("dev".into()),
        envs: env_list,
        services: (0..services)
            .map(|i| ServiceEntry {
                host: format!("svc{i}.demo.svc.cluster.local"),
                ports: vec![8080],
                envs: ids.clone(),
                target_ports: Vec::new(),
                endpoints: Default::default(),
            })
            .collect(),
        ..PluginConfig::default()
    }
}

/// Config sizes for the push figures: (label, services, envs per service).
const CONFIG_SIZES: &[(&str, usize, usize)] =
    &[("1k", 100, 10), ("10k", 1_000, 10), ("100k", 10_000, 10)];

fn node() -> Node {
    Node {
        namespace: Some("demo".into()),
        env_label: None,
    }
}

/// What `on_configure` does with the plugin configuration bytes.
fn load(json: &[u8]) -> Option<RoutingTable> {
    let parsed = cfg::parse(json).ok()?;
    RoutingTable::compile(&parsed, &node()).ok()
}

/// `CONFIG` lines: for the JSON an ECDS push carries, the parse and compile
/// time and the heap they need (peak while loading, kept by the table).
fn print_config_costs() {
    for &(label, services, envs) in CONFIG_SIZES {
        let Ok(json) = serde_json::to_vec(&config(services, envs)) else {
            return;
        };
        let base = reset_peak();
        let t0 = Instant::now();
        let Ok(parsed) = cfg::parse(&json) else {
            eprintln!("bench config does not parse");
            return;
        };
        let t1 = Instant::now();
        let parse_peak = peak() - base;
        let parsed_live = live() - base;
        let Ok(table) = RoutingTable::compile(&parsed, &node()) else {
            return;
        };
        let t2 = Instant::now();
        let peak = peak() - base;
        drop(parsed);
        let kept = live().saturating_sub(base);
        println!(
            "CONFIG pairs={label} json_bytes={} parse_ms={:.2} compile_ms={:.2} parse_peak_bytes={parse_peak} \
             parsed_config_bytes={parsed_live} peak_bytes={peak} table_bytes={kept}",
            json.len(),
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
        );
        drop(black_box(table));
    }
}

fn table(services: usize, envs: usize) -> Option<RoutingTable> {
    match RoutingTable::compile(&config(services, envs), &node()) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("bench table does not compile: {e}");
            None
        }
    }
}

/// The env value that is found after `depth` levels (1 = exact).
fn env_at_depth(depth: usize) -> String {
    let extra = ["u1", "x", "y"];
    let mut env = String::from("dev.team3");
    for level in extra.iter().take(depth.saturating_sub(1)) {
        env.push('.');
        env.push_str(level);
    }
    env
}

/// Request headers as Envoy hands them to the filter: one serialized map,
/// with the headers a sidecar typically sees.
fn headers_for(services: usize, depth: usize) -> Vec<u8> {
    let authority = format!("svc{}:8080", services / 2);
    let env = env_at_depth(depth);
    let pairs = [
        (":authority", authority.as_str()),
        (":path", "/api/items?page=2"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-virtual-env", env.as_str()),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "4f1c8a52-93d0-4c0e-9a57-0c3f7e2b9d11"),
    ];
    HeaderMap::encode(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
}

/// What the filter does per request: read the serialized map in place, plan.
fn plan_wire<'t>(t: &'t RoutingTable, wire: &[u8]) -> Option<Plan<'t>> {
    HeaderMap::parse(wire).map(|h| plan(t, &h))
}

/// `ALLOC` lines: allocations per `resolve` and per `plan` (header map
/// parsing included).
fn print_allocations() {
    for &(label, services, envs) in SIZES {
        let Some(t) = table(services, envs) else {
            return;
        };
        let authority = format!("svc{}:8080", services / 2);
        let Some(service) = t.service(&authority) else {
            return;
        };
        for depth in 1..=4 {
            let env = env_at_depth(depth);
            let r = allocs_per_call(1000, || {
                black_box(resolve(
                    black_box(&t),
                    black_box(Some(env.as_str())),
                    &service,
                ));
            });
            let h = headers_for(services, depth);
            let p = allocs_per_call(1000, || {
                black_box(plan_wire(black_box(&t), black_box(&h)));
            });
            println!("ALLOC pairs={label} depth={depth} resolve={r:.2} plan={p:.2}");
        }
    }
}

/// `ENVLANE_DRIVER=what:pairs:depth:n`: n calls and nothing else.
fn driver(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [what, pairs, depth, n] = parts.as_slice() else {
        eprintln!("ENVLANE_DRIVER=resolve|plan:10|1k|100k:DEPTH:N or config:1k|10k|100k:0:N");
        return;
    };
    if *what == "config" {
        let Some(&(_, services, envs)) = CONFIG_SIZES.iter().find(|s| s.0 == *pairs) else {
            eprintln!("unknown size {pairs}");
            return;
        };
        let Ok(json) = serde_json::to_vec(&config(services, envs)) else {
            return;
        };
        for _ in 0..n.parse::<u64>().unwrap_or(0) {
            black_box(load(black_box(&json)));
        }
        return;
    }
    let Some(&(_, services, envs)) = SIZES.iter().find(|s| s.0 == *pairs) else {
        eprintln!("unknown size {pairs}");
        return;
    };
    let (Ok(depth), Ok(n)) = (depth.parse::<usize>(), n.parse::<u64>()) else {
        eprintln!("bad depth or count in {spec}");
        return;
    };
    let Some(t) = table(services, envs) else {
        return;
    };
    let h = headers_for(services, depth);
    let env = env_at_depth(depth);
    let authority = format!("svc{}:8080", services / 2);
    let Some(service) = t.service(&authority) else {
        return;
    };
    for _ in 0..n {
        match *what {
            "resolve" => {
                black_box(resolve(
                    black_box(&t),
                    black_box(Some(env.as_str())),
                    &service,
                ));
            }
            _ => {
                black_box(plan_wire(black_box(&t), black_box(&h)));
            }
        }
    }
}

fn benches(c: &mut Criterion) {
    if let Ok(spec) = std::env::var("ENVLANE_DRIVER") {
        driver(&spec);
        std::process::exit(0);
    }
    print_allocations();
    print_config_costs();
    let mut g = c.benchmark_group("resolve");
    g.throughput(Throughput::Elements(1));
    for &(label, services, envs) in SIZES {
        let Some(t) = table(services, envs) else {
            return;
        };
        // The middle service: not the first one inserted.
        let authority = format!("svc{}:8080", services / 2);
        let Some(service) = t.service(&authority) else {
            eprintln!("{authority} is not in the table");
            return;
        };
        for depth in 1..=4 {
            let env = env_at_depth(depth);
            let r = resolve(&t, Some(&env), &service);
            if r.levels_tried != depth || r.target.is_none() {
                eprintln!("{env}: expected a match at level {depth}, got {r:?}");
                return;
            }
            g.bench_with_input(
                BenchmarkId::new(format!("pairs={label}"), format!("depth={depth}")),
                &env,
                |b, env| b.iter(|| resolve(black_box(&t), black_box(Some(env)), &service)),
            );
        }
    }
    g.finish();

    let mut g = c.benchmark_group("plan");
    g.throughput(Throughput::Elements(1));
    for &(label, services, envs) in SIZES {
        let Some(t) = table(services, envs) else {
            return;
        };
        for depth in 1..=4 {
            let headers = headers_for(services, depth);
            if plan_wire(&t, &headers)
                .and_then(|p| p.route_to_cluster)
                .is_none()
            {
                eprintln!("plan found no cluster at depth {depth}");
                return;
            }
            g.bench_with_input(
                BenchmarkId::new(format!("pairs={label}"), format!("depth={depth}")),
                &headers,
                |b, h| b.iter(|| plan_wire(black_box(&t), black_box(h))),
            );
        }
    }
    g.finish();
}

fn config_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("config");
    g.sample_size(10);
    for &(label, services, envs) in CONFIG_SIZES {
        let Ok(json) = serde_json::to_vec(&config(services, envs)) else {
            return;
        };
        g.bench_with_input(
            BenchmarkId::new("parse+compile", format!("pairs={label}")),
            &json,
            |b, json| b.iter(|| load(black_box(json))),
        );
    }
    g.finish();
}

criterion_group!(resolve_benches, benches, config_benches);
criterion_main!(resolve_benches);
