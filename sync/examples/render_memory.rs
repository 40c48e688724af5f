//! Memory of one render on a synthetic cluster: what envlane-sync holds
//! while it writes a pass (the store's input plus the rendered objects).
//!
//!   cargo run --release -p envlane-sync --example render_memory -- PODS SERVICES NAMESPACES
//!
//! Prints the process's resident memory (VmRSS) before and after the render,
//! its peak (VmHWM), and the table's size. Linux only (reads /proc).

use envlane_sync::render::{render, RenderOptions};
use envlane_sync::synthetic;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (pods, services, namespaces) = match args.as_slice() {
        [p, s, n] => (*p, *s, *n),
        _ => (40_000, 5_000, 400),
    };
    let snap = synthetic::cluster(pods, services, namespaces);
    let before = status_kib("VmRSS:");
    let rendered = render(
        &snap.namespaces,
        &snap.pods,
        &snap.services,
        &snap.virtual_services,
        &RenderOptions::default(),
    );
    let after = status_kib("VmRSS:");
    let peak = status_kib("VmHWM:");
    match rendered {
        Ok(r) => {
            let table_bytes = serde_json::to_vec(&r.table).map_or(0, |v| v.len());
            let mut by_kind: std::collections::BTreeMap<String, (usize, usize)> =
                Default::default();
            for o in &r.objects {
                let e = by_kind.entry(format!("{:?}", o.key.kind)).or_default();
                e.0 += 1;
                e.1 += serde_json::to_vec(&o.body()).map_or(0, |v| v.len());
            }
            for (kind, (n, bytes)) in &by_kind {
                println!(
                    "  {kind}: {n} objects, {:.1} MB as JSON",
                    *bytes as f64 / 1e6
                );
            }
            println!(
                "{pods} pods, {services} services, {namespaces} namespaces -> {} pairs, {} objects, table {:.1} MB JSON",
                r.stats.pairs,
                r.objects.len(),
                table_bytes as f64 / 1e6
            );
            println!(
                "RSS before render {:.0} MiB, holding the render {:.0} MiB (+{:.0} MiB), peak {:.0} MiB",
                before as f64 / 1024.0,
                after as f64 / 1024.0,
                after.saturating_sub(before) as f64 / 1024.0,
                peak as f64 / 1024.0
            );
        }
        Err(e) => {
            eprintln!("render failed: {e}");
            std::process::exit(1);
        }
    }
}
