"""Sidecar-less gateway mode on loopback: ONE router Envoy for all east-west traffic.

Like Alibaba's ACMG east-west gateway (or an ambient waypoint): no pod has a
sidecar. Every app's outbound call and every test request goes to the one
gateway Envoy, whose envlane filter (`"proxy": "gateway"`) decides per
request. The gateway has no env of its own (its node metadata carries no env
label); a request without an env gets its caller's, found by the TCP peer
address in the table's `callers`.

So that the gateway can tell pods apart by source address, every pod gets
its own loopback IP 127.0.0.x (x >= 20; Linux routes all of 127/8 to lo),
listens on it, and binds its outbound connection to it (testapp
`--source-ip`). Test callers that are not app pods (the client, and callers
a test labels itself) get IPs the same way; `call(..., caller=NAME)` sends
from that IP.

The gateway's routing is the sidecar harness's (harness.py): a virtual host
per service `FQDN:PORT` with all its names, clusters `outbound|PORT|SUBSET|FQDN`
and `outbound|PORT||FQDN`, envlane-sync's route patches applied as istiod
merges them, the filter delivered by file ECDS (rewriting the file is a
push). Processes are always stopped and the workdir removed.
"""

from __future__ import annotations

import copy
import http.client
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    StartOrClose, passthrough_vhost,
    NAMESPACE, TESTAPP, Envoy, Mesh, Process, Topology, apply_route_patches, config_events, ecds_resource, envoy_bin,
    fqdn, free_port, route_patches, service_domains, sidecar_bootstrap, static_cluster, wait_for, wasm_filter_ecds,
    write_atomically,
)

GATEWAY_IP = "127.0.0.1"  # where the gateway listens (callers connect here from their own IPs)
FIRST_POD_IP = 20  # 127.0.0.20 is the first pod; below stays free for other uses
CLIENT = "client"
STRANGER = "stranger"  # a caller with an IP that is in no caller table


@dataclass
class Pod:
    """A caller the gateway may see: an app pod, the client, or a test caller."""

    name: str
    ip: str
    env: str | None  # its env label; None: unlabelled (not in the caller table)


def pod_cluster(name: str, ip: str, port: int, h2: bool) -> dict:
    """harness.static_cluster, with the endpoint at the pod's own IP."""
    c = static_cluster(name, port, h2)
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] = ip
    return c


def callers_table(plugin_config: dict, pods: list[Pod]) -> list[dict]:
    """The `callers` field: one entry per env, with the IPs of its labelled
    pods, in `envs` order (a label naming no env of the table is left out,
    as envlane-sync can only name envs it lists)."""
    index = {e["name"]: i for i, e in enumerate(plugin_config.get("envs", []))}
    ips: dict[int, list[str]] = {}
    for pod in pods:
        if pod.env is not None and pod.env in index:
            ips.setdefault(index[pod.env], []).append(pod.ip)
    return [{"env": i, "ips": sorted(v, key=lambda ip: tuple(int(p) for p in ip.split(".")))} for i, v in sorted(ips.items())]


def gateway_bootstrap(*, listen_port: int, admin_port: int, virtual_hosts: list[dict], clusters: list[dict],
                      http_filters: list[dict], labels: dict[str, str]) -> dict:
    """harness.sidecar_bootstrap reshaped into a router: an Istio router node
    id, no env label unless a test asks for one, and the client address taken
    from the TCP connection, never from a client-sent X-Forwarded-For."""
    b = sidecar_bootstrap(pod="envlane-gateway", labels=labels, listen_port=listen_port, admin_port=admin_port,
                          virtual_hosts=virtual_hosts, clusters=clusters, http_filters=http_filters)
    b["node"]["id"] = f"router~{GATEWAY_IP}~envlane-gateway.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"
    listener = b["static_resources"]["listeners"][0]
    listener["name"] = "east-west"
    listener["address"]["socket_address"]["address"] = GATEWAY_IP
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "east_west"
    # With use_remote_address false (Envoy's default), Envoy takes the
    # downstream remote address (`source.address`) from the last
    # X-Forwarded-For entry, so any client could name another pod as its
    # caller. A gateway is the first proxy on the path: the peer is the caller.
    hcm["use_remote_address"] = True
    return b


class GatewayApp:
    """A testapp pod on its own loopback IP; its outbound calls go to the
    gateway from that IP."""

    def __init__(self, pod: Pod, app: str, workdir: Path, *, gateway_port: int | None, next_host: str = "",
                 h2: bool = False, show: str = "x-virtual-env", propagate: bool = True):
        argv = [str(TESTAPP), "--name", app, "--env", pod.env or "", "--listen", f"{pod.ip}:0", "--show", show]
        if gateway_port:
            argv += ["--next", f"{GATEWAY_IP}:{gateway_port}", "--next-host", next_host, "--source-ip", pod.ip]
            if not propagate:
                argv.append("--no-propagate")
        if h2:
            argv.append("--h2")
        self.pod = pod
        self.process = Process(pod.name, argv, workdir)
        pattern = rf"listening {re.escape(pod.ip)}:(\d+)"
        self.port = int(wait_for(lambda: (m := re.search(pattern, self.process.log())) and m.group(1),
                                 f"{pod.name} listening", 10, self.process))

    def close(self) -> None:
        self.process.close()


@dataclass
class GatewayMesh(StartOrClose):
    """A running topology behind one gateway Envoy and no sidecar.

    `plugin_config` is the topology's table; the gateway gets it with
    `"proxy": "gateway"` and `callers` built from every pod's IP and env label
    (app pods, the client if `topology.client_label` is set, and `callers`).
    """

    topology: Topology
    plugin_config: dict
    # Test callers of our own: name -> env label (None: unlabelled, not in the table).
    callers: dict[str, str | None] = field(default_factory=dict)
    # False: apps forward no env header or baggage, so at every hop the
    # caller table decides (each hop from the calling pod's own env).
    propagate: bool = True
    # The gateway node's labels. No env label: a shared proxy has no env of its
    # own (a test may add one to check that the filter never uses it).
    gateway_labels: dict[str, str] = field(default_factory=lambda: {"app": "envlane-gateway"})
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="envlane-gateway-")))
    gateway: Envoy | None = None
    apps: dict[str, GatewayApp] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    gateway_port: int = 0

    @property
    def ecds_path(self) -> Path:
        return self.workdir / "envlane-ecds.json"

    @property
    def envoys(self) -> list[Envoy]:
        """Every Envoy this mesh started: the gateway and nothing else."""
        return [self.gateway] if self.gateway else []

    def gateway_config(self, plugin_config: dict | None = None, pods: dict[str, Pod] | None = None) -> dict:
        """The gateway's plugin config: the table + proxy mode + caller table."""
        config = copy.deepcopy(plugin_config if plugin_config is not None else self.plugin_config)
        config["proxy"] = "gateway"
        config["callers"] = callers_table(config, list((pods or self.pods).values()))
        return config

    def push(self, plugin_config: dict | str) -> None:
        """Writes a new table to the gateway, as istiod pushes a changed
        WasmPlugin. A dict is a table: proxy and callers are added from the
        current pods; a string goes as it is."""
        value = plugin_config if isinstance(plugin_config, str) else self.gateway_config(plugin_config)
        write_atomically(self.ecds_path, ecds_resource(value))

    def relabel(self, name: str, env: str | None) -> None:
        """A pod's env label changed: the next push carries it (call push)."""
        self.pods[name].env = env

    def _allocate_pods(self) -> list[tuple]:
        """Every caller gets its own IP, in a fixed order (deterministic)."""
        topo = self.topology
        names: list[tuple[str, str | None]] = [(f"{s.name}-{e}", e) for s in topo.services for e in s.envs]
        names.append((CLIENT, topo.client_label))
        names += list(self.callers.items())
        names.append((STRANGER, None))
        if FIRST_POD_IP + len(names) > 254:
            raise ValueError("more pods than loopback IPs 127.0.0.20-254")
        for i, (name, env) in enumerate(names):
            if name in self.pods:
                raise ValueError(f"caller name {name} is taken")
            self.pods[name] = Pod(name, f"127.0.0.{FIRST_POD_IP + i}", env)
        return names

    def _routing(self, app_addrs: dict[tuple[str, str], tuple[str, int]]) -> tuple[list[dict], list[dict]]:
        """As harness.Mesh._routing (cluster mode), with each cluster's
        endpoint at its pod's own IP."""
        topo = self.topology
        vhosts, clusters = [], []
        subsets = {e["name"]: e.get("subset") for e in self.plugin_config.get("envs", [])}
        for svc in topo.services:
            base = f"outbound|{svc.port}||{fqdn(svc.name)}"
            clusters.append(pod_cluster(base, *app_addrs[(svc.name, topo.default_env)], topo.h2))
            vhosts.append({"name": f"{fqdn(svc.name)}:{svc.port}", "domains": service_domains(svc.name, svc.port),
                           "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": base, "timeout": "5s"}}]})
            for env in svc.envs:
                if not subsets.get(env):
                    raise KeyError(f"hand-written configs name every subset; {env} has none")
                cname = f"outbound|{svc.port}|{subsets[env]}|{fqdn(svc.name)}"
                clusters.append(pod_cluster(cname, *app_addrs[(svc.name, env)], topo.h2))
        # As istiod merges envlane-sync's route EnvoyFilters into its routes.
        if Mesh._valid_table(self.plugin_config):
            apply_route_patches(vhosts, route_patches(self.plugin_config))
        vhosts.append(passthrough_vhost())
        return vhosts, clusters

    def _start(self) -> None:
        topo = self.topology
        if self.plugin_config.get("mode", "cluster") != "cluster":
            raise ValueError("the gateway harness runs cluster mode")
        self._allocate_pods()
        self.push(self.plugin_config)
        # The gateway's port is known before anything starts, so apps can
        # point at it; its clusters need the apps' ports, so apps start first.
        self.gateway_port = free_port()
        by_name = {s.name: s for s in topo.services}
        app_addrs: dict[tuple[str, str], tuple[str, int]] = {}
        for svc in topo.services:
            nxt = by_name[svc.next] if svc.next else None
            for env in svc.envs:
                pod = self.pods[f"{svc.name}-{env}"]
                app = GatewayApp(pod, svc.app, self.workdir, gateway_port=self.gateway_port if nxt else None,
                                 next_host=f"{nxt.name}:{nxt.port}" if nxt else "", h2=topo.h2, show=topo.show,
                                 propagate=self.propagate)
                self.apps[pod.name] = app
                app_addrs[(svc.name, env)] = (pod.ip, app.port)
        vhosts, clusters = self._routing(app_addrs)
        self.gateway = Envoy("gateway", gateway_bootstrap(
            listen_port=self.gateway_port, admin_port=free_port(), virtual_hosts=vhosts, clusters=clusters,
            http_filters=[wasm_filter_ecds(self.ecds_path)], labels=self.gateway_labels), self.workdir)
        self.gateway.wait_ready()

    def source_ip(self, caller: str | None) -> str | None:
        return None if caller is None else self.pods[caller].ip

    def call(self, host: str, headers: dict[str, str] | None = None, caller: str | None = CLIENT,
             timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
        """A request to `host` through the gateway, sent from `caller`'s IP
        (None: from 127.0.0.1, in no caller table)."""
        ip = self.source_ip(caller)
        conn = http.client.HTTPConnection(GATEWAY_IP, self.gateway_port, timeout=timeout,
                                          source_address=(ip, 0) if ip else None)
        try:
            h = {"host": host}
            h.update(headers or {})
            conn.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
            for k, v in h.items():
                conn.putheader(k, v)
            conn.endheaders()
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
        finally:
            conn.close()

    def call_h2(self, host: str, headers: dict[str, str] | None = None, caller: str | None = CLIENT) -> tuple[int, str]:
        """The same over h2c with prior knowledge (curl, from the caller's IP)."""
        argv = ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                "-H", f"host: {host}", f"http://{GATEWAY_IP}:{self.gateway_port}/"]
        ip = self.source_ip(caller)
        if ip:
            argv[1:1] = ["--interface", ip]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
        body, _, status = out.rpartition("\n")
        code, version = status.split()
        assert version == "2", f"expected HTTP/2, got {version}"
        return int(code), body.strip()

    def config_events(self) -> int:
        return config_events(self.gateway) if self.gateway else 0

    def push_and_wait(self, plugin_config: dict | str, timeout: float = 10.0) -> None:
        """Pushes and waits until the gateway took (or refused) it."""
        before = self.config_events()
        self.push(plugin_config)
        wait_for(lambda: self.config_events() > before, "gateway config update", timeout, self.gateway.process)

    def close(self) -> None:
        for p in self.envoys + list(self.apps.values()):
            p.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "GatewayMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def envoy_processes_under(workdir: Path) -> list[int]:
    """PIDs of running Envoy processes whose bootstrap lives in `workdir`:
    what the OS says, not what the harness believes it started."""
    binary = os.path.realpath(envoy_bin())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        if os.path.realpath(argv[0].decode(errors="replace")) != binary:
            continue
        if any(a.decode(errors="replace").startswith(str(workdir) + "/") for a in argv[1:]):
            pids.append(int(entry.name))
    return pids
