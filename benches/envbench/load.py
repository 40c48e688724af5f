"""Load generation: wrk (HTTP/1.1) and h2load (h2c) against every variant's
Envoy, in interleaved rounds, with Envoy's CPU time and where the upstream
requests went. Throughput figures depend on the machine's other load; read
them from a quiet run only."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import CONNS, LOAD_CPU, App, cpu_seconds, log, rss_kib, start_upstream, taskset
from .variants import Proxy, Table, Variant, cluster, smoke, subset_of


WRK_SCRIPT = r"""
local reqs = {}
local n = 0
local i = 0
init = function(args)
%(init)s
  n = #reqs
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end
done = function(summary, latency, requests)
  io.write(string.format(
    "BENCH requests=%%d duration_us=%%d status_errors=%%d connect_errors=%%d read_errors=%%d write_errors=%%d timeouts=%%d p50=%%d p90=%%d p99=%%d p999=%%d mean=%%.1f max=%%d\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
"""

def wrk_script(path: Path, reqs: list[tuple[str, str, str]]) -> Path:
    lines = [
        f'  reqs[#reqs + 1] = wrk.format("GET", "/", {{["Host"] = "{host}", ["x-virtual-env"] = "{env}"}})'
        for host, env, _ in reqs
    ]
    path.write_text(WRK_SCRIPT % {"init": "\n".join(lines)})
    return path

@dataclass
class Result:
    name: str
    rps: float = 0.0
    p50: float = 0.0  # µs
    p99: float = 0.0
    p999: float = 0.0
    errors: int = 0
    requests: int = 0
    envoy_cpu: float = 0.0  # Envoy CPU share during the run (1.0 = one core)
    cpu_us_per_req: float = 0.0
    routed_ok: float | None = None  # share of upstream requests on the expected clusters
    rss_mib: float = 0.0
    note: str = ""
    raw: dict = field(default_factory=dict)

def run_wrk(proxy: Proxy, script: Path, conns: int, seconds: float, warmup: float, name: str) -> Result:
    base = taskset(LOAD_CPU) + ["wrk", "-t1", f"-c{conns}", "--timeout", "5s", "-s", str(script), proxy.url()]
    if warmup > 0:
        subprocess.run(base[:-1] + [f"-d{max(1, round(warmup))}s", proxy.url()], capture_output=True, text=True, timeout=warmup + 60, check=True)
    before_counts = proxy.cluster_counts()
    cpu0 = cpu_seconds(proxy.pid)
    t0 = time.monotonic()
    out = subprocess.run(base[:-1] + [f"-d{max(1, round(seconds))}s", proxy.url()], capture_output=True, text=True, timeout=seconds + 60, check=True)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(proxy.pid) - cpu0
    m = re.search(r"^BENCH (.*)$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    kv = {k: float(v) for k, v in (p.split("=") for p in m.group(1).split())}
    errors = int(sum(kv[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")))
    reqs = int(kv["requests"])
    r = Result(name=name, rps=reqs / (kv["duration_us"] / 1e6), p50=kv["p50"], p99=kv["p99"], p999=kv["p999"],
               errors=errors, requests=reqs, envoy_cpu=cpu / wall, cpu_us_per_req=cpu * 1e6 / max(reqs, 1), raw=kv)
    r.routed_ok = routed_share(proxy, before_counts)
    r.rss_mib = rss_kib(proxy.pid) / 1024
    return r

def routed_share(proxy: Proxy, before: dict[str, int]) -> float | None:
    if proxy.variant == "A":
        return None
    after = proxy.cluster_counts()
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    expected = {c for _, _, c in proxy.requests()}
    if proxy.expect_default:
        # The route's own cluster: the default route's, or the subset-less
        # one where the route patch's matcher falls back to it.
        expected = {cluster(i, "dev") for i in proxy.table.hot()} | {cluster(i) for i in proxy.table.hot()}
    total = sum(delta.values())
    return sum(v for k, v in delta.items() if k in expected) / total if total else 0.0

def run_h2load(proxy: Proxy, host: str, env: str, seconds: float, warmup: float, name: str, workdir: Path) -> Result:
    logf = workdir / f"h2load-{name}.log"
    common = taskset(LOAD_CPU) + ["h2load", "-t1", "-c8", "-m4", "-H", f":authority: {host}", "-H", f"x-virtual-env: {env}"]
    if warmup > 0:
        subprocess.run(common + [f"-D{max(1, round(warmup))}", proxy.url()], capture_output=True, text=True, timeout=warmup + 60, check=True)
    argv = common + [f"-D{max(1, round(seconds))}", f"--log-file={logf}", proxy.url()]
    before_counts = proxy.cluster_counts()
    cpu0 = cpu_seconds(proxy.pid)
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(proxy.pid) - cpu0
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out.stdout)
    mr = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out.stdout)
    if not (m and mr):
        raise RuntimeError(f"h2load output not understood:\n{out.stdout}\n{out.stderr}")
    durations = sorted(int(line.split("\t")[2]) for line in logf.read_text().splitlines() if line.count("\t") >= 2)
    status_ok = [line for line in logf.read_text().splitlines() if line.split("\t")[1:2] == ["200"]]
    errors = int(mr.group(4)) + int(mr.group(5)) + int(mr.group(6)) + (len(durations) - len(status_ok))

    def pct(p: float) -> float:
        return float(durations[min(len(durations) - 1, int(len(durations) * p / 100))]) if durations else 0.0

    reqs = int(mr.group(2))
    r = Result(name=name, rps=float(m.group(3)), p50=pct(50), p99=pct(99), p999=pct(99.9), errors=errors,
               requests=reqs, envoy_cpu=cpu / wall, cpu_us_per_req=cpu * 1e6 / max(reqs, 1))
    if proxy.variant != "A":
        after = proxy.cluster_counts()
        delta = {k: v - before_counts.get(k, 0) for k, v in after.items()}
        total = sum(delta.values())
        want = cluster(int(host.split(":")[0][3:]), subset_of(env.rsplit(".", 2)[0]))
        r.routed_ok = delta.get(want, 0) / total if total else 0.0
    r.rss_mib = rss_kib(proxy.pid) / 1024
    return r

def merge(name: str, parts: list[Result]) -> Result:
    """Rounds of one run: totals for req/s and CPU, the mean of the rounds'
    percentiles (wrk reports percentiles per run only)."""
    reqs = sum(p.requests for p in parts)
    secs = sum(p.requests / p.rps for p in parts if p.rps)
    n = len(parts)
    r = Result(
        name=name, rps=reqs / secs if secs else 0.0, requests=reqs,
        p50=sum(p.p50 for p in parts) / n, p99=sum(p.p99 for p in parts) / n, p999=sum(p.p999 for p in parts) / n,
        errors=sum(p.errors for p in parts), envoy_cpu=sum(p.envoy_cpu for p in parts) / n,
        cpu_us_per_req=sum(p.cpu_us_per_req * p.requests for p in parts) / max(reqs, 1), rss_mib=parts[-1].rss_mib,
    )
    oks = [p.routed_ok for p in parts if p.routed_ok is not None]
    r.routed_ok = sum(oks) / len(oks) if oks else None
    r.note = "rounds req/s: " + " / ".join(f"{p.rps:,.0f}" for p in parts)
    r.raw = {"rounds": [vars(p) for p in parts]}
    return r

def measure(proxies: dict[str, tuple[Proxy, Path]], runs: list[tuple[str, str, int]], args, results: dict[str, Result], h2: bool = False,
            workdir: Path | None = None) -> None:
    """Every run in `runs` (result name, proxy name, connections) gets
    `--rounds` slices of duration/rounds seconds, interleaved across runs so
    that drift in the machine's other load hits every variant alike."""
    rounds = max(1, args.rounds)
    slice_s = max(1, round(args.duration / rounds))
    parts: dict[str, list[Result]] = {name: [] for name, _, _ in runs}
    for k in range(rounds):
        for name, pname, conns in runs:
            proxy, script = proxies[pname]
            warm = args.warmup if k == 0 else 0  # connections and V8 tiering are warm after round 1
            if h2:
                host, env, _ = proxy.table.requests()[len(proxy.table.requests()) // 2]
                r = run_h2load(proxy, host, env, slice_s, warm, f"{name}-{k}", workdir)
            else:
                r = run_wrk(proxy, script, conns, slice_s, warm, name)
            parts[name].append(r)
            log(f"{name} [round {k + 1}/{rounds}]: {r.rps:,.0f} req/s p50 {r.p50:.0f} p99 {r.p99:.0f} p99.9 {r.p999:.0f} µs; "
                f"Envoy CPU {r.envoy_cpu:.0%}, {r.cpu_us_per_req:.1f} µs/req; errors {r.errors}")
    for name, _, _ in runs:
        results[name] = merge(name, parts[name])

def per_request(args, workdir: Path, upstream: App, variants: list[Variant], results: dict[str, Result]) -> None:
    """Every variant's Envoy up at once (idle ones cost nothing), then wrk
    runs interleaved across them: -c32 for throughput, -c1 (A, B, C, D) for
    latency without queueing."""
    proxies: dict[str, tuple[Proxy, Path]] = {}
    try:
        for v in variants:
            log(f"{v.name}: {v.table.services} services x {v.table.envs} envs = {v.table.pairs} pairs; starting Envoy")
            proxy = v.proxy(upstream.port, workdir)
            proxies[v.name] = (proxy, wrk_script(workdir / f"wrk-{v.kind}-{v.table.label}.lua", v.table.requests()))
            log(f"{v.name}: Envoy ready in {proxy.startup_s:.1f} s, RSS {rss_kib(proxy.pid) / 1024:.0f} MiB")
            smoke(proxy)
        runs = [(name, name, CONNS) for name in proxies]
        runs += [(f"{name} c=1", name, 1) for name in ("A", "B", "C", "D") if name in proxies]
        measure(proxies, runs, args, results)
        for name, (proxy, _) in proxies.items():
            for key in (name, f"{name} c=1"):
                if key in results:
                    results[key].note = f"Envoy startup {proxy.startup_s:.1f} s; " + results[key].note
    finally:
        for proxy, _ in proxies.values():
            proxy.close()


def per_request_h2(args, workdir: Path, results: dict[str, Result]) -> None:
    upstream = start_upstream(workdir, "upstream-h2", "x-bench-none", h2=True)
    proxies: dict[str, tuple[Proxy, Path]] = {}
    try:
        table = Table(args.services, 10)
        for variant in ("A", "B"):
            name = f"{variant} h2"
            if args.only and name not in args.only:
                continue
            proxy = Proxy(variant, table, upstream.port, workdir, h2_upstream=True, name=name, wasm=args.wasm)
            proxies[name] = (proxy, Path())
            smoke(proxy)
        measure(proxies, [(name, name, 0) for name in proxies], args, results, h2=True, workdir=workdir)
    finally:
        for proxy, _ in proxies.values():
            proxy.close()
        upstream.close()
