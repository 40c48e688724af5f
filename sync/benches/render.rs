//! Render time for 10,000 pods / 2,000 services in 4 namespaces and 8 envs.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use envlane_sync::render::{render, RenderOptions};
use envlane_sync::synthetic::cluster;

fn bench(c: &mut Criterion) {
    let snap = cluster(10_000, 2_000, 4);
    let opts = RenderOptions::default();
    if let Ok(r) = render(
        &snap.namespaces,
        &snap.pods,
        &snap.services,
        &snap.virtual_services,
        &opts,
    ) {
        eprintln!(
            "table: {} envs, {} services, {} pairs; {} objects",
            r.stats.envs,
            r.stats.services,
            r.stats.pairs,
            r.objects.len()
        );
    }
    c.bench_function("render 10k pods / 2k services", |b| {
        b.iter(|| {
            render(
                &snap.namespaces,
                &snap.pods,
                &snap.services,
                &snap.virtual_services,
                black_box(&opts),
            )
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
