//! Gateway mode's caller table, natively: what a shared proxy adds per
//! request without an env (find the TCP peer's env by its address) and per
//! table load, by the number of caller pods (10, 1k, 10k, 100k; every other
//! pod IPv4, the rest IPv6, as dual-stack clusters mix them).
//!
//! `cargo bench --bench callers` (criterion). Before measuring it prints
//! `ALLOC` lines (allocations per call, a counting global allocator) and
//! `TABLE` lines (JSON size, `config::parse` and `RoutingTable::compile` time,
//! and the heap the compiled caller table keeps: the same config compiled
//! with and without its `callers`).
//!
//! Measured, per size:
//! - `env_of_address`: `CallerTable::env_of_address` alone, the address as
//!   Envoy writes `source.address` (`10.0.12.34:43210`, `[fd00:10:244::c]:43210`);
//! - `plan_for`: the whole per-request decision of a gateway for a request
//!   without an env header (9 typical headers in proxy-wasm's serialized form,
//!   read in place), from a caller in the table: the caller's env is found,
//!   the service resolved, the env header to inject chosen.
//!
//! With `ENVLANE_DRIVER=lookup|plan:SIZE:N` it is a plain driver (N calls
//! over the rotating callers) to count instructions per call under
//! callgrind, which the shared machine's load does not change.
//!
//! Each as `hot` (the same caller every call: the table's lines stay in
//! cache) and `rotating` (4,096 different callers spread over the whole
//! table, v4 and v6, in turn: a busy gateway's many peers, so at 100k pods
//! the looked-up entries are mostly not in L1/L2).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use envlane::callers::CallerTable;
use envlane::config::{self as cfg, CallerEntry, EnvEntry, PluginConfig, Proxy, ServiceEntry};
use envlane::decide::{plan_for, CallerAt, Plan};
use envlane::table::{Node, RoutingTable};
use envlane::wire::HeaderMap;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{allocs_per_call, live};

/// (label, caller pods)
const SIZES: &[(&str, usize)] = &[
    ("10", 10),
    ("1k", 1_000),
    ("10k", 10_000),
    ("100k", 100_000),
];
/// Envs of the table (`dev` and `dev.team0..8`); callers are spread over them.
const ENVS: usize = 10;
/// Services of the table, each in every env (100 pairs: the caller table is
/// what grows).
const SERVICES: usize = 10;
/// Different callers in the `rotating` benches.
const ROTATING: usize = 4096;

/// Pod `i`'s IP as Kubernetes writes it in `status.podIPs`: even pods IPv4
/// from 10.0.0.0/8, odd pods IPv6 from fd00:10:244::/48, both allocated in
/// order as node pod CIDRs hand them out.
fn pod_ip(i: usize) -> String {
    let k = i / 2 + 1;
    if i % 2 == 0 {
        format!("10.{}.{}.{}", (k >> 16) & 0xff, (k >> 8) & 0xff, k & 0xff)
    } else {
        format!("fd00:10:244:{:x}::{:x}", k >> 8, k & 0xff)
    }
}

/// The same address as Envoy's `source.address` property (with a port).
fn peer_address(i: usize) -> String {
    let ip = pod_ip(i);
    let port = 32768 + (i % 28000);
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn env_of_pod(i: usize) -> u32 {
    (i % ENVS) as u32
}

fn config(pods: usize) -> PluginConfig {
    let mut envs = vec![EnvEntry {
        name: "dev".into(),
        subset: Some("dev".into()),
    }];
    for t in 0..ENVS - 1 {
        envs.push(EnvEntry {
            name: format!("dev.team{t}"),
            subset: Some(format!("dev-team{t}")),
        });
    }
    let ids: Vec<u32> = (0..ENVS as u32).collect();
    // One entry per env, as envlane-sync writes it.
    let mut by_env: Vec<Vec<String>> = vec![Vec::new(); ENVS];
    for pod in 0..pods {
        if let Some(list) = by_env.get_mut(env_of_pod(pod) as usize) {
            list.push(pod_ip(pod));
        }
    }
    PluginConfig {
        default_env: Some("dev".into()),
        proxy: Proxy::Gateway,
        callers: by_env
            .into_iter()
            .zip(0u32..)
            .filter(|(ips, _)| !ips.is_empty())
            .map(|(ips, env)| CallerEntry { env, ips })
            .collect(),
        envs,
        services: (0..SERVICES)
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

/// A gateway's node: a namespace, no env label of its own.
fn node() -> Node {
    Node {
        namespace: Some("demo".into()),
        env_label: None,
    }
}

fn table(pods: usize) -> Option<RoutingTable> {
    match RoutingTable::compile(&config(pods), &node()) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("bench table does not compile: {e}");
            None
        }
    }
}

/// A request without env: the headers a gateway typically sees.
fn headers() -> Vec<u8> {
    let pairs = [
        (":authority", "svc5:8080"),
        (":path", "/api/items?page=2"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "4f1c8a52-93d0-4c0e-9a57-0c3f7e2b9d11"),
        ("x-forwarded-for", "10.0.0.1"),
    ];
    HeaderMap::encode(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
}

fn plan_wire<'t>(t: &'t RoutingTable, wire: &[u8], address: &str) -> Option<Plan<'t>> {
    HeaderMap::parse(wire).map(|h| plan_for(t, &h, &CallerAt(address)))
}

/// Callers looked up in the `rotating` benches: spread evenly over the
/// table (all of them when it has fewer), v4 and v6 alternating.
fn rotating_callers(pods: usize) -> Vec<(String, u32)> {
    let n = pods.min(ROTATING);
    let step = pods / n;
    (0..n)
        .map(|j| j * step + (j % 2 != (j * step) % 2) as usize)
        .map(|i| i.min(pods - 1))
        .map(|i| (peer_address(i), env_of_pod(i)))
        .collect()
}

/// The caller of the `hot` benches: the middle pod (v4) and the next (v6).
fn hot_callers(pods: usize) -> [(String, u32); 2] {
    let i = (pods / 2) & !1;
    [
        (peer_address(i), env_of_pod(i)),
        (peer_address(i + 1), env_of_pod(i + 1)),
    ]
}

/// Every looked-up caller must be found with its env, and plan_for must
/// route by it; false (and a message) otherwise.
fn check(t: &RoutingTable, pods: usize, wire: &[u8]) -> bool {
    let mut all = rotating_callers(pods);
    all.extend(hot_callers(pods));
    let v6 = all.iter().filter(|(a, _)| a.starts_with('[')).count();
    if v6 == 0 || v6 == all.len() {
        eprintln!("pods={pods}: expected v4 and v6 callers");
        return false;
    }
    for (address, env) in &all {
        if t.callers().env_of_address(address) != Some(*env) {
            eprintln!("pods={pods}: {address} not found with env {env}");
            return false;
        }
        let want = t.env_name(*env).map(|e| e.as_str());
        let plan = plan_wire(t, wire, address);
        let injected = plan.as_ref().and_then(|p| p.inject_env.as_deref());
        let routed = plan.as_ref().and_then(|p| p.route_to_cluster).is_some();
        if !routed || injected != want {
            eprintln!("pods={pods}: {address}: plan_for did not route by the caller's env");
            return false;
        }
    }
    if t.callers().env_of_address("192.168.255.1:1").is_some() {
        eprintln!("pods={pods}: a stranger was found");
        return false;
    }
    true
}

/// `TABLE` lines: per size, the pushed JSON, its parse and compile time, the
/// heap the compiled table keeps, and how much of it is the caller table
/// (the same config without `callers`, compiled the same way). Best of a
/// few runs for the times (small tables take microseconds).
fn print_table_costs() {
    for &(label, pods) in SIZES {
        let full = config(pods);
        let bare = PluginConfig {
            callers: Vec::new(),
            ..full.clone()
        };
        let Ok(json) = serde_json::to_vec(&full) else {
            return;
        };
        let runs = if pods >= 10_000 { 5 } else { 50 };
        let (mut parse_s, mut compile_s, mut callers_s) = (f64::MAX, f64::MAX, f64::MAX);
        let (mut kept, mut kept_bare, mut callers_kept) = (0, 0, 0);
        for _ in 0..runs {
            let t0 = Instant::now();
            let Ok(parsed) = cfg::parse(&json) else {
                eprintln!("bench config does not parse");
                return;
            };
            parse_s = parse_s.min(t0.elapsed().as_secs_f64());
            let base = live();
            let t1 = Instant::now();
            let Ok(t) = RoutingTable::compile(&parsed, &node()) else {
                return;
            };
            compile_s = compile_s.min(t1.elapsed().as_secs_f64());
            kept = live().saturating_sub(base);
            drop(black_box(t));

            let base = live();
            let Ok(t) = RoutingTable::compile(&bare, &node()) else {
                return;
            };
            kept_bare = live().saturating_sub(base);
            drop(black_box(t));

            let base = live();
            let t2 = Instant::now();
            let Ok(c) = CallerTable::compile(&parsed.callers, &[], ENVS) else {
                return;
            };
            callers_s = callers_s.min(t2.elapsed().as_secs_f64());
            callers_kept = live().saturating_sub(base);
            drop(black_box(c));
        }
        println!(
            "TABLE pods={label} json_bytes={} parse_ms={:.3} compile_ms={:.3} caller_table_compile_ms={:.3} \
             table_bytes={kept} table_bytes_without_callers={kept_bare} caller_table_bytes={callers_kept} \
             bytes_per_pod={:.1}",
            json.len(),
            parse_s * 1e3,
            compile_s * 1e3,
            callers_s * 1e3,
            callers_kept as f64 / pods as f64,
        );
    }
}

/// `ALLOC` lines: allocations per lookup and per decision.
fn print_allocations(tables: &[(&str, usize, RoutingTable)], wire: &[u8]) {
    for (label, _, t) in tables {
        let [(v4, _), (v6, _)] = hot_callers(t.callers().ip_count());
        let (v4, v6) = (v4.as_str(), v6.as_str());
        let lookup = allocs_per_call(1000, || {
            black_box(t.callers().env_of_address(black_box(v4)));
            black_box(t.callers().env_of_address(black_box(v6)));
        }) / 2.0;
        let plan = allocs_per_call(1000, || {
            black_box(plan_wire(black_box(t), black_box(wire), black_box(v4)));
        });
        println!("ALLOC pods={label} env_of_address={lookup:.2} plan_for={plan:.2}");
    }
}

/// `ENVLANE_DRIVER=lookup|plan:10|1k|10k|100k:N`: build the table, then N
/// calls over the rotating callers and nothing else (for callgrind: the
/// instructions of N calls minus those of 0 calls, divided by N, are a
/// noise-free per-call figure).
fn driver(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [what, size, n] = parts.as_slice() else {
        eprintln!("ENVLANE_DRIVER=lookup|plan:10|1k|10k|100k:N");
        return;
    };
    let (Some(&(_, pods)), Ok(n)) = (SIZES.iter().find(|s| s.0 == *size), n.parse::<usize>())
    else {
        eprintln!("unknown size {size} or bad count {n}");
        return;
    };
    let Some(t) = table(pods) else {
        return;
    };
    let wire = headers();
    let rotating = rotating_callers(pods);
    for (address, _) in rotating.iter().cycle().take(n) {
        if *what == "lookup" {
            black_box(t.callers().env_of_address(black_box(address)));
        } else {
            black_box(plan_wire(
                black_box(&t),
                black_box(&wire),
                black_box(address),
            ));
        }
    }
}

fn benches(c: &mut Criterion) {
    if let Ok(spec) = std::env::var("ENVLANE_DRIVER") {
        driver(&spec);
        std::process::exit(0);
    }
    let wire = headers();
    let mut tables = Vec::new();
    for &(label, pods) in SIZES {
        let Some(t) = table(pods) else {
            return;
        };
        if t.callers().ip_count() != pods || !check(&t, pods, &wire) {
            eprintln!("pods={label}: the caller table is not what the bench needs");
            return;
        }
        tables.push((label, pods, t));
    }
    print_allocations(&tables, &wire);
    print_table_costs();

    let mut g = c.benchmark_group("env_of_address");
    g.throughput(Throughput::Elements(1));
    for (label, pods, t) in &tables {
        let callers = t.callers();
        for (i, (address, _)) in hot_callers(*pods).iter().enumerate() {
            let which = if i == 0 { "hot-v4" } else { "hot-v6" };
            g.bench_with_input(
                BenchmarkId::new(format!("pods={label}"), which),
                address,
                |b, a| b.iter(|| callers.env_of_address(black_box(a))),
            );
        }
        let rotating = rotating_callers(*pods);
        g.bench_function(BenchmarkId::new(format!("pods={label}"), "rotating"), |b| {
            let mut next = rotating.iter().cycle();
            b.iter(|| {
                next.next()
                    .and_then(|(a, _)| callers.env_of_address(black_box(a)))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("plan_for");
    g.throughput(Throughput::Elements(1));
    for (label, pods, t) in &tables {
        let [(v4, _), _] = hot_callers(*pods);
        g.bench_with_input(
            BenchmarkId::new(format!("pods={label}"), "hot-v4"),
            &v4,
            |b, a| b.iter(|| plan_wire(black_box(t), black_box(&wire), black_box(a))),
        );
        let rotating = rotating_callers(*pods);
        g.bench_function(BenchmarkId::new(format!("pods={label}"), "rotating"), |b| {
            let mut next = rotating.iter().cycle();
            b.iter(|| {
                next.next()
                    .and_then(|(a, _)| plan_wire(black_box(t), black_box(&wire), black_box(a)))
            })
        });
    }
    g.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

criterion_group! {
    name = callers_benches;
    config = quick();
    targets = benches
}
criterion_main!(callers_benches);
