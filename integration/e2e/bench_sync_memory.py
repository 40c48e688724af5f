"""Benchmark: envlane-sync's whole-process memory on a large shared cluster.

A real kube-apiserver (no istiod) holds NAMESPACES opted-in namespaces, each
with SERVICES Services and one Ready pod per (Service, env) for ENVS envs:
NAMESPACES x SERVICES x ENVS (service, env) pairs. envlane-sync runs as the
shipped install runs it (its ServiceAccount, leader election, the admission
policy) until the first pass has written every object, then once more after
a pod flaps. Printed: peak and current RSS (VmHWM, VmRSS), objects written,
and the pass times.

    integration/e2e/netns.sh python3 integration/e2e/bench_sync_memory.py [NAMESPACES SERVICES ENVS]

(default 400 12 4: 19,200 pairs in 400 namespaces). Not a test: it prints
figures (BENCHMARKS.md records them).
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import local

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "controlplane")]

from controlplane import ControlPlane  # noqa: E402
from install import BASE, EnvlaneSync, install  # noqa: E402

ENV_LABEL = "virtual-env"
WASM_API = "extensions.istio.io/v1alpha1"


class Api:
    """Keep-alive HTTPS connections to the API server as the admin, one per
    thread (creating tens of thousands of objects one TLS handshake each
    would take most of the run)."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.host, _, port = cp.server.removeprefix("https://").partition(":")
        self.port = int(port)
        self.ctx: ssl.SSLContext = cp._ssl  # the admin's client certificate
        self.tls = local()

    def call(self, method: str, path: str, body: dict | None = None,
             content_type: str = "application/json") -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"} | ({"Content-Type": content_type} if data else {})
        for attempt in (1, 2):
            conn = getattr(self.tls, "conn", None)
            if conn is None:
                conn = self.tls.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx)
            try:
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                raw = r.read()
                break
            except (OSError, http.client.HTTPException):
                # The server closed an idle keep-alive connection: reconnect once.
                conn.close()
                self.tls.conn = None
                if attempt == 2:
                    raise
        if r.status >= 300 and r.status != 409:
            raise RuntimeError(f"{method} {path}: {r.status} {raw[:300]!r}")
        return json.loads(raw) if raw else {}


def populate(api: Api, namespaces: int, services: int, envs: list[str]) -> int:
    """Creates the namespaces, Services and Ready pods; returns the pairs."""
    def namespace(i: int) -> None:
        ns = f"tenant-{i:04d}"
        api.call("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"envlane.io/enabled": "true"}}})
        # No controller-manager creates "default"; Pods need their account.
        api.call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})
        for s in range(services):
            app = f"svc{s}"
            api.call("POST", f"/api/v1/namespaces/{ns}/services", {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
                "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 8080}]}})
            for e, env in enumerate(envs):
                name = f"{app}-{e}"
                api.call("POST", f"/api/v1/namespaces/{ns}/pods", {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app": app, ENV_LABEL: env}},
                    "spec": {"containers": [{"name": "app", "image": "app"}]}})
                ready(api, ns, name, True)

    # Istio's root namespace (istiod, not run here, would create it).
    api.call("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(namespace, range(namespaces)))
    return namespaces * services * len(envs)


def ready(api: Api, ns: str, name: str, is_ready: bool) -> None:
    status = "True" if is_ready else "False"
    api.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {
        "status": {"phase": "Running", "podIP": "10.244.0.1", "conditions": [
            {"type": "Ready", "status": status}, {"type": "ContainersReady", "status": status}]}},
        "application/merge-patch+json")


def memory(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def main(argv: list[str]) -> int:
    namespaces, services, env_count = (int(a) for a in (argv[1:4] if len(argv) >= 4 else (400, 12, 4)))
    envs = ["dev"] + [f"dev.p{i}" for i in range(1, env_count)]
    with ControlPlane(istiod=False) as cp:
        api = Api(cp)
        t0 = time.monotonic()
        pairs = populate(api, namespaces, services, envs)
        print(f"cluster: {namespaces} namespaces, {namespaces * services} services, "
              f"{pairs} Ready pods = {pairs} pairs ({time.monotonic() - t0:.0f} s to create)", flush=True)
        install(cp, json.loads((BASE / "settings.json").read_text()))
        d = cp.dir / "bench-sync"
        d.mkdir()
        sync = EnvlaneSync(cp, d)
        t0 = time.monotonic()
        try:
            # Ready once its first pass has written everything (minutes here).
            sync.start(ready_within=1800)
            # Written: one WasmPlugin per namespace, holding every pair.
            def written() -> bool:
                return (sync.metric("envlane_sync_table_pairs") == pairs
                        and (sync.metric("envlane_sync_seconds_since_last_sync") or -1) >= 0
                        and (sync.metric('envlane_sync_writes_total{op="apply"}') or 0)
                        >= namespaces * (1 + 2 * services))
            sync.wait(written, "every object written", int(__import__("os").environ.get("BENCH_WAIT", "1800")))
            first = time.monotonic() - t0
            m1 = memory(sync.proc.pid)
            applies = sync.metric('envlane_sync_writes_total{op="apply"}')
            print(f"first pass: {applies:.0f} objects applied in {first:.0f} s; "
                  f"peak RSS {m1['VmHWM']:.0f} MiB, RSS {m1['VmRSS']:.0f} MiB", flush=True)
            # A pod flaps: every namespace's table changes once, nothing else.
            before = applies
            t1 = time.monotonic()
            ready(api, "tenant-0000", "svc0-1", False)
            sync.wait(lambda: sync.metric("envlane_sync_table_pairs") == pairs - 1
                      and sync.metric('envlane_sync_writes_total{op="apply"}') >= before + namespaces + 1,
                      "the flap written", 600)
            m2 = memory(sync.proc.pid)
            after = sync.metric('envlane_sync_writes_total{op="apply"}')
            print(f"one pod not Ready: {after - before:.0f} objects rewritten in {time.monotonic() - t1:.0f} s; "
                  f"peak RSS {m2['VmHWM']:.0f} MiB, RSS {m2['VmRSS']:.0f} MiB", flush=True)
            wp = api.call("GET", f"/apis/{WASM_API}/namespaces/tenant-0000/wasmplugins/envlane")
            size = len(json.dumps(wp["spec"]["pluginConfig"]))
            print(f"table: {size} bytes of JSON per WasmPlugin", flush=True)
        finally:
            sync.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
