"""A topology (integration/topologies.py) deployed on the real control plane:
Services and env Pods in the API server, a test app process per Pod on the
Pod's IP, and a real Envoy sidecar (configured by istiod) for every Pod that
calls another service, plus a `client` Pod whose sidecar the test calls.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from cluster import Cluster
from harness import TESTAPP, Process, Topology, wait_for
from sidecar import POD_LABEL, Sidecar, ecds_table, sidecar_resource

SERVICE_PORT = 8080  # what callers use (the sidecar's egress port)
APP_PORT = 9080  # where the apps listen (the Services' targetPort)


def pod_name(service: str, env: str) -> str:
    return f"{service}-{re.sub(r'[^a-z0-9-]', '-', env.lower())}"


class DeployedMesh:
    def __init__(self, cluster: Cluster, ns: str, topology: Topology, workdir: Path, xds: str):
        self.cluster, self.ns, self.topology, self.workdir, self.xds = cluster, ns, topology, workdir, xds
        self.apps: dict[str, Process] = {}
        self.sidecars: dict[str, Sidecar] = {}
        self.pods: dict[str, tuple[str, str]] = {}  # pod -> (service, env)

    def fqdn(self, service: str) -> str:
        return f"{service}.{self.ns}.svc.cluster.local"

    def host(self, service: str) -> str:
        return f"{self.fqdn(service)}:{SERVICE_PORT}"

    def start(self) -> "DeployedMesh":
        c, topo = self.cluster, self.topology
        port_name = "http2" if topo.h2 else "http"
        protocol = "HTTP2" if topo.h2 else "HTTP"
        for svc in topo.services:
            c.service(self.ns, svc.name, port=SERVICE_PORT, target_port=APP_PORT, port_name=port_name)
        callers: list[tuple[str, str, dict]] = []
        for svc in topo.services:
            for env in svc.envs:
                pod = pod_name(svc.name, env)
                labels = {"app": svc.name, "virtual-env": env, POD_LABEL: pod}
                ip = c.pod(self.ns, pod, labels, port=APP_PORT)
                self.pods[pod] = (svc.name, env)
                argv = [str(TESTAPP), "--name", svc.app, "--env", env, "--listen", f"{ip}:{APP_PORT}",
                        "--show", topo.show]
                if svc.next:
                    argv += ["--next", f"{ip}:{SERVICE_PORT}", "--next-host", self.host(svc.next)]
                    callers.append((pod, ip, labels))
                if topo.h2:
                    argv.append("--h2")
                self.apps[pod] = Process(f"app-{self.ns}-{pod}", argv, self.workdir)
        client_labels = {"app": "client", POD_LABEL: "client"}
        if topo.client_label:
            client_labels["virtual-env"] = topo.client_label
        client_ip = c.pod(self.ns, "client", client_labels, port=APP_PORT)
        callers.append(("client", client_ip, client_labels))
        for svc in topo.services:
            c.sync_endpoints(self.ns, svc.name)
        for pod, ip, labels in callers:
            c.apply(sidecar_resource(self.ns, pod, ip, SERVICE_PORT, protocol))
        for pod, ip, labels in callers:
            self.sidecars[pod] = Sidecar(ns=self.ns, pod=pod, ip=ip, labels=labels, xds=self.xds,
                                         port=SERVICE_PORT, workdir=self.workdir)
        for name, app in self.apps.items():
            wait_for(lambda app=app: "listening" in app.log(), f"app {name} listening", 10, app)
        for sc in self.sidecars.values():
            sc.envoy.wait_ready()
        return self

    def wait_table(self, timeout: float = 60.0) -> dict:
        """Waits until envlane-sync's WasmPlugin in this namespace has a table
        with every env of the topology and every sidecar's filter holds that
        table (istiod pushed it over ECDS); returns it."""
        envs = {env for s in self.topology.services for env in s.envs}

        def converged():
            wp = self.cluster.get("extensions.istio.io/v1alpha1", "WasmPlugin", self.ns, "envlane")
            table = wp and wp["spec"]["pluginConfig"]
            # The env list is shared by every opted-in namespace: a superset.
            if not table or not envs <= {e["name"] for e in table.get("envs", [])}:
                return None
            held = all(ecds_table(sc.config_dump()) == table for sc in self.sidecars.values())
            return held and table

        return wait_for(converged, f"the {self.ns} table in every sidecar", timeout)

    @property
    def client(self) -> Sidecar:
        return self.sidecars["client"]

    def call(self, service: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        """HTTP/1.1 from the client Pod to `service` through its sidecar (curl)."""
        return self._curl(service, headers, ["--http1.1"])

    def call_h2(self, service: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        return self._curl(service, headers, ["--http2-prior-knowledge"])

    def _curl(self, service: str, headers, flags: list[str]) -> tuple[int, str]:
        argv = ["curl", "-sS", *flags, "-o", "-", "-w", "\n%{http_code}", "--max-time", "10",
                "-H", f"host: {self.host(service)}", f"http://{self.client.egress}/"]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True).stdout
        body, _, code = out.rpartition("\n")
        return int(code), body.strip()

    def close(self) -> None:
        for sc in self.sidecars.values():
            sc.close()
        for app in self.apps.values():
            app.close()
