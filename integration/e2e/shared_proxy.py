"""Real Envoy 1.40 proxies connected to the real istiod as the shared proxies
of gateway mode: a router (an ACMG-style centralized east-west gateway, an
Istio `Gateway` selecting its pod) and an ambient waypoint (a Gateway API
`Gateway` of class istio-waypoint), plus what reading their configuration
needs: istiod's own view of a proxy (/debug/config_dump, protojson turned
into Envoy's snake_case), istiod's ECDS answer for a proxy (an ADS stream
with the proxy's node identity, decoded as far as the Wasm filter), and a
stand-in SDS server (sds/, Go) so that an Envoy bootstrapped as a waypoint
finishes initializing.

As in sidecar.py, istio-agent does not run: the proxies connect to istiod's
plaintext xDS port with the node identity istio-agent would send.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import sidecar as sc
from controlplane import ControlPlane
from harness import Envoy, Process, free_port, wait_for
from xds import AdsStream, parse_fields

HERE = Path(__file__).resolve().parent
SDS_SRC = HERE / "sds"
ECDS = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
# envoy.extensions.wasm.v3.FailurePolicy
FAILURE_POLICIES = {0: "UNSPECIFIED", 1: "FAIL_RELOAD", 2: "FAIL_CLOSED", 3: "FAIL_OPEN"}


# -- bootstraps ----------------------------------------------------------------

def router_bootstrap(*, ns: str, pod: str, ip: str, labels: dict[str, str], xds: str) -> dict:
    """sidecar.bootstrap with istio-agent's node id for a gateway pod
    (`router~IP~POD.NS~NS.svc.DOMAIN`): istiod then builds listeners from
    the Istio Gateways that select the pod's labels."""
    boot = sc.bootstrap(ns=ns, pod=pod, ip=ip, labels=labels, xds=xds, admin_port=free_port())
    boot["node"]["id"] = f"router~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"
    return boot


# The labels istiod's waypoint template gives the waypoint's pods.
def waypoint_labels(gateway: str) -> dict[str, str]:
    return {
        "gateway.networking.k8s.io/gateway-name": gateway,
        "gateway.networking.k8s.io/gateway-class-name": "istio-waypoint",
        "gateway.istio.io/managed": "istio.io-mesh-controller",
        "istio.io/dataplane-mode": "none",
        "sidecar.istio.io/inject": "false",
        "service.istio.io/canonical-name": gateway,
        "service.istio.io/canonical-revision": "latest",
    }


def waypoint_bootstrap(*, ns: str, gateway: str, pod: str, ip: str, xds: str, sds_port: int) -> dict:
    """An Envoy as the waypoint's pod: node type `waypoint`, the pod template's
    labels and metadata, istio-agent's `sds-grpc` cluster (here the stand-in
    SDS server) and the internal-listener bootstrap extension istio-agent's
    bootstrap has (main_internal is an internal listener)."""
    boot = sc.bootstrap(ns=ns, pod=pod, ip=ip, labels=waypoint_labels(gateway), xds=xds, admin_port=free_port())
    boot["node"]["id"] = f"waypoint~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"
    boot["node"]["cluster"] = f"{gateway}.{ns}"
    boot["node"]["metadata"].update({
        "INTERCEPTION_MODE": "REDIRECT",
        "WORKLOAD_NAME": gateway,
        "SERVICE_ACCOUNT": gateway,
        "OWNER": f"kubernetes://apis/apps/v1/namespaces/{ns}/deployments/{gateway}",
    })
    sc.add_sds_cluster(boot, sds_port)
    boot["bootstrap_extensions"] = [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
        "buffer_size_kb": 64}}]
    return boot


class Proxy:
    """A shared proxy's Envoy (its bootstrap kept for the node identity)."""

    def __init__(self, name: str, boot: dict, workdir: Path):
        self.boot = boot
        self.node_id = boot["node"]["id"]
        self.envoy = Envoy(name, boot, workdir)

    @property
    def proxy_id(self) -> str:
        """istiod's name for it (POD.NS), for /debug/*?proxyID=."""
        return self.node_id.split("~")[2]

    def config_dump(self) -> dict:
        return json.loads(self.envoy.admin("/config_dump?include_eds"))

    def stats(self, pattern: str = "") -> dict[str, int]:
        return self.envoy.stats(pattern)

    def close(self) -> None:
        self.envoy.close()


# -- the stand-in SDS server ----------------------------------------------------

def sds_binary() -> Path:
    """sds/ built with `go build` (modules as pinned by sds/go.sum, the
    versions istiod's go.sum pins, so the module cache already has them) into
    ${XDG_CACHE_HOME:-~/.cache}/envlane/e2e-sds/KEY/sds, KEY a hash of the
    sources, the Go version and the flags, as scripts/controlplane.sh caches."""
    flags = ["-trimpath", "-mod=readonly", "-buildvcs=false"]
    version = subprocess.run(["go", "env", "GOVERSION", "GOOS", "GOARCH"], capture_output=True, text=True,
                             check=True).stdout
    h = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        h.update((SDS_SRC / name).read_bytes())
    h.update((version + " ".join(flags)).encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "envlane" / "e2e-sds"
    out = root / h.hexdigest()[:16] / "sds"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": " ".join(flags)}
        r = subprocess.run(["go", "build", "-o", f"{out}.tmp", "."], cwd=SDS_SRC, env=env, capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"go build of {SDS_SRC} failed:\n{r.stderr}")
        os.replace(f"{out}.tmp", out)
    return out


def start_sds(workdir: Path, spiffe: str) -> tuple[Process, int]:
    """The stand-in SDS server with a fresh self-signed certificate (SAN
    `spiffe`); returns the process and its port."""
    key, cert = workdir / "sds-key.pem", workdir / "sds-cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/O=cluster.local",
                    "-addext", f"subjectAltName=URI:{spiffe}"], check=True, capture_output=True)
    port = free_port()
    p = Process("sds", [str(sds_binary()), f"127.0.0.1:{port}", str(cert), str(key)], workdir)
    wait_for(lambda: "sds on" in p.log(), "the stand-in SDS server listening", 10, p)
    return p, port


# -- reading istiod -------------------------------------------------------------

def snake(obj):
    """istiod's /debug/config_dump is protojson (camelCase); the Envoy admin
    dump and the helpers in sidecar.py use the proto names. Map keys that
    are not field names (cluster names, metadata keys) are kept."""
    if isinstance(obj, dict):
        return {(re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", k).lower() if re.fullmatch(r"[a-z][A-Za-z0-9]*", k) else k):
                snake(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snake(x) for x in obj]
    return obj


def istiod_dump(cp: ControlPlane, proxy_id: str) -> dict:
    """What istiod generates for a connected proxy, in Envoy's field names."""
    return snake(cp.istiod_get(f"/debug/config_dump?proxyID={proxy_id}"))


def listener_states(dump: dict) -> dict[str, tuple[str, dict]]:
    """Every dynamic listener in an Envoy dump -> (state, listener or error)."""
    out = {}
    for e in sc.sections(dump)["ListenersConfigDump"].get("dynamic_listeners", []):
        for state in ("active_state", "warming_state"):
            if state in e:
                out[e["name"]] = (state, e[state]["listener"])
        if "error_state" in e:
            # Envoy also lists refused updates of a listener it never had
            # without a name of their own: the refused config names it.
            error = e["error_state"]
            name = e.get("name") or error["failed_configuration"]["name"]
            if out.get(name, ("error_state",))[0] == "error_state":
                out[name] = ("error_state", error)
    return out


def hcm_chains(listener: dict) -> dict[str, dict]:
    """Filter chain name -> its HTTP connection manager's typed_config."""
    out = {}
    for chain in listener.get("filter_chains", []):
        for f in chain.get("filters", []):
            if f["name"] == "envoy.filters.network.http_connection_manager":
                out[chain.get("name", "")] = f["typed_config"]
    return out


def ecds_from_istiod(cp: ControlPlane, boot: dict, name: str, timeout: float = 30.0) -> dict:
    """istiod's ECDS answer for resource `name`, asked on an ADS stream of
    our own with the proxy's node identity (same id and metadata, so the same
    WasmPlugins attach). Used for the waypoint: upstream Envoy refuses the
    listener that names the filter, so it never subscribes itself. Decoded:
    {name, type, failure_policy, filename, configuration (the JSON text)}."""
    node = boot["node"]
    with AdsStream(cp.istiod_grpc, node["id"], node["metadata"], timeout=timeout) as ads:
        resources = ads.request(ECDS, [name])
    found = []
    for _, tec in resources:
        out: dict = {}
        for num, _, val in parse_fields(tec):
            if num == 1:
                out["name"] = val.decode()
            elif num == 2:  # typed_config: Any
                for n2, _, v2 in parse_fields(val):
                    if n2 == 1:
                        out["type"] = v2.decode()
                    elif n2 == 2:
                        out.update(_wasm(v2))
        found.append(out)
    matching = [f for f in found if f.get("name") == name]
    if not matching:
        raise AssertionError(f"istiod sent no ECDS resource {name}: {[f.get('name') for f in found]}")
    return matching[0]


def _wasm(buf: bytes) -> dict:
    """envoy.extensions.filters.http.wasm.v3.Wasm{config=1 PluginConfig{
    vm_config=3 {code=3 AsyncDataSource{local=1 DataSource{filename=1}}},
    configuration=4 Any{value=2 StringValue{value=1}}, failure_policy=7}}."""
    out: dict = {"failure_policy": FAILURE_POLICIES[0]}

    def sub(b: bytes, num: int) -> list[bytes]:
        return [v for n, wt, v in parse_fields(b) if n == num and wt == 2]

    for config in sub(buf, 1):
        for num, wt, val in parse_fields(config):
            if num == 7 and wt == 0:
                out["failure_policy"] = FAILURE_POLICIES.get(val, str(val))
            elif num == 4:
                for value in sub(val, 2):
                    out["configuration"] = b"".join(sub(value, 1)).decode()
            elif num == 3:
                for code in sub(val, 3):
                    for local in sub(code, 1):
                        for filename in sub(local, 1):
                            out["filename"] = filename.decode()
    return out
