"""Per config change: from writing a new ECDS file to the first request
routed by the new table, the filter's `loaded table` log lines (one per VM),
Envoy's RSS and each VM's Wasm linear memory."""

from __future__ import annotations

import http.client
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .common import LOAD_CPU, App, harness, log, on_cpu, rss_kib, wasm_memories_kib
from .common import PORT
from .variants import Proxy, Table, cluster, svc_name
from harness import ecds_resource, write_atomically


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

def config_changes(wasm: Path, workdir: Path) -> list[Reload]:
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
                      plugin_config=small.config("push0", {"dev.team0": "push0"}), route_table=every_push, wasm=wasm)
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
                text = ecds_resource(table.config(f"push{k}", {"dev.team0": f"push{k}"}), wasm=wasm)
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
