"""Gateway mode's cost: ONE shared gateway Envoy carrying every hop
(integration/gateway.py GatewayMesh) against one Envoy sidecar per calling
pod (integration/harness.py Mesh), same topology, same table, same requests.

    python3 benches/run.py gateway [--gw-requests N] [--gw-rounds R] [--gw-concurrency 1 4]

The topology is alibaba/virtual-environment's demo (integration/topologies.py
ALIBABA): client -> node -> go -> java, 7 app pods, 3 Envoy passes per
request in both layouts. Sidecars: the client's, node's and go's pods have one
each (5 Envoys: client, node-dev, node-dev.proj1, go-dev, go-dev.proj2);
gateway: one Envoy, every app pod on its own loopback IP, the caller table
built from the pods' env labels.

Request mix, cycled in order (the same 9 kinds in both layouts; every answer
is checked against the hops the demo expects):

- 6 from the unlabelled client: the demo's cases (`x-virtual-env` dev.proj1,
  dev.proj1.feature1, dev.proj2, dev, dev.proj1.user9, and none);
- 3 without a header from callers labelled dev.proj1, dev.proj1.feature1 and
  dev.proj2 (integration/demo_gateway.py CALLERS). The gateway finds their env
  in its caller table by the TCP peer address. In the sidecar layout a
  labelled pod's own sidecar would take the env from its label and add the
  header; the harness has one client sidecar, so these requests are sent with
  that header (the same first-hop work: one env found, one header added or
  present).

Every Envoy runs `--concurrency 1` (one worker). Nothing is pinned: the two
cores may be shared, so every process is as nice as the bench (`nice -n 10`
in the documented command). Figures per layout and client concurrency, over
interleaved rounds (layout A round, layout B round, ...; drift hits both):
requests/s, p50/p99 latency (client-side, Python http.client on keep-alive
connections, one per worker and source IP), CPU seconds of ALL the layout's
Envoy processes (utime+stime from /proc/PID/stat, before/after each round;
clock-tick resolution, so rounds are thousands of requests) and their
context switches (all threads), the CPU seconds of the 7 apps, filter decisions counted by the Envoys, the number of Envoy
processes (from /proc: the ones whose bootstrap is in the layout's workdir)
and their total RSS after the load, and the Envoys' idle CPU (both layouts
up, no requests).

Then the caller table natively (benches/callers.rs, unless `--skip
criterion`): criterion ns per call, allocations, table compile time and heap
by caller pods (10 to 100k), and, with valgrind, instructions per call under
callgrind (deterministic: the flatness figure on a shared machine).

Writes the figures to dist/bench/results.json under "gateway" (merged: other
keys are kept) and prints a markdown table (report.gateway_table).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .common import DIST_BENCH, RESULTS, ROOT, cpu_seconds, harness, log, rss_kib

import gateway as gw  # noqa: E402  (integration/gateway.py; common put integration/ on sys.path)
from demo_gateway import CALLERS  # noqa: E402
from topologies import ALIBABA, ALIBABA_CASES, load_config  # noqa: E402

HOPS = 3  # Envoy passes per request: client->node, node->go, go->java


def time_wait_by_ip(ips: set[str]) -> dict[str, int]:
    """TCP sockets in TIME_WAIT by local IP (/proc/net/tcp), for `ips`.

    The apps open one connection per outbound call and close it, so each
    leaves a TIME_WAIT socket for 60 s on its side. In the gateway layout an
    app binds that connection to its pod IP before connecting (testapp
    `--source-ip`), and bind() must find a free port of that IP among the
    28k ephemeral ones: with ~15k of them in TIME_WAIT the port search makes
    the apps (not Envoy) slow. A real pod has its own network namespace; on
    one loopback the run must stay below that, which this figure shows."""
    counts = dict.fromkeys(ips, 0)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[3] == "06":
            raw = bytes.fromhex(f[1].split(":")[0])
            ip = ".".join(str(b) for b in reversed(raw))
            if ip in counts:
                counts[ip] += 1
    return counts


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all the process's threads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except OSError:
            continue  # a thread that ended
    return total


@dataclass(frozen=True)
class Kind:
    """One request of the mix: who sends it (gateway layout) and with which
    header; what the sidecar layout sends; the hops expected."""

    caller: str  # GatewayMesh pod name
    gateway_headers: dict
    sidecar_headers: dict
    expected: str


def request_kinds() -> list[Kind]:
    kinds = []
    for env, want in ALIBABA_CASES.items():
        h = {"x-virtual-env": env} if env else {}
        kinds.append(Kind(gw.CLIENT, h, h, want))
    for name, env in CALLERS.items():
        kinds.append(Kind(name, {}, {"x-virtual-env": env}, ALIBABA_CASES[env]))
    return kinds


class Layout:
    """A running mesh seen from the load: where requests go, from which
    source IP, and which processes are its Envoys and apps."""

    name: str
    mesh: object

    def target(self) -> tuple[str, int]:
        raise NotImplementedError

    def source_ip(self, kind: Kind) -> str | None:
        raise NotImplementedError

    def headers(self, kind: Kind) -> dict:
        raise NotImplementedError

    def envoys(self) -> list[harness.Envoy]:
        raise NotImplementedError

    def envoy_pids(self) -> list[int]:
        return [e.process.proc.pid for e in self.envoys()]

    def app_pids(self) -> list[int]:
        return [a.process.proc.pid for a in self.mesh.apps.values()]

    def os_envoy_pids(self) -> list[int]:
        """What /proc says runs with a bootstrap in this layout's workdir."""
        return gw.envoy_processes_under(self.mesh.workdir)

    def decisions(self) -> int:
        """Filter decisions (wasmcustom.envlane.decision.*) over every Envoy."""
        return sum(sum(e.stats("wasmcustom.envlane.decision").values()) for e in self.envoys())


class GatewayLayout(Layout):
    name = "gateway"

    def __init__(self, mesh: gw.GatewayMesh):
        self.mesh = mesh

    def target(self):
        return gw.GATEWAY_IP, self.mesh.gateway_port

    def source_ip(self, kind):
        return self.mesh.pods[kind.caller].ip

    def headers(self, kind):
        return kind.gateway_headers

    def envoys(self):
        return self.mesh.envoys


class SidecarLayout(Layout):
    name = "sidecars"

    def __init__(self, mesh: harness.Mesh):
        self.mesh = mesh

    def target(self):
        return "127.0.0.1", self.mesh.client_port

    def source_ip(self, kind):
        return None

    def headers(self, kind):
        return kind.sidecar_headers

    def envoys(self):
        return list(self.mesh.sidecars.values())


@dataclass
class Tally:
    """One layout at one concurrency, summed over its rounds."""

    requests: int = 0
    errors: int = 0
    wrong: int = 0
    wall_s: float = 0.0
    envoy_cpu_s: float = 0.0
    app_cpu_s: float = 0.0
    decisions: int = 0
    envoy_ctxsw: int = 0
    latencies_us: list[float] = field(default_factory=list)
    rounds_rps: list[float] = field(default_factory=list)
    rounds_app_cpu_us: list[float] = field(default_factory=list)


class Client:
    """Keep-alive HTTP/1.1 connections of one worker, one per source IP."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.conns: dict[str | None, http.client.HTTPConnection] = {}

    def _conn(self, ip: str | None) -> http.client.HTTPConnection:
        c = self.conns.get(ip)
        if c is None:
            host, port = self.layout.target()
            c = http.client.HTTPConnection(host, port, timeout=10, source_address=(ip, 0) if ip else None)
            self.conns[ip] = c
        return c

    def send(self, kind: Kind) -> tuple[bool, str]:
        ip = self.layout.source_ip(kind)
        c = self._conn(ip)
        try:
            c.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
            c.putheader("host", "node:8080")
            for k, v in self.layout.headers(kind).items():
                c.putheader(k, v)
            c.endheaders()
            r = c.getresponse()
            body = r.read().decode(errors="replace").strip()
            if r.getheader("connection", "").lower() == "close":
                self.drop(ip)
            return r.status == 200, body
        except (OSError, http.client.HTTPException) as e:
            self.drop(ip)
            return False, f"error: {e}"

    def drop(self, ip: str | None) -> None:
        c = self.conns.pop(ip, None)
        if c is not None:
            c.close()

    def close(self) -> None:
        for ip in list(self.conns):
            self.drop(ip)


def run_round(layout: Layout, kinds: list[Kind], n: int, concurrency: int, tally: Tally) -> None:
    """n requests of the mix (in order) from `concurrency` workers; adds the
    figures of this round to `tally`."""
    counter = itertools.count()
    lock = threading.Lock()
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    bad = [[0, 0] for _ in range(concurrency)]  # errors, wrong answers

    def worker(w: int) -> None:
        client = Client(layout)
        try:
            while True:
                with lock:
                    k = next(counter)
                if k >= n:
                    return
                kind = kinds[k % len(kinds)]
                t0 = time.perf_counter_ns()
                ok, body = client.send(kind)
                lat[w].append((time.perf_counter_ns() - t0) / 1000)
                if not ok:
                    bad[w][0] += 1
                elif body != kind.expected:
                    bad[w][1] += 1
        finally:
            client.close()

    envoys, apps = layout.envoy_pids(), layout.app_pids()
    decisions0 = layout.decisions()
    cpu0 = [cpu_seconds(p) for p in envoys], [cpu_seconds(p) for p in apps]
    ctx0 = sum(context_switches(p) for p in envoys)
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    cpu1 = [cpu_seconds(p) for p in envoys], [cpu_seconds(p) for p in apps]
    tally.envoy_ctxsw += sum(context_switches(p) for p in envoys) - ctx0
    tally.requests += n
    tally.wall_s += wall
    tally.envoy_cpu_s += sum(cpu1[0]) - sum(cpu0[0])
    tally.app_cpu_s += sum(cpu1[1]) - sum(cpu0[1])
    tally.decisions += layout.decisions() - decisions0
    tally.errors += sum(b[0] for b in bad)
    tally.wrong += sum(b[1] for b in bad)
    for x in lat:
        tally.latencies_us.extend(x)
    tally.rounds_rps.append(n / wall)
    tally.rounds_app_cpu_us.append((sum(cpu1[1]) - sum(cpu0[1])) * 1e6 / n)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def check_answers(layout: Layout, kinds: list[Kind]) -> None:
    """Every kind once, answered as the demo expects; else the figures
    would measure something else."""
    client = Client(layout)
    try:
        for kind in kinds:
            ok, body = client.send(kind)
            if not ok or body != kind.expected:
                raise RuntimeError(f"{layout.name}: {kind} answered {body!r}")
    finally:
        client.close()


def idle_cpu(layouts: list[Layout], seconds: float) -> dict[str, float]:
    """Envoy CPU ms per second with no request (timers, stats flush)."""
    before = {lay.name: sum(cpu_seconds(p) for p in lay.envoy_pids()) for lay in layouts}
    time.sleep(seconds)
    return {lay.name: round((sum(cpu_seconds(p) for p in lay.envoy_pids()) - before[lay.name]) * 1000 / seconds, 2)
            for lay in layouts}


def measure(requests: int, rounds: int, concurrencies: list[int], warmup: int, idle_s: float) -> dict:
    """Starts both layouts, loads them, stops them; returns the figures."""
    if not harness.SYNC.exists():
        raise SystemExit(f"{harness.SYNC} is missing: cargo build --release -p envlane-sync (./build.sh builds it)")
    config = load_config("alibaba")
    kinds = request_kinds()
    started = time.monotonic()
    loadavg_before = os.getloadavg()
    tallies: dict[tuple[str, int], Tally] = {}
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        gmesh = stack.enter_context(gw.GatewayMesh(ALIBABA, config, callers=dict(CALLERS)))
        gateway_start = time.monotonic() - t0
        t0 = time.monotonic()
        smesh = stack.enter_context(harness.Mesh(ALIBABA, config))
        sidecar_start = time.monotonic() - t0
        layouts: list[Layout] = [GatewayLayout(gmesh), SidecarLayout(smesh)]
        log(f"up: gateway in {gateway_start:.1f} s, sidecars in {sidecar_start:.1f} s")
        for lay in layouts:
            check_answers(lay, kinds)
            run_round(lay, kinds, warmup, max(concurrencies), Tally())
        idle = idle_cpu(layouts, idle_s)
        time_wait_max = 0
        for r in range(rounds):
            for c in concurrencies:
                for lay in layouts:
                    tally = tallies.setdefault((lay.name, c), Tally())
                    run_round(lay, kinds, requests, c, tally)
            tw = max(time_wait_by_ip({p.ip for p in gmesh.pods.values()}).values())
            time_wait_max = max(time_wait_max, tw)
            log(f"round {r + 1}/{rounds} done (TIME_WAIT sockets of the busiest pod IP: {tw})")
        shape = {}
        for lay in layouts:
            pids = lay.os_envoy_pids()
            shape[lay.name] = {
                "envoy_processes": len(pids),
                "envoy_processes_started": len(lay.envoys()),
                "envoy_rss_mib": round(sum(rss_kib(p) for p in pids) / 1024, 1),
                "envoy_rss_mib_each": [round(rss_kib(p) / 1024, 1) for p in pids],
                "apps": len(lay.app_pids()),
                "idle_envoy_cpu_ms_per_s": idle[lay.name],
                "workdir": str(lay.mesh.workdir),
            }
        workdirs = {lay.name: lay.mesh.workdir for lay in layouts}
    # Both meshes are closed here (also on error): check with the OS.
    left = {name: len(gw.envoy_processes_under(w)) for name, w in workdirs.items()}
    out = {
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in loadavg_before),
        "loadavg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "nice": os.nice(0),
        "settings": {"requests_per_round": requests, "rounds": rounds, "concurrency": concurrencies, "warmup": warmup,
                     "idle_s": idle_s, "hops": HOPS, "kinds": len(kinds), "envoy_concurrency": 1},
        "startup_s": {"gateway": round(gateway_start, 2), "sidecars": round(sidecar_start, 2)},
        "envoys_left_running": left,
        "time_wait_max_per_pod_ip": time_wait_max,
        "layouts": {},
    }
    for name, s in shape.items():
        s.pop("workdir")
        runs = {}
        for c in concurrencies:
            t = tallies[(name, c)]
            runs[f"c={c}"] = {
                "requests": t.requests, "errors": t.errors, "wrong": t.wrong,
                "rps": round(t.requests / t.wall_s, 1),
                "rounds_rps": [round(x, 1) for x in t.rounds_rps],
                "rounds_app_cpu_us_per_req": [round(x) for x in t.rounds_app_cpu_us],
                "p50_us": round(percentile(t.latencies_us, 0.50)), "p99_us": round(percentile(t.latencies_us, 0.99)),
                "envoy_cpu_s": round(t.envoy_cpu_s, 2), "app_cpu_s": round(t.app_cpu_s, 2),
                "envoy_cpu_us_per_req": round(t.envoy_cpu_s * 1e6 / t.requests, 1),
                "envoy_cpu_us_per_hop": round(t.envoy_cpu_s * 1e6 / t.requests / HOPS, 1),
                "app_cpu_us_per_req": round(t.app_cpu_s * 1e6 / t.requests, 1),
                "envoy_cpu_share": round(t.envoy_cpu_s / t.wall_s, 3),
                "decisions_per_req": round(t.decisions / t.requests, 3),
                "envoy_ctxsw_per_req": round(t.envoy_ctxsw / t.requests, 2),
            }
        out["layouts"][name] = s | {"runs": runs}
    out["envoy_part_s"] = round(time.monotonic() - started)
    return out


def write(figures: dict, path: Path = RESULTS) -> None:
    """Merges the figures into the results file under "gateway" (every other
    key is kept) and writes a timestamped copy of the whole file."""
    res = report.load(path) if path.exists() else {"schema": 1, "variants": {}}
    res["gateway"] = figures
    run = {"mode": "gateway", "started": figures["started"], "elapsed_s": figures["elapsed_s"],
           "loadavg": f"{figures['loadavg_before']} / {figures['loadavg_after']}"}
    res["runs"] = res.get("runs", []) + [run]
    DIST_BENCH.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1, default=str)
    path.write_text(text)
    (path.parent / f"results-gateway-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(text)


def native_callers(crit_time: float, crit_warmup: float, callgrind: bool) -> dict:
    """benches/callers.rs: criterion ns per call and its ALLOC/TABLE lines;
    with valgrind, instructions per call (N calls minus 0 calls, / N)."""
    out: dict = {}
    build = ["cargo", "bench", "-j", "1", "-p", "envlane", "--bench", "callers", "--no-run", "--message-format", "json"]
    log("caller table: " + " ".join(build))
    r = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    exe = next((json.loads(line).get("executable") for line in r.stdout.splitlines()
                if '"executable"' in line and json.loads(line).get("executable")), None)
    if r.returncode != 0 or not exe:
        return {"error": f"cargo bench --no-run failed:\n{r.stderr[-2000:]}"}
    argv = [exe, "--bench", "--warm-up-time", str(crit_warmup), "--measurement-time", str(crit_time), "--output-format", "bencher"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"error": f"the callers bench failed:\n{r.stderr[-2000:]}"}
    out["ns"] = [(m.group(1), float(m.group(2).replace(",", "")))
                 for m in re.finditer(r"^test (\S+)\s+\.\.\. bench:\s+([\d,.]+) ns/iter", r.stdout, re.M)]
    out["allocs"] = [line[6:] for line in r.stdout.splitlines() if line.startswith("ALLOC ")]
    out["table"] = [line[6:] for line in r.stdout.splitlines() if line.startswith("TABLE ")]
    if callgrind and shutil.which("valgrind"):
        n = 20000

        def ir(spec: str) -> int:
            env = dict(os.environ, ENVLANE_DRIVER=spec)
            v = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", exe, "--bench"],
                               env=env, capture_output=True, text=True, timeout=600)
            counts = [int(x) for x in re.findall(r"Collected : (\d+)", v.stderr)]
            return max(counts) if counts else 0

        out["instructions"] = []
        for what in ("lookup", "plan"):
            for size in ("10", "1k", "10k", "100k"):
                base = ir(f"{what}:{size}:0")
                out["instructions"].append((f"{what}/pods={size}", round((ir(f"{what}:{size}:{n}") - base) / n, 1)))
        out["instructions_n"] = n
    return out


def run(args) -> dict:
    """`benches/run.py gateway` (and part of `full`)."""
    log(f"gateway vs sidecars: {args.gw_rounds} rounds x {args.gw_requests} requests per layout and concurrency "
        f"{args.gw_concurrency}")
    started = time.monotonic()
    figures = measure(args.gw_requests, args.gw_rounds, args.gw_concurrency, args.gw_warmup, args.gw_idle)
    if "criterion" not in args.skip:
        figures["callers_native"] = native_callers(args.crit_time, args.crit_warmup, "callgrind" not in args.skip)
    figures["elapsed_s"] = round(time.monotonic() - started)
    return figures
