"""A real Envoy 1.40 as a Pod's sidecar, configured by the real istiod over ADS.

istio-agent is not run (it needs istiod's CA, which is off here): Envoy
connects to istiod's plaintext xDS port itself, with the node identity and
metadata istio-agent would send. No iptables: a `Sidecar` resource (one per
Pod, selected by the Pod's `envlane-e2e/pod` label) gives the Pod an egress
listener bound to its own IP (`captureMode: NONE`), which is where its app
sends outbound requests.

Upstream Envoy is not istio-proxy. What istiod would otherwise send that only
istio-proxy understands is turned off by istiod settings, each with its
reason below; nothing is edited in flight (STRIPPED is empty, and a test
keeps it so unless an entry is added with a reason).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import Envoy, free_port

ISTIO_VERSION = "1.31.0"
CLUSTER_ID = "Kubernetes"
POD_LABEL = "envlane-e2e/pod"

# istiod environment: name -> (value, why upstream Envoy needs it).
ISTIOD_ENV = {
    "PILOT_ENABLE_METADATA_EXCHANGE": (
        "false",
        "the metadata-exchange filters (istio.metadata_exchange, peer_metadata) exist only in istio-proxy",
    ),
    "PILOT_ENABLE_ALPN_FILTER": (
        "false",
        "the istio.alpn HTTP filter exists only in istio-proxy",
    ),
}
# meshConfig lines: (YAML, why).
MESH_CONFIG = [
    (
        "enableAutoMtls: false",
        "no CA runs, so no workload certificates: auto mTLS would give every cluster an "
        "ISTIO_MUTUAL transport socket whose secrets come from istio-agent's SDS",
    ),
]
# Telemetry needs nothing: with meshConfig.defaultProviders empty (Istio's
# default) istiod adds no istio.stats filter unless a Telemetry resource asks.

# Parts of istiod's configuration removed before Envoy sees them:
# {what: why}. Empty: nothing is stripped.
STRIPPED: dict[str, str] = {}


def istiod_env() -> dict[str, str]:
    return {k: v for k, (v, _) in ISTIOD_ENV.items()}


def mesh_config() -> str:
    return "".join(line + "\n" for line, _ in MESH_CONFIG)


def sidecar_resource(ns: str, pod: str, ip: str, port: int, protocol: str = "HTTP") -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": f"e2e-{pod}", "namespace": ns},
        "spec": {
            "workloadSelector": {"labels": {POD_LABEL: pod}},
            "egress": [{
                "port": {"number": port, "protocol": protocol, "name": f"egress-{port}"},
                "bind": ip,
                "captureMode": "NONE",
                "hosts": ["*/*"],
            }],
        },
    }


def bootstrap(*, ns: str, pod: str, ip: str, labels: dict[str, str], xds: str, admin_port: int,
              domain: str = "cluster.local") -> dict:
    host, _, port = xds.rpartition(":")
    app = labels.get("app", pod)
    return {
        "node": {
            # istio-agent's node id: TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN
            "id": f"sidecar~{ip}~{pod}.{ns}~{ns}.svc.{domain}",
            "cluster": f"{app}.{ns}",
            "metadata": {
                "NAMESPACE": ns,
                "NAME": pod,
                "LABELS": labels,
                "ISTIO_VERSION": ISTIO_VERSION,
                "CLUSTER_ID": CLUSTER_ID,
                "MESH_ID": domain,
                "INTERCEPTION_MODE": "NONE",
                "INSTANCE_IPS": ip,
                "WORKLOAD_NAME": app,
                "OWNER": f"kubernetes://apis/v1/namespaces/{ns}/pods/{pod}",
                "SERVICE_ACCOUNT": "default",
                "NODE_NAME": "node-0",
                "POD_PORTS": "[]",
            },
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}},
            }]}]},
        }]},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
    }


class Sidecar:
    """One Pod's Envoy. `egress` is the address its app sends outbound to."""

    def __init__(self, *, ns: str, pod: str, ip: str, labels: dict[str, str], xds: str,
                 port: int, workdir: Path):
        self.ns, self.pod, self.ip, self.port = ns, pod, ip, port
        self.egress = f"{ip}:{port}"
        boot = bootstrap(ns=ns, pod=pod, ip=ip, labels=labels, xds=xds, admin_port=free_port())
        self.envoy = Envoy(f"envoy-{ns}-{pod}", boot, workdir)

    def admin(self, path: str) -> str:
        return self.envoy.admin(path)

    def config_dump(self) -> dict:
        return json.loads(self.admin("/config_dump?include_eds"))

    def stats(self, pattern: str = "") -> dict[str, int]:
        return self.envoy.stats(pattern)

    def close(self) -> None:
        self.envoy.close()


def add_sds_cluster(boot: dict, sds_port: int) -> None:
    """The `sds-grpc` cluster istio-agent's bootstrap has, pointed at a
    stand-in SDS server on loopback (gRPC, as the xDS cluster)."""
    xds_cluster = boot["static_resources"]["clusters"][0]
    boot["static_resources"]["clusters"].append({
        "name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": xds_cluster["typed_extension_protocol_options"],
        "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": sds_port}}}}]}]},
    })


def sections(dump: dict) -> dict[str, dict]:
    """config_dump sections by short type name (ListenersConfigDump, ...)."""
    return {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}


def listeners(dump: dict) -> dict[str, dict]:
    out = {}
    for entry in sections(dump)["ListenersConfigDump"].get("dynamic_listeners", []):
        if "active_state" in entry:
            out[entry["name"]] = entry["active_state"]["listener"]
    return out


def http_filters(listener: dict) -> list[dict]:
    for chain in listener.get("filter_chains", []):
        for f in chain["filters"]:
            if f["name"] == "envoy.filters.network.http_connection_manager":
                return f["typed_config"].get("http_filters", [])
    return []


def route_configs(dump: dict) -> dict[str, dict]:
    return {r["route_config"]["name"]: r["route_config"]
            for r in sections(dump)["RoutesConfigDump"].get("dynamic_route_configs", [])}


def ecds(dump: dict) -> dict[str, dict]:
    sec = sections(dump).get("EcdsConfigDump", {})
    return {e["ecds_filter"]["name"]: e for e in sec.get("ecds_filters", [])}


def envlane_ecds(dump: dict) -> dict | None:
    """The envlane filter's ECDS entry (istiod names it after the WasmPlugin)."""
    found = [e for name, e in ecds(dump).items() if "envlane" in name]
    return found[0] if found else None


def ecds_table(dump: dict) -> dict | None:
    """The plugin config (the table) the sidecar's envlane filter holds."""
    entry = envlane_ecds(dump)
    return entry and json.loads(entry["ecds_filter"]["typed_config"]["config"]["configuration"]["value"])


def clusters(dump: dict) -> dict[str, dict]:
    sec = sections(dump)["ClustersConfigDump"]
    return {c["cluster"]["name"]: c["cluster"] for c in sec.get("dynamic_active_clusters", [])}


def rejected_updates(stats: dict[str, int]) -> dict[str, int]:
    """Every xDS update Envoy refused (non-zero *update_rejected / config_fail)."""
    return {k: v for k, v in stats.items()
            if v and (k.endswith("update_rejected") or k.endswith(".config_fail"))}
