#!/usr/bin/env python3
"""Smoke test of the real control plane: python3 integration/controlplane/smoke.py

Not a pytest file and not part of ./build.sh test. Needs the binaries from
`scripts/controlplane.sh build`. It:

1. starts etcd, kube-apiserver (RBAC on) and istiod on loopback
   (controlplane.py), with Istio's CRDs applied;
2. creates a namespace, a ServiceAccount, a Service `reviews` (port 9080),
   two Pods (`reviews-v1`, the server, and `sleep`, the client) marked
   Running/Ready through the status subresource (there is no kubelet), and
   an EndpointSlice for `reviews`;
3. waits until istiod's service registry (/debug/registryz) has the Service;
4. connects to istiod's plaintext xDS port as the `sleep` pod's sidecar
   (a minimal ADS client, xds.py), asks for its clusters (CDS) and for the
   endpoints (EDS) of the `reviews` cluster, and prints the outbound cluster
   names istiod knows for the Service;
5. while that fake sidecar is connected, reads istiod's
   /debug/config_dump?proxyID=... and /debug/syncz for it.

Exit 0 when istiod served `outbound|9080||reviews.<ns>.svc.cluster.local`
with the Pod's address as its endpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import DOMAIN, ControlPlane, ControlPlaneError, _interrupt_on_sigterm  # noqa: E402
import xds  # noqa: E402

NS = "envlane-smoke"
SVC = "reviews"
PORT = 9080
SERVER_IP = "10.244.0.5"
CLIENT_IP = "10.244.0.9"
FQDN = f"{SVC}.{NS}.svc.{DOMAIN}"
WANT = f"outbound|{PORT}||{FQDN}"


def pod(name: str, labels: dict, port: int | None) -> dict:
    container = {"name": "app", "image": "registry.invalid/envlane/smoke:0"}
    if port:
        container["ports"] = [{"name": "http", "containerPort": port}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"serviceAccountName": "smoke", "nodeName": "node-0", "containers": [container]},
    }


def mark_ready(cp: ControlPlane, name: str, ip: str) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conds = [
        {"type": t, "status": "True", "lastTransitionTime": now}
        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    cp.api(
        "PATCH",
        f"/api/v1/namespaces/{NS}/pods/{name}/status",
        {"status": {
            "phase": "Running",
            "hostIP": "10.0.0.10",
            "hostIPs": [{"ip": "10.0.0.10"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": now,
            "conditions": conds,
            "containerStatuses": [{
                "name": "app", "ready": True, "started": True, "restartCount": 0,
                "image": "registry.invalid/envlane/smoke:0", "imageID": "",
                "state": {"running": {"startedAt": now}},
            }],
        }},
        content_type="application/strategic-merge-patch+json",
    )


def create_objects(cp: ControlPlane) -> None:
    cp.api("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS},
    })
    # The ServiceAccount admission plugin refuses Pods whose account does not
    # exist, and no controller-manager is here to create "default".
    # A Node object (there is no kubelet behind it) for the Pods' nodeName;
    # istiod reads its locality labels.
    cp.api("POST", "/api/v1/nodes", {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-0", "labels": {
            "topology.kubernetes.io/region": "local", "topology.kubernetes.io/zone": "local-a",
        }},
    })
    cp.api("POST", f"/api/v1/namespaces/{NS}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "smoke"},
    })
    svc = cp.api("POST", f"/api/v1/namespaces/{NS}/services", {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SVC},
        "spec": {
            "selector": {"app": SVC},
            "ports": [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}],
        },
    })
    print(f"service {NS}/{SVC}: clusterIP {svc['spec']['clusterIP']}")
    cp.api("POST", f"/api/v1/namespaces/{NS}/pods", pod(
        "reviews-v1", {"app": SVC, "version": "v1", "virtual-env": "dev"}, PORT))
    cp.api("POST", f"/api/v1/namespaces/{NS}/pods", pod(
        "sleep", {"app": "sleep", "virtual-env": "dev"}, None))
    mark_ready(cp, "reviews-v1", SERVER_IP)
    mark_ready(cp, "sleep", CLIENT_IP)
    p = cp.api("GET", f"/api/v1/namespaces/{NS}/pods/reviews-v1")
    ready = {c["type"]: c["status"] for c in p["status"]["conditions"]}
    print(f"pod {NS}/reviews-v1: phase {p['status']['phase']}, podIP {p['status']['podIP']}, "
          f"Ready {ready.get('Ready')}")
    cp.api("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{SVC}-smoke",
            "labels": {
                "kubernetes.io/service-name": SVC,
                "endpointslice.kubernetes.io/managed-by": "envlane-smoke",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [SERVER_IP],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "node-0",
            "targetRef": {"kind": "Pod", "namespace": NS, "name": "reviews-v1"},
        }],
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
    })
    print(f"endpointslice {NS}/{SVC}-smoke: {SERVER_IP}:{PORT}")


def wait_registry(cp: ControlPlane, timeout: float = 60) -> dict:
    def listed():
        reg = cp.istiod_get("/debug/registryz")
        return next((s for s in (reg if isinstance(reg, list) else []) if s.get("hostname") == FQDN), None)

    return cp._wait(f"istiod's /debug/registryz to list {FQDN}", listed, timeout)


def sidecar_metadata() -> dict:
    return {
        "ISTIO_VERSION": "1.31.0",
        "CLUSTER_ID": "Kubernetes",
        "NAMESPACE": NS,
        "NAME": "sleep",
        "POD_NAME": "sleep",
        "WORKLOAD_NAME": "sleep",
        "SERVICE_ACCOUNT": "smoke",
        "INTERCEPTION_MODE": "REDIRECT",
        "INSTANCE_IPS": CLIENT_IP,
        "LABELS": {"app": "sleep", "virtual-env": "dev"},
    }


def main() -> int:
    with ControlPlane() as cp:
        print(f"kube-apiserver {cp.server}, istiod http {cp.istiod_url}, xDS {cp.istiod_grpc}")
        version = cp.api("GET", "/version")
        print(f"kube-apiserver version {version['gitVersion']}")
        create_objects(cp)
        entry = wait_registry(cp)
        ports = [f"{p.get('name')}/{p.get('port')}/{p.get('protocol')}" for p in entry.get("ports", [])]
        print(f"istiod /debug/registryz: {FQDN} ports {ports}")

        proxy_id = f"sleep.{NS}"
        node_id = f"sidecar~{CLIENT_IP}~{proxy_id}~{NS}.svc.{DOMAIN}"
        with xds.AdsStream(cp.istiod_grpc, node_id, sidecar_metadata()) as ads:
            clusters = [xds.resource_name(r) for _, r in ads.request(xds.CLUSTER)]
            print(f"CDS for {node_id}: first answer {len(clusters)} clusters")
            if WANT not in clusters:
                # istiod debounces registry changes: the Service can come one push later.
                def has_want(resources) -> bool:
                    return WANT in {xds.resource_name(r) for _, r in resources}

                try:
                    clusters = [xds.resource_name(r) for _, r in ads.wait_for(xds.CLUSTER, has_want, 30)]
                except xds.XdsError as e:
                    raise ControlPlaneError(f"{WANT} not in CDS: {sorted(clusters)} ({e})") from None
                print(f"CDS push: {len(clusters)} clusters")
            print(f"  all: {sorted(clusters)}")
            outbound = sorted(c for c in clusters if c.startswith("outbound|") and c.endswith(f"|{FQDN}"))
            for c in outbound:
                print(f"  outbound for {SVC}: {c}")
            if WANT not in clusters:
                raise ControlPlaneError(f"{WANT} not in CDS: {sorted(clusters)}")
            cla = ads.request(xds.ENDPOINT, [WANT])
            addrs = [a for _, r in cla for a in xds.endpoint_addresses(r)]
            print(f"EDS {WANT}: {addrs}")

            # Debug endpoints that need a connected proxy, while this one is.
            dump = cp.istiod_get(f"/debug/config_dump?proxyID={proxy_id}")
            kinds = [c.get("@type", "?").rsplit(".", 1)[-1] for c in dump.get("configs", [])] \
                if isinstance(dump, dict) else [str(dump)[:200]]
            print(f"istiod /debug/config_dump?proxyID={proxy_id}: {kinds}")
            syncz = cp.istiod_get("/debug/syncz")
            print(f"istiod /debug/syncz: {[s.get('proxy') for s in syncz] if isinstance(syncz, list) else syncz}")

        if f"{SERVER_IP}:{PORT}" not in addrs:
            raise ControlPlaneError(f"EDS for {WANT} has no {SERVER_IP}:{PORT}: {addrs}")
        print(f"OK: istiod served {WANT} with endpoint {SERVER_IP}:{PORT}")
        return 0


if __name__ == "__main__":
    _interrupt_on_sigterm()
    try:
        sys.exit(main())
    except (ControlPlaneError, xds.XdsError) as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
