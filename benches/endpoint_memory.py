#!/usr/bin/env python3
"""The filter's Wasm VM memory per (service, env) pair, cluster mode vs
endpoint mode (issue 13), in real Envoy 1.40.

One fresh Envoy (`--concurrency 1`: the base VM, the main thread's and the
worker's) per (mode, table), the filter delivered by file ECDS as the
harness does, read once every VM logged `loaded table revision=R`. Memory =
each V8 Wasm linear memory's size (benches/envbench/common.wasm_memories_kib,
BENCHMARKS.md's method: a linear memory only grows, so it is the VM's peak,
the compile included). Tables: S services × 10 envs; endpoint mode adds
`targetPorts` and per pair 1, 2 or 3 pod IPs (cycling, 2 on average, every
IP distinct). Per pair = (memory at the table - memory at a 1-service
table) / pairs.

    python3 benches/endpoint_memory.py [--wasm NAME=PATH ...] [SERVICES ...]
        # default 1000 10000, the filter dist/envlane.wasm as "now"; several
        # --wasm builds are measured side by side in one run
Writes dist/bench/endpoint_memory.json.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "integration"), str(ROOT / "benches")]

from envbench.common import wasm_memories_kib  # noqa: E402
from harness import (  # noqa: E402
    WASM, Envoy, ecds_resource, fqdn, free_port, sidecar_bootstrap, wait_for, wasm_filter_ecds, write_atomically,
)

ENVS = 10
PORT, TARGET_PORT = 8080, 9080


def table(services: int, mode: str) -> dict:
    envs = [{"name": "dev", "subset": "dev"}] + [{"name": f"dev.team{t}", "subset": f"dev-team{t}"} for t in range(ENVS - 1)]
    out = {"revision": f"{mode}-{services}", "defaultEnv": "dev", "mode": mode, "envs": envs, "services": []}
    ip = 0
    for i in range(services):
        entry = {"host": fqdn(f"svc{i}"), "ports": [PORT], "envs": list(range(ENVS))}
        if mode == "endpoint":
            entry["targetPorts"] = [TARGET_PORT]
            entry["endpoints"] = []
            for e in range(ENVS):
                ips = []
                for _ in range(1 + (i * ENVS + e) % 3):
                    ip += 1
                    ips.append(f"10.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}")
                entry["endpoints"].append(ips)
        out["services"].append(entry)
    return out


def measure(config: dict, workdir: Path, wasm: Path) -> dict:
    ecds = workdir / f"{config['revision']}.ecds.json"
    write_atomically(ecds, ecds_resource(config, wasm))
    bootstrap = sidecar_bootstrap(pod="mem", labels={"app": "mem"}, listen_port=free_port(), admin_port=free_port(),
                                  virtual_hosts=[{"name": "any", "domains": ["*"], "routes": [
                                      {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}],
                                  clusters=[], http_filters=[wasm_filter_ecds(ecds)])
    envoy = Envoy(config["revision"], bootstrap, workdir)
    try:
        envoy.wait_ready()
        line = f"loaded table revision={config['revision']} "
        t0 = time.monotonic()
        wait_for(lambda: envoy.process.log().count(line) >= 2, f"{config['revision']} loaded by every VM", 120,
                 envoy.process)
        time.sleep(0.5)  # the base VM's compile, if any, settles
        loaded = re.findall(r"loaded table revision=\S+ services=(\d+) pairs=(\d+)", envoy.process.log())
        return {"revision": config["revision"], "pairs": int(loaded[-1][1]), "vms_loaded": len(loaded),
                "wasm_kib": wasm_memories_kib(envoy.process.proc.pid), "ecds_bytes": ecds.stat().st_size,
                "load_wait_s": round(time.monotonic() - t0, 2)}
    finally:
        envoy.close()


def main(argv: list[str]) -> int:
    builds: dict[str, Path] = {}
    sizes: list[int] = []
    args = iter(argv)
    for a in args:
        if a == "--wasm":
            name, _, path = next(args, "").partition("=")
            builds[name] = Path(path)
        else:
            sizes.append(int(a))
    builds = builds or {"now": WASM}
    sizes = sizes or [1000, 10000]
    results = []
    with tempfile.TemporaryDirectory(prefix="envlane-endpoint-mem-") as tmp:
        for build, wasm in builds.items():
            for mode in ["cluster", "endpoint"]:
                base = measure(table(1, mode), Path(tmp), wasm) | {"mode": mode, "build": build}
                results.append(base)
                for services in sizes:
                    r = measure(table(services, mode), Path(tmp), wasm) | {"mode": mode, "build": build}
                    grown = max(r["wasm_kib"]) - max(base["wasm_kib"])
                    r["kib_per_pair_per_vm"] = round(grown / (r["pairs"] - base["pairs"]), 4)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    out = ROOT / "dist" / "bench" / "endpoint_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("| build | mode | pairs | addresses | Wasm linear memory per VM, KiB (largest first) | KiB per pair per VM |")
    for r in results:
        addrs = "" if r["mode"] == "cluster" else "1-3 per pair"
        print(f"| {r['build']} | {r['mode']} | {r['pairs']:,} | {addrs} | {r['wasm_kib']} | "
              f"{r.get('kib_per_pair_per_vm', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
