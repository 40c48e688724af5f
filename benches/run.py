#!/usr/bin/env python3
"""envlane benchmarks that print figures (issue 5). `./build.sh bench` runs this.

Per request, in real Envoy 1.40 on loopback, one worker (`--concurrency 1`),
one upstream test app, one load tool, same session:

  A   no filter: a plain route to the upstream
  B   envlane (Wasm, ECDS-delivered) with cluster_header routing
  C   the same routing as native Envoy routes: one exact `x-virtual-env`
      header match per (service, env), as alibaba/virtual-environment and the
      swimlane demo generate them
  D   the same fallback as an inline Lua filter (KtEnv-style)

Per config change: time from writing a new ECDS file to Envoy routing with
it, and the Wasm VM memory after, for 1k / 10k / 100k (service, env) pairs.
Natively: the criterion bench `benches/resolve.rs`. The envlane-sync render
time when its binary has a `render` subcommand.

Every process listens on 127.0.0.1 only, is bounded in time and is stopped at
the end. Envoy is pinned to CPU 0, the load tool and the upstream to CPU 1.
Run `python3 benches/run.py --help` for the knobs; `--quick` is a 2 s smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))

import harness  # noqa: E402  (integration/harness.py)
from harness import (  # noqa: E402
    App,
    Envoy,
    apply_route_patches,
    ecds_resource,
    fqdn,
    free_port,
    service_domains,
    sidecar_bootstrap,
    static_cluster,
    wasm_filter_ecds,
    write_atomically,
)

PORT = 8080
ENVOY_CPU = 0
LOAD_CPU = 1
CONNS = 32  # in flight in the throughput runs (wrk -c32; h2load -c8 -m4)
HOT = 16  # services the requests spread over
WASM_MODULE = harness.WASM  # --wasm: measure another build of the filter
USER_SUFFIX = ".user7.x"  # two levels below a team env: found at the 3rd level tried


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the tables


def svc_name(i: int) -> str:
    return f"svc{i}"


def subset_of(env: str) -> str:
    return env.replace(".", "-")


@dataclass(frozen=True)
class Table:
    """`services` services, each with the same `envs` envs: `dev` (the default)
    and `dev.team0 .. dev.team{envs-2}`. Pairs = services × envs."""

    services: int
    envs: int

    @property
    def pairs(self) -> int:
        return self.services * self.envs

    @property
    def label(self) -> str:
        return f"{self.services}x{self.envs}"

    def env_names(self) -> list[str]:
        return ["dev"] + [f"dev.team{t}" for t in range(self.envs - 1)]

    def config(self, revision: str = "bench", subset_override: dict[str, str] | None = None) -> dict:
        envs = []
        for name in self.env_names():
            sub = (subset_override or {}).get(name, subset_of(name))
            envs.append({"name": name, "subset": sub})
        ids = list(range(self.envs))
        return {
            "revision": revision,
            "defaultEnv": "dev",
            "envs": envs,
            "services": [{"host": fqdn(svc_name(i)), "ports": [PORT], "envs": ids} for i in range(self.services)],
        }

    def hot(self) -> list[int]:
        n = min(HOT, self.services)
        return [k * self.services // n for k in range(n)]

    def requests(self) -> list[tuple[str, str, str]]:
        """(authority, x-virtual-env, expected cluster): every hot service ×
        every team env, with two extra levels so exactly two levels fall back."""
        out = []
        for t in range(self.envs - 1):
            for i in self.hot():
                env = f"dev.team{t}"
                out.append((f"{svc_name(i)}:{PORT}", env + USER_SUFFIX, cluster(i, subset_of(env))))
        return out


def cluster(i: int, subset: str = "") -> str:
    return f"outbound|{PORT}|{subset}|{fqdn(svc_name(i))}"


# ------------------------------------------------------------ Envoy configs


def cluster_set(table: Table, upstream: int, h2: bool, extra: dict[str, int] | None = None) -> list[dict]:
    """The same clusters for every variant: hot services × every env subset,
    plus the subset-less one; all point at the one upstream. `extra`: more
    clusters, name → port."""
    names = []
    for i in table.hot():
        names.append(cluster(i))
        names += [cluster(i, subset_of(e)) for e in table.env_names()]
    return [static_cluster(n, upstream, h2) for n in names] + [static_cluster(n, port, h2) for n, port in (extra or {}).items()]


# Istio's route policy for a service without a VirtualService.
ISTIO_DEFAULT_RETRY = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2,
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": "5",
    "retriable_status_codes": [503],
}
# D's Lua filter names the cluster in this header, for a `cluster_header` route.
LUA_ROUTE_HEADER = "x-envlane-cluster"


def istio_route(target: str) -> dict:
    """A plain route as Istio writes it: the same policy in every variant, so
    A, B, C and D differ only in routing."""
    return {"cluster": target, "timeout": "0s", "retry_policy": ISTIO_DEFAULT_RETRY}


def default_route(i: int) -> dict:
    return {"name": "default", "match": {"prefix": "/"}, "route": istio_route(cluster(i, "dev"))}


def lua_route() -> dict:
    """D: the route a Lua-based solution needs: the cluster its filter named."""
    return {"match": {"prefix": "/", "headers": [{"name": LUA_ROUTE_HEADER, "present_match": True}]},
            "request_headers_to_remove": [LUA_ROUTE_HEADER],
            "route": {k: v for k, v in istio_route("unused").items() if k != "cluster"} | {"cluster_header": LUA_ROUTE_HEADER}}


def vhosts_a(table: Table) -> list[dict]:
    first = table.hot()[0]
    return [{"name": "all", "domains": ["*"], "routes": [default_route(first)]}]


def vhosts_envlane(table: Table, route_table: dict) -> list[dict]:
    """B: Istio's shape, a virtual host per service with its default route,
    patched as envlane-sync's route EnvoyFilters patch it (for route_table)."""
    vh = [
        {"name": f"{fqdn(svc_name(i))}:{PORT}", "domains": service_domains(svc_name(i), PORT), "routes": [default_route(i)]}
        for i in range(table.services)
    ]
    apply_route_patches(vh, harness.route_patches(route_table))
    vh.append({"name": "allow_any", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}]})
    return vh


def vhosts_lua(table: Table) -> list[dict]:
    """D: Istio's shape with the Lua filter's cluster_header route first."""
    vh = [
        {"name": f"{fqdn(svc_name(i))}:{PORT}", "domains": service_domains(svc_name(i), PORT), "routes": [lua_route(), default_route(i)]}
        for i in range(table.services)
    ]
    vh.append({"name": "allow_any", "domains": ["*"], "routes": [lua_route(), {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]})
    return vh


def vhosts_native(table: Table) -> list[dict]:
    """C: alibaba/virtual-environment style. Envoy routes cannot fall back by
    prefix level, so the fallback is expanded: for every (service, env) one
    route matching exactly the header value requests of that env use
    (`dev.teamN.user7.x`) to the subset envlane would pick, in table order,
    and a last route to the default env's subset."""
    vh = []
    for i in range(table.services):
        routes = []
        for env in table.env_names()[1:]:
            routes.append({
                "match": {"prefix": "/", "headers": [{"name": "x-virtual-env", "string_match": {"exact": env + USER_SUFFIX}}]},
                "route": istio_route(cluster(i, subset_of(env))),
            })
        routes.append(default_route(i))
        vh.append({"name": f"{svc_name(i)}:{PORT}", "domains": service_domains(svc_name(i), PORT), "routes": routes})
    return vh


LUA_CODE = r"""
-- KtEnv-style hierarchical env routing, generated from the envlane table.
local ENVS = {%(envs)s}
local SUBSETS = {%(subsets)s}
local SERVICES = {%(services)s}
local PORT = "%(port)d"
local DEFAULT_ENV = "dev"
local ROUTE_HEADER = "%(route_header)s"

-- host (every name a request may use) -> { env name -> cluster }
local ROUTES = {}
for _, svc in ipairs(SERVICES) do
  local name, ns, envs = svc[1], svc[2], svc[3]
  local full = name .. "." .. ns .. ".svc.cluster.local"
  local by_env = {}
  for _, id in ipairs(envs) do
    by_env[ENVS[id]] = "outbound|" .. PORT .. "|" .. SUBSETS[id] .. "|" .. full
  end
  ROUTES[full] = by_env
  ROUTES[name .. "." .. ns .. ".svc"] = by_env
  ROUTES[name .. "." .. ns] = by_env
  ROUTES[name] = by_env
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(ROUTE_HEADER) ~= nil then
    headers:remove(ROUTE_HEADER)
  end
  local authority = headers:get(":authority")
  if authority == nil then return end
  local host = string.match(authority, "^([^:]+)")
  local by_env = ROUTES[host]
  if by_env == nil then return end
  local env = headers:get("x-virtual-env")
  local target = nil
  while env ~= nil do
    target = by_env[env]
    if target ~= nil then break end
    env = string.match(env, "^(.+)%%.[^.]+$")
  end
  if target == nil then target = by_env[DEFAULT_ENV] end
  if target ~= nil then
    headers:replace(ROUTE_HEADER, target)
    handle:clearRouteCache()
  end
end
"""


def lua_filter(table: Table) -> dict:
    names = table.env_names()
    ids = ",".join(str(k + 1) for k in range(len(names)))
    code = LUA_CODE % {
        "envs": ",".join(json.dumps(n) for n in names),
        "subsets": ",".join(json.dumps(subset_of(n)) for n in names),
        "services": ",".join(f'{{"{svc_name(i)}","{harness.NAMESPACE}",{{{ids}}}}}' for i in range(table.services)),
        "port": PORT,
        "route_header": LUA_ROUTE_HEADER,
    }
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    }


@contextlib.contextmanager
def on_cpu(cpu: int | None):
    """Children started inside inherit this CPU affinity."""
    old = os.sched_getaffinity(0)
    if cpu is not None and cpu in old and len(old) > 1:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def taskset(cpu: int) -> list[str]:
    if shutil.which("taskset") and cpu in os.sched_getaffinity(0) and len(os.sched_getaffinity(0)) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


_SEQ = itertools.count()


class Proxy:
    """One Envoy for one variant."""

    def __init__(self, variant: str, table: Table, upstream: int, workdir: Path, *, h2_upstream: bool = False,
                 extra_clusters: dict[str, int] | None = None, plugin_config: dict | None = None, name: str | None = None,
                 wasm: Path | None = None, quiet_stats: bool = False, route_table: dict | None = None):
        self.variant = variant
        self.table = table
        self.expect_default = False  # routed by the plain default route (passthrough)
        self.port = free_port()
        # Unique per Envoy: the ECDS file and the log must not be shared.
        self.name = re.sub(r"[^A-Za-z0-9]+", "-", name or variant) + f"-{table.label}-{next(_SEQ)}"
        self.ecds_path = workdir / f"{self.name}-ecds.json"
        filters: list[dict] = []
        if variant == "A":
            vhosts = vhosts_a(table)
        elif variant == "B":
            vhosts = vhosts_envlane(table, route_table or plugin_config or table.config())
            write_atomically(self.ecds_path, ecds_resource(plugin_config or table.config(), wasm=wasm or WASM_MODULE))
            filters = [wasm_filter_ecds(self.ecds_path)]
        elif variant == "C":
            vhosts = vhosts_native(table)
        elif variant == "D":
            vhosts = vhosts_lua(table)
            filters = [lua_filter(table)]
        else:
            raise ValueError(variant)
        boot = sidecar_bootstrap(
            pod=f"bench-{variant.lower()}", labels={"app": "client"}, listen_port=self.port, admin_port=free_port(),
            virtual_hosts=vhosts, clusters=cluster_set(table, upstream, h2_upstream, extra_clusters), http_filters=filters,
        )
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        # Routes to the subsets of services no request uses name clusters this
        # Envoy does not have (to keep 10,000s of clusters out of the picture).
        hcm["route_config"]["validate_clusters"] = False
        if quiet_stats:
            # No periodic stats flush (it walks every cluster's stats): under
            # callgrind a request takes milliseconds and the flush would be
            # counted against the variants that are slower there.
            boot["stats_flush_on_admin"] = True
        started = time.monotonic()
        with on_cpu(ENVOY_CPU):
            self.envoy = Envoy(f"envoy-{self.name}", boot, workdir, concurrency=1)
        try:
            self.envoy.wait_ready(timeout=300)
            if variant == "B":
                harness.wait_for(lambda: "envlane: loaded table" in self.envoy.process.log(), "envlane table loaded", 120, self.envoy.process)
        except BaseException:
            self.envoy.close()
            raise
        self.startup_s = time.monotonic() - started

    @property
    def pid(self) -> int:
        return self.envoy.process.proc.pid

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def cluster_counts(self) -> dict[str, int]:
        out = {}
        for k, v in self.envoy.stats("upstream_rq_total").items():
            m = re.fullmatch(r"cluster\.(.+)\.upstream_rq_total", k)
            if m:
                out[m.group(1)] = v
        return out

    def close(self) -> None:
        self.envoy.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wasm_memories_kib(pid: int) -> list[int]:
    """Size in KiB of each V8 Wasm linear memory (one per VM: the base VM, the
    main thread's and the worker's). V8 reserves a memory with its guard
    region as one ~8 GiB anonymous mapping; the accessible part (the current
    `memory.size`) is the read-write mapping right before the PROT_NONE rest.
    A linear memory only grows, so this is the VM's peak."""
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        head = line.split()
        start, end = (int(x, 16) for x in head[0].split("-"))
        maps.append((start, end, head[1], len(head) < 6))
    out = []
    for prev, cur in zip(maps, maps[1:]):
        guard = cur[3] and cur[2] == "---p" and cur[1] - cur[0] >= 4 << 30
        if guard and prev[3] and prev[2] == "rw-p" and prev[1] == cur[0]:
            out.append((prev[1] - prev[0]) // 1024)
    return sorted(out, reverse=True)


# --------------------------------------------------------------- load tools


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
    expected = {c for _, _, c in proxy.table.requests()}
    if proxy.expect_default:
        expected = {cluster(i, "dev") for i in proxy.table.hot()}
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


# ----------------------------------------------------------------- phases


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client")) if not shutil.which(tool)]
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    cmd = ["apt-get", "install", "-y", "-q"] + missing
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
        subprocess.run(cmd, capture_output=True, check=True)


def check_built() -> None:
    for p, how in ((harness.WASM, "./build.sh"), (harness.TESTAPP, "cargo build --release -p envlane-testapp")):
        if not p.exists():
            sys.exit(f"{p} is missing: run `{how}` first (./build.sh bench does)")


def start_upstream(workdir: Path, name: str, show: str, h2: bool = False) -> App:
    with on_cpu(LOAD_CPU):
        return App(name, "upstream", "bench", workdir, show=show, h2=h2)


def smoke(proxy: Proxy) -> None:
    """One request per distinct kind must answer 200 before measuring."""
    for host, env, _ in proxy.table.requests()[:3]:
        status, _, body = harness.http_get(proxy.url(), {"host": host, "x-virtual-env": env})
        if status != 200:
            raise RuntimeError(f"{proxy.variant} {host} {env}: HTTP {status} {body[:200]}")


NOOP_MARK = "    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {\n"


def build_noop_wasm(workdir: Path) -> tuple[Path | None, str]:
    """A diagnostic build of the filter, out of tree (src/ is not touched):
    the same module with `on_http_request_headers` returning at once. It
    costs what any Wasm filter costs in Envoy (per-stream context, the VM
    callbacks), none of envlane's work."""
    tree = workdir / "noop-src"
    tree.mkdir()
    shutil.copytree(ROOT / "src", tree / "src")
    (tree / "benches").mkdir()
    shutil.copy(ROOT / "benches" / "resolve.rs", tree / "benches" / "resolve.rs")
    shutil.copy(ROOT / "Cargo.lock", tree / "Cargo.lock")
    manifest = re.sub(r"members\s*=\s*\[[^\]]*\]", 'members = ["."]', (ROOT / "Cargo.toml").read_text())
    (tree / "Cargo.toml").write_text(manifest)
    filt = (tree / "src" / "filter.rs").read_text()
    if NOOP_MARK not in filt:
        return None, "noop diagnostic skipped: on_http_request_headers not found in src/filter.rs"
    filt = filt.replace(NOOP_MARK, "    #[allow(unreachable_code)]\n" + NOOP_MARK + "        return Action::Continue;\n", 1)
    (tree / "src" / "filter.rs").write_text(filt)
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / "bench-noop"))
    log("building the no-op diagnostic filter (out of tree, target/bench-noop)")
    out = subprocess.run(["cargo", "build", "-j", "1", "--quiet", "--target", "wasm32-wasip1", "--profile", "wasm", "-p", "envlane"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    built = ROOT / "target" / "bench-noop" / "wasm32-wasip1" / "wasm" / "envlane.wasm"
    if out.returncode != 0 or not built.exists():
        return None, f"noop diagnostic skipped: build failed: {out.stderr.strip()[-300:]}"
    dest = workdir / "envlane-noop.wasm"
    shutil.copy(built, dest)
    return dest, ""


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


def per_request(args, workdir: Path, upstream: App, results: dict[str, Result]) -> None:
    main = Table(args.services, 10)
    # B passthrough (a diagnostic): the same filter and table, but the
    # requested hosts are not in it, so the filter reads the headers and
    # changes nothing (no header set, no route cache clear): what the Wasm
    # filter costs before it routes.
    passthrough = main.config("passthrough")
    for svc in passthrough["services"]:
        svc["host"] = "not-" + svc["host"]
    plan: list[tuple[str, str, Table, dict | None]] = [
        ("A", "A", main, None),
        ("B", "B", main, None),
        ("C", "C", main, None),
        ("D", "D", main, None),
        ("B", "B passthrough", main, passthrough),
        ("B", "B no-op filter", main, None),
        ("B", "B 10 pairs", Table(1, 10), None),
        ("B", "B 100k pairs", Table(10 * args.services, 10), None),
        ("B", "B 100 envs", Table(args.services_100, 100), None),
        ("C", "C 100 envs", Table(args.services_100, 100), None),
    ]
    if args.only:
        plan = [p for p in plan if p[1] in args.only or f"{p[1]} c=1" in args.only]
    noop = None
    if any(p[1] == "B no-op filter" for p in plan) and "noop" not in args.skip:
        noop, why = build_noop_wasm(workdir)
        if why:
            log(why)
    plan = [p for p in plan if p[1] != "B no-op filter" or noop]
    proxies: dict[str, tuple[Proxy, Path]] = {}
    try:
        # All Envoys up at once (idle ones cost nothing), so the runs can be interleaved.
        for variant, name, table, plugin_config in plan:
            log(f"{name}: {table.services} services x {table.envs} envs = {table.pairs} pairs; starting Envoy")
            proxy = Proxy(variant, table, upstream.port, workdir, plugin_config=plugin_config, name=name,
                          wasm=noop if name == "B no-op filter" else None)
            proxy.expect_default = plugin_config is passthrough or name == "B no-op filter"
            proxies[name] = (proxy, wrk_script(workdir / f"wrk-{variant}-{table.label}.lua", table.requests()))
            log(f"{name}: Envoy ready in {proxy.startup_s:.1f} s, RSS {rss_kib(proxy.pid) / 1024:.0f} MiB")
            smoke(proxy)
        runs = [(name, name, CONNS) for name in proxies]
        runs += [(f"{name} c=1", name, 1) for name in ("A", "B", "C", "D") if name in proxies]
        if args.only:
            runs = [r for r in runs if r[0] in args.only]
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
            proxy = Proxy(variant, table, upstream.port, workdir, h2_upstream=True, name=name)
            proxies[name] = (proxy, Path())
            smoke(proxy)
        measure(proxies, [(name, name, 0) for name in proxies], args, results, h2=True, workdir=workdir)
    finally:
        for proxy, _ in proxies.values():
            proxy.close()
        upstream.close()


def envoy_instructions(args, workdir: Path, upstream: App) -> list[tuple[str, float]]:
    """Instructions Envoy executes per request (all its threads), counted by
    callgrind: immune to the other load on the machine, unlike req/s. Each
    variant's Envoy runs under `valgrind --tool=callgrind`; after 300 warm-up
    requests the counters are zeroed, then N sequential requests (the same
    mix as the wrk runs, one keep-alive connection) are counted."""
    if not shutil.which("valgrind"):
        return []
    n = args.instructions_requests
    main = Table(args.services, 10)
    wrapper = workdir / "envoy-callgrind.sh"
    real = harness.envoy_bin()
    wrapper.write_text("#!/bin/sh\nexec valgrind --tool=callgrind --smc-check=all-non-file --dump-instr=no "
                       f"--callgrind-out-file={workdir}/callgrind.envoy.%p {real} \"$@\"\n")
    wrapper.chmod(0o755)
    passthrough = main.config("passthrough")
    for svc in passthrough["services"]:
        svc["host"] = "not-" + svc["host"]
    noop = None
    variants: list[tuple[str, str, Table, dict | None]] = [("A", "A", main, None), ("B", "B", main, None), ("C", "C", main, None),
                                                          ("D", "D", main, None), ("B", "B passthrough", main, passthrough)]
    if "noop" not in args.skip:
        noop = workdir / "envlane-noop.wasm"
        if not noop.exists():
            noop, _ = build_noop_wasm(workdir)
        if noop:
            variants.append(("B", "B no-op filter", main, None))
    # 100 envs per service on 100 services (10,000 routes for C): per request
    # C scans the routes of one virtual host, so the number of services does
    # not matter, and Envoy loads 100,000 routes too slowly under callgrind.
    small = Table(min(args.services_100, 100), 100)
    variants.append(("C", "C 100 envs", small, None))
    variants.append(("B", "B 100 envs", small, None))
    # Flatness in the table size, counted: only when asked for by name
    # (`--only`), as loading 100,000 pairs under callgrind takes minutes.
    if args.only:
        variants.append(("B", "B 10 pairs", Table(1, 10), None))
        variants.append(("B", "B 100k pairs", Table(10 * args.services, 10), None))
    out = []
    old = os.environ.get("ENVOY_BIN")
    os.environ["ENVOY_BIN"] = str(wrapper)
    try:
        for variant, name, table, plugin_config in variants:
            if args.only and name not in args.only:
                continue
            log(f"instructions: {name} (Envoy under callgrind)")
            proxy = Proxy(variant, table, upstream.port, workdir, plugin_config=plugin_config, name=f"cg {name}",
                          wasm=noop if name == "B no-op filter" else None, quiet_stats=True)
            try:
                reqs = table.requests()
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)

                def go(k: int) -> None:
                    for i in range(k):
                        host, env, _ = reqs[i % len(reqs)]
                        conn.request("GET", "/", headers={"host": host, "x-virtual-env": env})
                        resp = conn.getresponse()
                        resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{name}: HTTP {resp.status}")

                def counted(action) -> tuple[int, float]:
                    """Instructions and wall seconds of `action`, from zeroed counters."""
                    subprocess.run(["callgrind_control", "-z", str(proxy.pid)], capture_output=True, timeout=300, check=True)
                    t0 = time.monotonic()
                    action()
                    secs = time.monotonic() - t0
                    before = set(workdir.glob(f"callgrind.envoy.{proxy.pid}.*"))
                    subprocess.run(["callgrind_control", "-d", str(proxy.pid)], capture_output=True, timeout=300, check=True)
                    new = sorted(set(workdir.glob(f"callgrind.envoy.{proxy.pid}.*")) - before, key=lambda f: int(f.name.rsplit(".", 1)[1]))
                    m = re.search(r"^(?:summary|totals): (\d+)", new[-1].read_text(errors="replace"), re.M) if new else None
                    return (int(m.group(1)) if m else 0), secs

                go(300)
                busy, busy_s = counted(lambda: go(n))
                # What Envoy does by itself per second (timers), subtracted.
                idle, idle_s = counted(lambda: time.sleep(3))
                conn.close()
                if busy:
                    per = (busy - idle / idle_s * busy_s) / n
                    out.append((name, per))
                    log(f"instructions: {name}: {per:,.0f} per request ({busy / n:,.0f} before subtracting "
                        f"{idle / idle_s:,.0f}/s idle over {busy_s:.1f} s)")
            finally:
                proxy.close()
    finally:
        if old is None:
            os.environ.pop("ENVOY_BIN", None)
        else:
            os.environ["ENVOY_BIN"] = old
    return out


@dataclass
class Reload:
    pairs: int
    live_ms: float
    log_ms: float | None
    log_all_ms: list[float]
    rss_before_mib: float
    rss_after_mib: float
    wasm_kib: list[int]
    config_bytes: int


def config_changes(args, workdir: Path) -> list[Reload]:
    """From os.replace() of the ECDS file to the first request that routes by
    the new table. The probe's env `dev.team0` gets a new subset name in every
    push, served by its own upstream. The routes map every push's cluster from
    the start (as istiod would push the route EnvoyFilters along)."""
    sizes = [Table(100, 10), Table(1000, 10), Table(10000, 10)]
    pushes = len(sizes)
    probe_clusters = [cluster(0, f"push{k}") for k in range(pushes + 1)]
    # One upstream per push: the answer `[upstream @ pushK]` tells where it went.
    apps = []
    small = Table(1, 10)
    out = []
    try:
        with on_cpu(LOAD_CPU):
            for k in range(pushes + 1):
                apps.append(App(f"upstream-push{k}", "upstream", f"push{k}", workdir, show="x-bench-none"))
        every_push = small.config("routes")
        every_push["envs"] += [{"name": f"dev.team0.push{k}", "subset": f"push{k}"} for k in range(pushes + 1)]
        every_push["services"][0]["envs"] += list(range(small.envs, small.envs + pushes + 1))
        proxy = Proxy("B", small, apps[0].port, workdir, extra_clusters={c: a.port for c, a in zip(probe_clusters, apps)},
                      plugin_config=small.config("push0", {"dev.team0": "push0"}), route_table=every_push)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
            headers = {"host": f"{svc_name(0)}:{PORT}", "x-virtual-env": "dev.team0"}

            def routed_to() -> str:
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                return resp.read().decode()

            first = routed_to()
            if "@ push0]" not in first:
                raise RuntimeError(f"probe before any push went elsewhere: {first}")
            for k, table in enumerate(sizes, start=1):
                text = ecds_resource(table.config(f"push{k}", {"dev.team0": f"push{k}"}), wasm=WASM_MODULE)
                log_len = len(proxy.envoy.process.log())
                rss_before = rss_kib(proxy.pid) / 1024
                t0 = time.monotonic()
                wall0 = time.time()
                write_atomically(proxy.ecds_path, text)
                deadline = t0 + 60
                while f"@ push{k}]" not in routed_to():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"push of {table.pairs} pairs not live after 60 s")
                live = (time.monotonic() - t0) * 1000
                stamps: list[float] = []
                harness.wait_for(lambda: f"revision=push{k} " in proxy.envoy.process.log()[log_len:], "table log line", 30)
                for m in re.finditer(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\].*envlane: loaded table revision=push%d " % k,
                                     proxy.envoy.process.log()[log_len:], re.M):
                    stamp = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
                    stamps.append((stamp - wall0) * 1000)
                log_ms = max(stamps) if stamps else None
                time.sleep(0.5)  # let the old config's contexts go
                r = Reload(table.pairs, live, log_ms, sorted(stamps), rss_before, rss_kib(proxy.pid) / 1024, wasm_memories_kib(proxy.pid), len(text))
                out.append(r)
                log(f"push {table.pairs} pairs ({len(text) / 1024:.0f} KiB ECDS): live in {live:.1f} ms; "
                    f"RSS {r.rss_before_mib:.0f} -> {r.rss_after_mib:.0f} MiB; Wasm memories {[f'{x / 1024:.1f} MiB' for x in r.wasm_kib]}")
            conn.close()
        finally:
            proxy.close()
    finally:
        for a in apps:
            a.close()
    return out


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
    log("building envlane-sync (release, -j 1)")
    build = subprocess.run(["cargo", "build", "-j", "1", "--release", "-p", "envlane-sync"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if build.returncode != 0 or not binary.exists():
        return None, f"TODO: envlane-sync does not build yet: {build.stderr.strip().splitlines()[-1:]}"
    helptext = subprocess.run([str(binary), "render", "--help"], capture_output=True, text=True, timeout=30)
    if helptext.returncode != 0 or "--filename" not in helptext.stdout:
        return None, "TODO: envlane-sync has no `render -f` subcommand yet"
    fixture = workdir / "cluster-10k-pods.json"
    sync_fixture(fixture, 10_000, 2_000)
    time_bin = "/usr/bin/time"
    if not Path(time_bin).exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "time"], capture_output=True)
    if not Path(time_bin).exists():
        return None, "TODO: /usr/bin/time missing (apt-get install time)"
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


# ----------------------------------------------------------------- report


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0")
    envoy_version = subprocess.run([harness.envoy_bin(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": int(mem) / 1024 / 1024, "envoy": envoy_version[-1] if envoy_version else "?",
            "rustc": rustc, "kernel": platform.release(), "loadavg": os.getloadavg()}


def fmt_row(name: str, r: Result) -> str:
    ok = "-" if r.routed_ok is None else f"{r.routed_ok:.0%}"
    return (f"| {name} | {r.rps:,.0f} | {r.p50:.0f} | {r.p99:.0f} | {r.p999:.0f} | {r.envoy_cpu:.0%} | "
            f"{r.cpu_us_per_req:.1f} | {r.rss_mib:.0f} | {r.errors} | {ok} |")


def report(args, m: dict, results: dict[str, Result], instructions: list[tuple[str, float]], reloads: list[Reload], crit: Native,
           render: dict | None, render_note: str, load_before: tuple, elapsed: float) -> str:
    L = []
    L.append(f"machine: nproc={m['nproc']} cpu={m['cpu']} mem={m['mem_gib']:.1f} GiB kernel={m['kernel']}")
    L.append(f"versions: {m['envoy']}; {m['rustc']}")
    L.append(f"load average before/after: {' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    L.append(f"settings: {args.duration:g} s measured per run in {args.rounds} interleaved rounds of {max(1, round(args.duration / max(1, args.rounds)))} s (warm-up {args.warmup:g} s before round 1); wrk -t1 -c{CONNS} (HTTP/1.1), "
             f"h2load -t1 -c8 -m4 (h2c); Envoy --concurrency 1 on CPU {ENVOY_CPU}, load tool and upstream on CPU {LOAD_CPU}; total {elapsed:.0f} s")
    L.append("")
    L.append("## Per request (real Envoy, loopback)")
    L.append("")
    L.append("| run | req/s | p50 µs | p99 µs | p99.9 µs | Envoy CPU | Envoy CPU µs/req | Envoy RSS MiB | errors | routed as designed |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        L.append(fmt_row(name, r))
    L.append("")
    L.append("req/s of each round (rounds are interleaved across the runs above; spread = other load on the machine):")
    L.append("")
    for name, r in results.items():
        L.append(f"- {name}: {r.note}")
    L.append("")

    def ratio(a: str, b: str) -> str:
        if a in results and b in results and results[b].rps:
            return f"{results[a].rps / results[b].rps:.3f}"
        return "n/a"

    def cpu_diff(a: str, b: str) -> str:
        if a in results and b in results:
            return f"{results[a].cpu_us_per_req - results[b].cpu_us_per_req:+.1f}"
        return "n/a"

    def p99_diff(a: str, b: str) -> str:
        if a in results and b in results:
            return f"{results[a].p99 - results[b].p99:+.0f}"
        return "n/a"

    def round_ratio(a: str, b: str) -> str:
        ra = results[a].raw.get("rounds", []) if a in results else []
        rb = results[b].raw.get("rounds", []) if b in results else []
        qs = sorted(x["rps"] / y["rps"] for x, y in zip(ra, rb) if y["rps"])
        return f"{qs[len(qs) // 2]:.3f} ({qs[0]:.2f}–{qs[-1]:.2f})" if qs else "n/a"

    L.append("| comparison | throughput ratio (totals) | median of per-round ratios (min–max) | Δ Envoy CPU µs/req | Δ p99 µs (c=32) | Δ p99 µs (c=1) |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for a, b in (("B", "A"), ("B", "C"), ("B", "D"), ("C", "A"), ("D", "A"), ("B passthrough", "A"), ("B", "B passthrough"), ("B no-op filter", "A"), ("B", "B no-op filter"), ("B 100 envs", "C 100 envs"), ("B 10 pairs", "A"), ("B 100k pairs", "A"), ("B h2", "A h2")):
        if a in results and b in results:
            L.append(f"| {a} / {b} | {ratio(a, b)} | {round_ratio(a, b)} | {cpu_diff(a, b)} | {p99_diff(a, b)} | {p99_diff(a + ' c=1', b + ' c=1')} |")
    L.append("")
    if instructions:
        base = dict(instructions).get("A")
        L.append(f"## Envoy instructions per request (callgrind, all Envoy threads, {args.instructions_requests} sequential requests after 300 warm-up, "
                 "no periodic stats flush, idle rate subtracted; 100 envs: 100 services x 100 envs)")
        L.append("")
        L.append("| run | instructions/request | vs A |")
        L.append("|---|---:|---:|")
        for name, x in instructions:
            L.append(f"| {name} | {x:,.0f} | {'' if not base else f'{x - base:+,.0f} ({x / base:.2f}x)'} |")
        L.append("")
    if reloads:
        L.append("## Per config change (B, one Envoy, pushes in growing order)")
        L.append("")
        L.append("| pairs | ECDS file KiB | live after write, ms | `loaded table` log lines after write (one per VM), ms | Envoy RSS before → after MiB | Wasm linear memory per VM, MiB |")
        L.append("|---:|---:|---:|---:|---:|---|")
        for r in reloads:
            logms = ", ".join(f"{x:.0f}" for x in r.log_all_ms) or "n/a"
            L.append(f"| {r.pairs:,} | {r.config_bytes / 1024:.0f} | {r.live_ms:.1f} | {logms} | {r.rss_before_mib:.0f} → {r.rss_after_mib:.0f} | "
                     f"{', '.join(f'{x / 1024:.1f}' for x in r.wasm_kib) or 'not found'} |")
        L.append("")
    L.append("## resolve / plan natively (criterion, ns per call)")
    L.append("")
    if crit.ns:
        L.append("| bench | ns/call |")
        L.append("|---|---:|")
        for n, ns in crit.ns:
            L.append(f"| {n} | {ns:,.0f} |")
        L.append("")
    if crit.instructions:
        L.append("Instructions per call (callgrind, n=20,000 calls minus the same run with 0 calls):")
        L.append("")
        L.append("| call | instructions |")
        L.append("|---|---:|")
        for n, x in crit.instructions:
            L.append(f"| {n} | {x:,.0f} |")
        L.append("")
    if crit.allocs:
        L.append("Heap allocations per call (counting allocator): " + "; ".join(a for a in crit.allocs if "depth=3" in a))
        L.append("")
    if crit.config:
        L.append("Loading a pushed table natively (`config::parse` + `RoutingTable::compile`, one VM's work; heap from the counting allocator):")
        L.append("")
        L.append("| pairs | JSON bytes | parse ms | compile ms | peak heap MiB | peak while parsing MiB | table kept MiB |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for line in crit.config:
            kv = dict(x.split("=") for x in line.split())
            L.append(f"| {kv['pairs']} | {int(kv['json_bytes']):,} | {float(kv['parse_ms']):.1f} | {float(kv['compile_ms']):.1f} | "
                     f"{int(kv['peak_bytes']) / 2**20:.1f} | {int(kv['parse_peak_bytes']) / 2**20:.1f} | {int(kv['table_bytes']) / 2**20:.1f} |")
        L.append("")
    if crit.error:
        L.append(crit.error)
        L.append("")
    L.append("## envlane-sync render, 10,000 pods / 2,000 services")
    L.append("")
    if render:
        L.append(f"- render alone (its own `--stats` timer, input already parsed): best {render['render_ms']} ms; runs {render['render_ms_all']}")
        L.append(f"- whole `envlane-sync render -f` process (read + parse {render['fixture_bytes'] / 1e6:.1f} MB JSON, render, write "
                 f"{render['output_bytes'] / 1e3:.0f} kB YAML): best {render['wall_ms_min']:.0f} ms wall; runs {render['wall_ms_all']}")
        L.append(f"- peak RSS (/usr/bin/time -v): {render['peak_rss_kib_max'] / 1024:.1f} MiB")
        L.append(f"- it said: `{render['stats']}`")
    else:
        L.append(render_note or "(skipped)")
    L.append("")
    L.append("## Budgets")
    L.append("")
    L.extend(budgets(results, reloads, crit, render))
    return "\n".join(L)


def budgets(results: dict[str, Result], reloads: list[Reload], crit: Native, render: dict | None) -> list[str]:
    out = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- {'MET' if ok else ('MISSED' if ok is not None else 'NOT MEASURED')}: {text}")

    r = results.get
    if r("A") and r("B"):
        line(r("B").rps >= 0.95 * r("A").rps, f"B ≥ 95% of A's throughput: B/A = {r('B').rps / r('A').rps:.3f}")
    else:
        line(None, "B ≥ 95% of A's throughput")
    if r("A c=1") and r("B c=1"):
        d = r("B c=1").p99 - r("A c=1").p99
        line(d <= 50, f"p99 added ≤ 50 µs (one connection, no queueing): B − A = {d:+.0f} µs")
    else:
        line(None, "p99 added ≤ 50 µs")
    sizes = [k for k in ("B 10 pairs", "B", "B 100k pairs") if r(k)]
    if len(sizes) == 3:
        cpus = [r(k).cpu_us_per_req for k in sizes]
        rps = [r(k).rps for k in sizes]
        flat = max(rps) / min(rps) <= 1.05 and max(cpus) - min(cpus) <= 2.0
        line(flat, f"flat from 10 to 100,000 pairs: req/s {', '.join(f'{x:,.0f}' for x in rps)}; Envoy CPU µs/req "
                   f"{', '.join(f'{x:.1f}' for x in cpus)} (flat = req/s within 5% and CPU within 2 µs)")
    else:
        line(None, "flat from 10 to 100,000 pairs")
    if r("B") and r("C"):
        q = r("B").rps / r("C").rps
        line(q >= 0.97, f"B within 3% of C at 10 envs/service: B/C = {q:.3f}")
    else:
        line(None, "B within 3% of C at 10 envs/service")
    if r("B 100 envs") and r("C 100 envs"):
        q = r("B 100 envs").rps / r("C 100 envs").rps
        line(q > 1.0, f"B faster than C at 100 envs/service: B/C = {q:.3f}")
    else:
        line(None, "B faster than C at 100 envs/service")
    if r("B") and r("D"):
        q = r("B").rps / r("D").rps
        line(q > 1.0, f"B faster than D (Lua): B/D = {q:.3f}")
    else:
        line(None, "B faster than D")
    big = [x for x in reloads if x.pairs >= 100_000]
    if big:
        line(big[0].live_ms < 200, f"100k pairs live in < 200 ms: {big[0].live_ms:.0f} ms")
        vm = max(big[0].wasm_kib) / 1024 if big[0].wasm_kib else None
        if vm is None:
            line(None, "VM memory < 16 MiB (Wasm memory mapping not found)")
        else:
            line(vm < 16, f"VM memory < 16 MiB at 100k pairs: largest Wasm linear memory {vm:.1f} MiB")
    else:
        line(None, "100k pairs live in < 200 ms; VM memory < 16 MiB")
    d4 = [ns for n, ns in crit.ns if n.startswith("resolve/") and n.endswith("depth=4")]
    if d4:
        line(max(d4) <= 100, f"resolve ≤ 100 ns at depth 4: {', '.join(f'{x:.0f}' for x in d4)} ns (10 / 1k / 100k pairs)")
    else:
        line(None, "resolve ≤ 100 ns at depth 4")
    if render and render.get("render_ms") is not None:
        line(render["render_ms"] < 100, f"render of 10k pods < 100 ms: {render['render_ms']:.1f} ms render "
                                        f"({render['wall_ms_min']:.0f} ms for the whole process incl. parsing the JSON)")
    else:
        line(None, "render of 10k pods < 100 ms (envlane-sync render not available: TODO)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s per run, 1 s warm-up, short criterion")
    ap.add_argument("--services", type=int, default=1000, help="services of the main table (x 10 envs; default 1000)")
    ap.add_argument("--services-100", type=int, default=100,
                    help="services of the 100-envs-per-service table (default 100: C at 1,000 x 100 = 100,000 Istio-shaped routes takes Envoy minutes to load)")
    ap.add_argument("--only", nargs="*", help="only these per-request runs (e.g. A B 'C 100 envs')")
    ap.add_argument("--skip", nargs="*", default=[], choices=["http1", "h2", "reload", "criterion", "callgrind", "render", "noop"])
    ap.add_argument("--envoy-instructions", action="store_true",
                    help="also count Envoy's instructions per request under callgrind for A/B/C/D (about 8 extra minutes)")
    ap.add_argument("--instructions-requests", type=int, default=1000, help="requests counted per variant under callgrind")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per run (duration is split across them; default 5)")
    ap.add_argument("--crit-time", type=float, default=2.0, help="criterion measurement seconds per bench")
    ap.add_argument("--crit-warmup", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--wasm", type=Path, default=harness.WASM, help="the filter module for B (default dist/envlane.wasm)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup, args.crit_time, args.crit_warmup = 2.0, 1.0, 0.5, 0.2
        args.rounds = min(args.rounds, 2)
    global WASM_MODULE
    WASM_MODULE = args.wasm.resolve()
    started = time.monotonic()
    load_before = os.getloadavg()
    ensure_tools()
    check_built()
    m = machine()
    results: dict[str, Result] = {}
    instructions: list[tuple[str, float]] = []
    reloads: list[Reload] = []
    crit = Native()
    render, render_note = None, "(skipped)"
    workdir = Path(tempfile.mkdtemp(prefix="envlane-bench-"))
    try:
        if "http1" not in args.skip:
            upstream = start_upstream(workdir, "upstream", "x-bench-none")
            try:
                per_request(args, workdir, upstream, results)
            finally:
                upstream.close()
        if args.envoy_instructions:
            upstream = start_upstream(workdir, "upstream-cg", "x-bench-none")
            try:
                instructions = envoy_instructions(args, workdir, upstream)
            finally:
                upstream.close()
        if "h2" not in args.skip:
            per_request_h2(args, workdir, results)
        if "reload" not in args.skip:
            reloads = config_changes(args, workdir)
        if "criterion" not in args.skip:
            crit = criterion(args)
        if "render" not in args.skip:
            render, render_note = sync_render(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, m, results, instructions, reloads, crit, render, render_note, load_before, time.monotonic() - started)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": m, "results": {k: vars(v) for k, v in results.items()}, "instructions": instructions, "reloads": [vars(r) for r in reloads],
            "criterion": vars(crit), "render": render, "render_note": render_note,
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
