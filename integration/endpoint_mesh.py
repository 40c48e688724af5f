"""Endpoint mode on loopback: sidecars whose envlane filter picks the pod.

As harness.Mesh (a sidecar per calling pod and one for the client, the
filter by file ECDS, envlane-sync's route patches applied as istiod merges
them), but shaped as endpoint mode needs (issue 13):

* every pod on its own loopback IP (127.0.1.x, x >= 20; Linux routes all of
  127/8 to lo) and its service's common target port, as pods share a
  containerPort; a (service, env) may have several pods (`replicas`);
* per service port ONE ORIGINAL_DST cluster (`CLUSTER_PROVIDED`, the shape
  envlane-sync's CLUSTER ADD patch gives it, plain text here: the spike,
  benches/endpoint_spike.py, proved it with mTLS), named by the filter's
  own naming: the `targets` `envlane-sync route-patches` prints;
* the service's own cluster `outbound|PORT||FQDN` with ALL its pods (what
  istiod builds from the Service), where a route goes without the filter;
* no cluster per (service, env);
* every sidecar answers with `x-upstream-address` (`%UPSTREAM_REMOTE_ADDRESS%`):
  the address its Envoy actually connected to.

The table is the hand-written one with `mode: endpoint`, `targetPorts` and
`endpoints` (each env's pods' IPs) filled from the pods. Processes are always
stopped and the workdir removed.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    StartOrClose, passthrough_vhost,
    SYNC, TESTAPP, Envoy, Process, Topology, apply_route_patches, config_events, ecds_resource, fqdn, free_port,
    http_get, service_domains, sidecar_bootstrap, wait_for, wasm_filter_ecds, write_atomically,
)

POD_NET = "127.0.1"  # pods get 127.0.1.20, .21, ...
FIRST_POD_IP = 20
UPSTREAM_HEADER = "x-upstream-address"


@dataclass
class EndpointPod:
    name: str
    service: str
    env: str
    ip: str
    port: int  # the service's target port

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


def sync_route_patches(table: dict) -> dict:
    """`envlane-sync route-patches` for `table`: configPatches, warnings and
    targets (in endpoint mode: the ORIGINAL_DST clusters)."""
    with tempfile.TemporaryDirectory(prefix="envlane-patches-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(table))
        out = subprocess.run([str(SYNC), "route-patches", str(path)], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    return json.loads(out)


def original_dst_cluster(name: str) -> dict:
    """envlane-sync's CLUSTER ADD value without its transport socket."""
    return {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "10s",
            "cleanup_interval": "60s"}


def service_cluster(name: str, addresses: list[tuple[str, int]]) -> dict:
    """The service's own cluster: every pod an endpoint (round robin)."""
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}
            for ip, port in addresses]}]}}


def _ip_key(ip: str) -> tuple[int, ...]:
    return tuple(int(p) for p in ip.split("."))


@dataclass
class EndpointMesh(StartOrClose):
    """A running topology in endpoint mode. `plugin_config` is the
    hand-written (cluster-mode) table; `table()` makes its endpoint-mode
    form from the pods."""

    topology: Topology
    plugin_config: dict
    # (service, env) -> how many pods (default 1).
    replicas: dict[tuple[str, str], int] = field(default_factory=dict)
    # "wasm": the envlane filter; "absent": none (a namespace not opted in).
    filter: str = "wasm"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="envlane-endpoint-")))
    pods: dict[str, EndpointPod] = field(default_factory=dict)
    target_ports: dict[str, int] = field(default_factory=dict)
    sidecars: dict[str, Envoy] = field(default_factory=dict)
    apps: dict[str, Process] = field(default_factory=dict)
    client_port: int = 0
    patches: dict = field(default_factory=dict)  # what route-patches printed

    @property
    def ecds_path(self) -> Path:
        return self.workdir / "envlane-ecds.json"

    def pods_of(self, service: str, env: str | None = None) -> list[EndpointPod]:
        return [p for p in self.pods.values() if p.service == service and env in (None, p.env)]

    def table(self, without: set[str] = frozenset()) -> dict:
        """The endpoint-mode table: each env's pods' IPs (pods named in
        `without` left out, as envlane-sync leaves out a pod no longer Ready)."""
        config = copy.deepcopy(self.plugin_config)
        config["mode"] = "endpoint"
        names = [e["name"] for e in config["envs"]]
        for entry in config["services"]:
            svc = entry["host"].split(".")[0]
            entry["targetPorts"] = [self.target_ports[svc] for _ in entry["ports"]]
            entry["endpoints"] = [sorted((p.ip for p in self.pods_of(svc, names[i]) if p.name not in without),
                                         key=_ip_key) for i in entry["envs"]]
        return config

    def push(self, table: dict | str) -> None:
        write_atomically(self.ecds_path, ecds_resource(table))

    def config_events(self) -> dict[str, int]:
        return {name: config_events(env) for name, env in self.sidecars.items()}

    def push_and_wait(self, table: dict | str, timeout: float = 10.0) -> None:
        """Pushes and waits on every sidecar's ECDS stats (taken or refused)."""
        before = self.config_events()
        self.push(table)
        for name, env in self.sidecars.items():
            wait_for(lambda: config_events(env) > before[name], f"{name} config update", timeout, env.process)

    def _allocate(self) -> None:
        i = FIRST_POD_IP
        for svc in self.topology.services:
            self.target_ports[svc.name] = free_port()
            for env in svc.envs:
                for r in range(self.replicas.get((svc.name, env), 1)):
                    name = f"{svc.name}-{env}" + (f"-{r}" if r else "")
                    if i > 254:
                        raise ValueError("more pods than loopback IPs")
                    self.pods[name] = EndpointPod(name, svc.name, env, f"{POD_NET}.{i}", self.target_ports[svc.name])
                    i += 1

    def _routing(self) -> tuple[list[dict], list[dict]]:
        topo = self.topology
        self.patches = sync_route_patches(self.table())
        targets = set(self.patches["targets"])
        vhosts, clusters = [], []
        for svc in topo.services:
            base = f"outbound|{svc.port}||{fqdn(svc.name)}"
            clusters.append(service_cluster(base, [(p.ip, p.port) for p in self.pods_of(svc.name)]))
            vhosts.append({"name": f"{fqdn(svc.name)}:{svc.port}", "domains": service_domains(svc.name, svc.port),
                           "routes": [{"name": "default", "match": {"prefix": "/"},
                                       "route": {"cluster": base, "timeout": "5s"}}]})
        # One ORIGINAL_DST cluster per service port, under the filter's names.
        clusters += [original_dst_cluster(name) for name in sorted(targets)]
        if apply_route_patches(vhosts, self.patches["configPatches"]) != len(topo.services):
            raise RuntimeError(f"route patches did not patch every service: {self.patches}")
        vhosts.append(passthrough_vhost())
        return vhosts, clusters

    def _start(self) -> None:
        topo = self.topology
        self._allocate()
        self.push(self.table())
        filters = [] if self.filter == "absent" else [wasm_filter_ecds(self.ecds_path)]
        by_name = {s.name: s for s in topo.services}
        sidecar_ports = {p.name: free_port() for p in self.pods.values() if by_name[p.service].next}
        self.client_port = sidecar_ports["client"] = free_port()
        for pod in self.pods.values():
            svc = by_name[pod.service]
            argv = [str(TESTAPP), "--name", svc.app, "--env", pod.env, "--listen", pod.address, "--show", topo.show]
            if svc.next:
                nxt = by_name[svc.next]
                argv += ["--next", f"127.0.0.1:{sidecar_ports[pod.name]}", "--next-host", f"{nxt.name}:{nxt.port}"]
            if topo.h2:
                argv.append("--h2")
            self.apps[pod.name] = Process(f"{pod.name}.app", argv, self.workdir)  # its sidecar logs to {pod.name}.log
        vhosts, clusters = self._routing()
        starting = []
        labelled = [(p.name, {"app": p.service, "virtual-env": p.env}) for p in self.pods.values() if p.name in sidecar_ports]
        client_labels = {"app": "client"} | ({"virtual-env": topo.client_label} if topo.client_label else {})
        for name, labels in labelled + [("client", client_labels)]:
            bootstrap = sidecar_bootstrap(pod=name, labels=labels, listen_port=sidecar_ports[name], admin_port=free_port(),
                                          virtual_hosts=vhosts, clusters=clusters, http_filters=filters)
            hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["route_config"]["response_headers_to_add"] = [{
                "header": {"key": UPSTREAM_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
            self.sidecars[name] = env = Envoy(name, bootstrap, self.workdir)
            starting.append(env)
        for name, app in self.apps.items():
            wait_for(lambda: f"listening {self.pods[name].address}" in app.log(), f"{name} listening", 10, app)
        for env in starting:
            env.wait_ready()

    @property
    def client(self) -> Envoy:
        return self.sidecars["client"]

    def processes(self) -> list[Process]:
        return [e.process for e in self.sidecars.values()] + list(self.apps.values())

    def call(self, host: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        """A request from the client pod to `host` through its sidecar."""
        h = {"host": host}
        h.update(headers or {})
        return http_get(f"http://127.0.0.1:{self.client_port}/", h)

    def close(self) -> None:
        for p in self.processes():
            p.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "EndpointMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
