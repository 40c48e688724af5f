"""Native figures: the criterion bench `benches/resolve.rs` (ns, allocations
and, under callgrind, instructions per call; loading a table) and the
envlane-sync render time of 10,000 pods."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import ENVOY_CPU, ROOT, harness, log, on_cpu
from .common import PORT
from .variants import subset_of, svc_name


@dataclass
class Native:
    ns: list[tuple[str, float]] = field(default_factory=list)
    allocs: list[str] = field(default_factory=list)
    instructions: list[tuple[str, float]] = field(default_factory=list)
    config: list[str] = field(default_factory=list)
    error: str = ""

def criterion(args) -> Native:
    """benches/resolve.rs: criterion ns/call, allocations/call and, under
    callgrind when valgrind is there, instructions/call (noise-free)."""
    res = Native()
    build = ["cargo", "bench", "-j", "1", "-p", "envlane", "--bench", "resolve", "--no-run", "--message-format", "json"]
    log("criterion: " + " ".join(build))
    out = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    exe = next((json.loads(line).get("executable") for line in out.stdout.splitlines()
                if '"executable"' in line and json.loads(line).get("executable")), None)
    if out.returncode != 0 or not exe:
        res.error = f"cargo bench --no-run failed:\n{out.stderr[-2000:]}"
        return res
    argv = [exe, "--bench", "--warm-up-time", str(args.crit_warmup), "--measurement-time", str(args.crit_time), "--output-format", "bencher"]
    with on_cpu(ENVOY_CPU):
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        res.error = f"the resolve bench failed:\n{out.stderr[-2000:]}"
        return res
    res.ns = [(m.group(1), float(m.group(2).replace(",", "")))
              for m in re.finditer(r"^test (\S+)\s+\.\.\. bench:\s+([\d,.]+) ns/iter", out.stdout, re.M)]
    res.allocs = [line[6:] for line in out.stdout.splitlines() if line.startswith("ALLOC ")]
    res.config = [line[7:] for line in out.stdout.splitlines() if line.startswith("CONFIG ")]
    if shutil.which("valgrind") and "callgrind" not in args.skip:
        n = 20000

        def ir(spec: str) -> int:
            env = dict(os.environ, ENVLANE_DRIVER=spec)
            r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", exe, "--bench"],
                               env=env, capture_output=True, text=True, timeout=600)
            counts = [int(x) for x in re.findall(r"Collected : (\d+)", r.stderr)]
            return max(counts) if counts else 0

        for pairs in ("10", "100k"):
            base = ir(f"resolve:{pairs}:1:0")
            for what, depth in (("resolve", 1), ("resolve", 2), ("resolve", 3), ("resolve", 4), ("plan", 3)):
                res.instructions.append((f"{what}/pairs={pairs}/depth={depth}", (ir(f"{what}:{pairs}:{depth}:{n}") - base) / n))
    return res

def sync_fixture(path: Path, pods: int, services: int) -> None:
    """What `kubectl get ns,pods,svc -A -o json` prints: one List with the
    opted-in namespace, `services` Services and `pods` Ready pods spread
    evenly over them, each pod of a service in its own env (`dev`,
    `dev.team0`, ...)."""
    items = [{
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": harness.NAMESPACE, "uid": "ns-0", "resourceVersion": "1",
                     "labels": {"envlane.io/enabled": "true", "kubernetes.io/metadata.name": harness.NAMESPACE}},
        "status": {"phase": "Active"},
    }]
    for s in range(services):
        items.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc_name(s), "namespace": harness.NAMESPACE, "uid": f"s-{s}", "resourceVersion": "1",
                         "labels": {"app": svc_name(s)}},
            "spec": {"selector": {"app": svc_name(s)},
                     "ports": [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}],
                     "clusterIP": f"10.96.{s // 250}.{s % 250 + 1}", "clusterIPs": [f"10.96.{s // 250}.{s % 250 + 1}"],
                     "type": "ClusterIP", "sessionAffinity": "None"},
            "status": {"loadBalancer": {}},
        })
    per = max(1, pods // services)
    for p in range(pods):
        s, k = divmod(p, per)
        env = "dev" if k == 0 else f"dev.team{k - 1}"
        ip = f"10.244.{p // 250}.{p % 250 + 1}"
        items.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{svc_name(s)}-{subset_of(env)}-7d9f8c6b5-x{p:05d}", "namespace": harness.NAMESPACE,
                         "uid": f"p-{p}", "resourceVersion": "1", "generateName": f"{svc_name(s)}-{subset_of(env)}-7d9f8c6b5-",
                         "labels": {"app": svc_name(s), "virtual-env": env, "pod-template-hash": "7d9f8c6b5"}},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1",
                                     "ports": [{"containerPort": PORT, "protocol": "TCP"}]}],
                     "nodeName": f"node{p % 20}", "restartPolicy": "Always"},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": f"192.0.2.{p % 20 + 1}",
                       "conditions": [{"type": t, "status": "True"} for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]},
        })
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}))

def sync_render(workdir: Path) -> tuple[dict | None, str]:
    """`envlane-sync render -f` on 10,000 pods / 2,000 services: the render
    time it prints itself (`--stats`: the pure render, input already parsed),
    and the whole process's wall time and peak RSS (`/usr/bin/time -v`)."""
    binary = ROOT / "target" / "release" / "envlane-sync"
    if not (ROOT / "sync" / "Cargo.toml").exists():
        return None, "TODO: sync/ (envlane-sync) does not exist yet"
    if not binary.exists():
        return None, f"{binary} is missing (./build.sh bench builds it)"
    helptext = subprocess.run([str(binary), "render", "--help"], capture_output=True, text=True, timeout=30)
    if helptext.returncode != 0 or "--filename" not in helptext.stdout:
        return None, "TODO: envlane-sync has no `render -f` subcommand yet"
    fixture = workdir / "cluster-10k-pods.json"
    sync_fixture(fixture, 10_000, 2_000)
    time_bin = "/usr/bin/time"
    if not Path(time_bin).exists():
        return None, "/usr/bin/time missing (./build.sh bench installs the Debian package `time`)"
    runs = []
    for _ in range(5):
        with on_cpu(ENVOY_CPU):
            t0 = time.monotonic()
            out = subprocess.run([time_bin, "-v", str(binary), "render", "-f", str(fixture), "--stats", "--log-level", "error"],
                                 capture_output=True, text=True, timeout=300)
            wall = (time.monotonic() - t0) * 1000
        if out.returncode != 0:
            return None, f"TODO: `envlane-sync render -f` failed: {out.stderr.strip()[-500:]}"
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
        m = re.search(r"render: ([\d.]+) ms for (\d+) namespaces, (\d+) pods, (\d+) services -> (\d+) envs, (\d+) services, (\d+) pairs, (\d+) objects", out.stderr)
        render_ms = float(m.group(1)) if m else None
        runs.append({"wall_ms": wall, "render_ms": render_ms, "peak_rss_kib": peak, "output_bytes": len(out.stdout),
                     "stats": m.group(0) if m else out.stderr.strip()[-300:]})
    best = min(runs, key=lambda r: r["render_ms"] if r["render_ms"] is not None else r["wall_ms"])
    best = dict(best)
    best["fixture_bytes"] = fixture.stat().st_size
    best["render_ms_all"] = [r["render_ms"] for r in runs]
    best["wall_ms_all"] = [round(r["wall_ms"], 1) for r in runs]
    best["wall_ms_min"] = min(r["wall_ms"] for r in runs)
    best["peak_rss_kib_max"] = max(r["peak_rss_kib"] for r in runs)
    return best, ""
