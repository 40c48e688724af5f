//! Writes a synthetic cluster as `kubectl get ns,pods,svc -A -o json` output:
//! `cargo run --release -p envlane-sync --example gen_cluster -- 10000 2000 4 > big.json`
//! then `envlane-sync render -f big.json --stats > /dev/null`.

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let get = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let snap = envlane_sync::synthetic::cluster(get(0, 10_000), get(1, 2_000), get(2, 4));
    println!("{}", envlane_sync::synthetic::to_kubectl_json(&snap));
}
