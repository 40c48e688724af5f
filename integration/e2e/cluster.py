"""Kubernetes objects the e2e suite writes as the admin: namespaces, Services,
Pods made Ready through `pods/status` (no kubelet runs) and the EndpointSlices
the EndpointSlice controller would write (no kube-controller-manager runs).

Pod IPs are 10.244.x.y: EndpointSlice validation refuses loopback addresses,
so the suite runs in its own network namespace where 10.244.0.0/16 is local
(`./build.sh e2e`, see netns.sh) and the test apps listen on those IPs.
"""

from __future__ import annotations

import ipaddress
import json
import time

from controlplane import ControlPlane, ControlPlaneError

POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
NODE = "node-0"
ENDPOINTS_MANAGER = "envlane-e2e-endpointslices"


def pod_ips_are_local() -> bool:
    """True inside the suite's network namespace (10.244.0.0/16 is local)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("10.244.255.254", 0))
        except OSError:
            return False
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Cluster:
    """Thin object helpers over a running ControlPlane (admin identity)."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self._next_ip = 10
        self.api("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {
                "topology.kubernetes.io/region": "local", "topology.kubernetes.io/zone": "local-a",
            }},
        }, ok=(409,))

    def api(self, method: str, path: str, body=None, *, ok: tuple[int, ...] = (),
            content_type: str = "application/json"):
        try:
            return self.cp.api(method, path, body, content_type)
        except ControlPlaneError as e:
            if any(f"HTTP {code}:" in str(e) for code in ok):
                return None
            raise

    def apply(self, obj: dict, manager: str = "envlane-e2e") -> dict:
        """Server-side apply as the admin."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self.cp.api(
            "PATCH", f"{path}?fieldManager={manager}&force=true", json.dumps(obj).encode(),
            "application/apply-patch+yaml",
        )

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        return self.api("GET", _path(api_version, kind, namespace, name), ok=(404,))

    def list(self, api_version: str, kind: str, namespace: str | None = None, selector: str = "") -> list[dict]:
        path = _path(api_version, kind, namespace, None)
        if selector:
            path += f"?labelSelector={selector}"
        return self.cp.api("GET", path)["items"]

    # -- workloads ---------------------------------------------------------

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels or {}}})
        # No controller-manager creates "default"; Pods need their account.
        self.api("POST", f"/api/v1/namespaces/{name}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"},
        }, ok=(409,))

    def service(self, ns: str, name: str, *, port: int, target_port: int, port_name: str = "http",
                selector: dict[str, str] | None = None, headless: bool = False) -> dict:
        spec = {
            "selector": selector or {"app": name},
            "ports": [{"name": port_name, "port": port, "targetPort": target_port, "protocol": "TCP"}],
        }
        if headless:
            spec["clusterIP"] = "None"
        return self.apply({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": name, "namespace": ns}, "spec": spec})

    def allocate_ip(self) -> str:
        ip = str(POD_CIDR.network_address + self._next_ip)
        self._next_ip += 1
        return ip

    def pod(self, ns: str, name: str, labels: dict[str, str], *, port: int, ready: bool = True,
            ip: str | None = None) -> str:
        """Creates a Pod and gives it an IP and a Running status; returns the IP."""
        ip = ip or self.allocate_ip()
        self.api("POST", f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": NODE, "containers": [{
                "name": "app", "image": "registry.invalid/envlane/testapp:0",
                "ports": [{"name": "http", "containerPort": port}],
            }]},
        })
        self._status(ns, name, ip, ready)
        return ip

    def set_ready(self, ns: str, name: str, ready: bool) -> None:
        pod = self.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
        self._status(ns, name, pod["status"]["podIP"], ready)

    def _status(self, ns: str, name: str, ip: str, ready: bool) -> None:
        now = _now()
        flag = "True" if ready else "False"
        conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                      for t in ("PodScheduled", "Initialized")]
        conditions += [{"type": t, "status": flag, "lastTransitionTime": now}
                       for t in ("ContainersReady", "Ready")]
        self.api("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": {
            "phase": "Running", "hostIP": "10.0.0.10", "hostIPs": [{"ip": "10.0.0.10"}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now, "conditions": conditions,
            "containerStatuses": [{
                "name": "app", "ready": ready, "started": True, "restartCount": 0,
                "image": "registry.invalid/envlane/testapp:0", "imageID": "",
                "state": {"running": {"startedAt": now}},
            }],
        }}, content_type="application/strategic-merge-patch+json")

    def delete_pod(self, ns: str, name: str) -> None:
        # No kubelet confirms the deletion: gracePeriodSeconds=0 removes it now.
        self.api("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0", ok=(404,))

    def sync_endpoints(self, ns: str, service: str) -> list[str]:
        """What the EndpointSlice controller does for one Service: one slice
        with every selected Pod, `ready` from its Ready condition. Returns the
        ready addresses."""
        svc = self.api("GET", f"/api/v1/namespaces/{ns}/services/{service}")
        selector = ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items())
        endpoints, ready_ips = [], []
        for p in self.list("v1", "Pod", ns, selector):
            ip = p.get("status", {}).get("podIP")
            if not ip or p["metadata"].get("deletionTimestamp"):
                continue
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in p["status"].get("conditions", []))
            if ready:
                ready_ips.append(ip)
            endpoints.append({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "nodeName": NODE,
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"]},
            })
        port = svc["spec"]["ports"][0]
        self.apply({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-e2e", "namespace": ns, "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": ENDPOINTS_MANAGER,
            }},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": port["name"], "port": port["targetPort"], "protocol": "TCP"}],
        }, manager=ENDPOINTS_MANAGER)
        return sorted(ready_ips)


_CORE = {"Namespace": "namespaces", "Pod": "pods", "Service": "services",
         "ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps", "Node": "nodes",
         "Secret": "secrets"}
_PLURAL = {"EndpointSlice": "endpointslices", "WasmPlugin": "wasmplugins",
           "DestinationRule": "destinationrules", "EnvoyFilter": "envoyfilters",
           "VirtualService": "virtualservices", "Sidecar": "sidecars", "Deployment": "deployments",
           "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
           "TrafficExtension": "trafficextensions",
           # networking.istio.io and gateway.networking.k8s.io (the path is by apiVersion)
           "Gateway": "gateways", "GatewayClass": "gatewayclasses", "HTTPRoute": "httproutes"}


def _path(api_version: str, kind: str, namespace: str | None, name: str | None) -> str:
    plural = _CORE.get(kind) or _PLURAL[kind]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace and kind not in ("Namespace", "Node") else ""
    return f"{base}{ns}/{plural}" + (f"/{name}" if name else "")
