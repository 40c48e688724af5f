"""Endpoint mode (issue 13) on the real istiod: the shipped install with
`"mode": "endpoint"` (through the overlay, install.py), envlane-sync run as
its Deployment would, and the alibaba topology whose sidecars are real Envoy
1.40s connected to istiod.

What envlane-sync writes (no DestinationRule; per Service one route
EnvoyFilter holding a CLUSTER ADD patch per port and the route patch), what
istiod makes of the CLUSTER ADD (its /debug/config_dump for the client, and
the client Envoy's own dump: one ORIGINAL_DST cluster per service port,
Istio's mTLS from `sds-grpc`, SANs = the SPIFFE ids of the pods' service
accounts), that Envoy takes it all, that the sidecar's cluster count does
not grow with envs, and real mTLS traffic through an ORIGINAL_DST cluster.

As in sidecar.py, istio-agent does not run. Its bootstrap's `sds-grpc`
cluster is given to every sidecar here, pointing at the stand-in SDS server
(sds/, shared_proxy.py): without it Envoy refuses the added clusters (their
SDS config names a cluster it does not have), and with SDS not answering
they never warm (`initial_fetch_timeout: 0s`). The SDS server serves a test
workload certificate (`default`: a leaf signed by a test CA, with the CA) and
the test CA's bundle (`ROOTCA`). Every Pod gets `serviceAccountName` = its
`app` label, so the SANs name per-service identities, not `default`.

Traffic (`vault`, a Service of this module): its pods are TLS servers with
leaves of the test CA that require the client certificate. `vault-dev`
presents the identity of its service account; `vault-dev-proj1` (same
service account) presents another one, `impostor`: the ORIGINAL_DST
cluster's SAN check must refuse it.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import time
from pathlib import Path

import pytest

import mesh as mesh_mod
import shared_proxy as sp
import sidecar as sc
from cluster import Cluster
from conftest import FIGURES, shipped_settings
from harness import Envoy, Process, free_port, wait_for
from install import SYNC_BIN
from mesh import APP_PORT, SERVICE_PORT, DeployedMesh
from topologies import ALIBABA

NS = "epshop"
ROOT_NS = "istio-system"
TRUST_DOMAIN = "cluster.local"
ENDPOINTS_SUBSET = "envlane-endpoints"
VAULT = "vault"
VAULT_PORT = 9443  # vault's targetPort: the address the filter writes
NEW_ENV = "dev.proj3"  # (3): a new env of java
ISTIO_ORIGINAL_DST = {"PassthroughCluster", "InboundPassthroughCluster"}
OWNED = "app.kubernetes.io/managed-by=envlane-sync"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def fqdn(service: str) -> str:
    return f"{service}.{NS}.svc.cluster.local"


def spiffe(sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/{sa}"


def endpoint_cluster(service: str, port: int = SERVICE_PORT) -> str:
    return f"outbound|{port}|{ENDPOINTS_SUBSET}|{fqdn(service)}"


# -- pods with a service account, sidecars with istio-agent's sds-grpc ---------------

class SaCluster(Cluster):
    """Cluster whose Pods run as the ServiceAccount named by their `app`
    label (created on first use). IPs come from the session's Cluster, so
    they never clash with the other modules' Pods."""

    def __init__(self, base: Cluster):
        super().__init__(base.cp)
        self.base = base

    def allocate_ip(self) -> str:
        return self.base.allocate_ip()

    def pod(self, ns: str, name: str, labels: dict[str, str], *, port: int, ready: bool = True,
            ip: str | None = None) -> str:
        sa = labels.get("app", "default")
        self.api("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa},
        }, ok=(409,))
        ip = ip or self.allocate_ip()
        self.api("POST", f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "node-0", "serviceAccountName": sa, "containers": [{
                "name": "app", "image": "registry.invalid/envlane/testapp:0",
                "ports": [{"name": "http", "containerPort": port}],
            }]},
        })
        self._status(ns, name, ip, ready)
        return ip


class SdsSidecar(sc.Sidecar):
    """sidecar.Sidecar plus istio-agent's `sds-grpc` cluster (the stand-in
    SDS server at `sds_port`) and the pod's service account in its node
    metadata."""

    def __init__(self, *, ns, pod, ip, labels, xds, port, workdir, sds_port: int):
        self.ns, self.pod, self.ip, self.port = ns, pod, ip, port
        self.egress = f"{ip}:{port}"
        boot = sc.bootstrap(ns=ns, pod=pod, ip=ip, labels=labels, xds=xds, admin_port=free_port())
        boot["node"]["metadata"]["SERVICE_ACCOUNT"] = labels.get("app", "default")
        sc.add_sds_cluster(boot, sds_port)
        self.envoy = Envoy(f"envoy-{ns}-{pod}", boot, workdir)


# -- test PKI and TLS apps -------------------------------------------------------------

def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> dict[str, tuple[Path, Path]]:
    """A test CA and leaves signed by it: `client` (the sidecars' workload
    certificate), `vault` and `impostor` (the vault pods'). name -> (cert, key);
    the client's cert file holds the leaf and the CA (SDS `default`; the
    stand-in serves the same file as `ROOTCA`, so the CA is trusted)."""
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.pem", d / "ca-key.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/O=envlane-e2e/CN=test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    out = {"ca": (ca, ca_key)}
    for name in ("client", VAULT, "impostor"):
        key, csr, cert = d / f"{name}-key.pem", d / f"{name}.csr", d / f"{name}.pem"
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                str(key), "-out", str(csr), "-subj", "/O=envlane-e2e")
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName=URI:{spiffe(name)}\nbasicConstraints=CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth,clientAuth\n")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                "-out", str(cert), "-days", "2", "-extfile", str(ext))
        out[name] = (cert, key)
    chain = d / "client-chain.pem"
    chain.write_text(out["client"][0].read_text() + ca.read_text())
    out["client-chain"] = (chain, out["client"][1])
    return out


TLS_APP = r"""
import http.server, ssl, sys
ip, port, name, cert, key, ca = sys.argv[1:7]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        peer = self.connection.getpeercert() or {}
        sans = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
        body = f"[{name}] peer={','.join(sans)} env={self.headers.get('x-virtual-env', '')}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        sys.stdout.write("%s %s\n" % (self.address_string(), a[0] % a[1:])); sys.stdout.flush()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED
srv = http.server.ThreadingHTTPServer((ip, int(port)), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("listening", flush=True)
srv.serve_forever()
"""


# -- reading --------------------------------------------------------------------------

def filter_targets(table: dict) -> list[str]:
    """The clusters the filter can choose for `table` (`envlane-sync
    route-patches`, the filter's own table code)."""
    out = subprocess.run([str(SYNC_BIN), "route-patches", "-"], input=json.dumps(table),
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out)["targets"]


def as_cluster_mode(table: dict) -> dict:
    """The same table as cluster mode would have it (no endpoint fields)."""
    t = copy.deepcopy(table)
    t["mode"] = "cluster"
    for s in t.get("services", []):
        s.pop("endpoints", None)
        s.pop("targetPorts", None)
    return t


def dump_clusters(dump: dict) -> dict[str, dict]:
    """Every cluster (static and dynamic active) of an Envoy-shaped dump."""
    sec = sc.sections(dump)["ClustersConfigDump"]
    out = {c["cluster"]["name"]: c["cluster"] for c in sec.get("static_clusters", [])}
    out.update({c["cluster"]["name"]: c["cluster"] for c in sec.get("dynamic_active_clusters", [])})
    return out


def original_dst(clusters: dict[str, dict]) -> dict[str, dict]:
    return {n: c for n, c in clusters.items() if c.get("type") == "ORIGINAL_DST"}


def warming(dump: dict) -> list[str]:
    sec = sc.sections(dump)["ClustersConfigDump"]
    return [c["cluster"]["name"] for c in sec.get("dynamic_warming_clusters", [])]


def envoy_filter(cluster: Cluster, service: str) -> dict | None:
    return cluster.get("networking.istio.io/v1alpha3", "EnvoyFilter", ROOT_NS, f"envlane-routes.{NS}.{service}")


def route_vhost(dump: dict, service: str) -> dict:
    rc = sc.route_configs(dump)[str(SERVICE_PORT)]
    return {v["name"]: v for v in rc["virtual_hosts"]}[f"{fqdn(service)}:{SERVICE_PORT}"]


def fact(name: str, text: str) -> None:
    """A fact found, printed and kept for the run's "e2e figures" section."""
    FIGURES[f"endpoint mode on istiod, {name}"] = text
    print(f"e2e fact: {text}")


# -- the deployment -------------------------------------------------------------------

SERVICES = [s.name for s in ALIBABA.services] + [VAULT]
SAS = {s: s for s in SERVICES}  # every service's pods run as the service's name


@pytest.fixture(scope="module")
def shop(cp, cluster, start_sync, workdir):
    d = workdir / "endpoint-istiod"
    d.mkdir()
    pki = make_pki(d / "pki")
    chain, key = pki["client-chain"]
    sds = Process("sds-endpoint", [str(sp.sds_binary()), f"127.0.0.1:{(sds_port := free_port())}",
                                   str(chain), str(key)], d)
    wait_for(lambda: "sds on" in sds.log(), "the stand-in SDS server listening", 10, sds)
    settings = {**shipped_settings(), "mode": "endpoint"}
    sync = start_sync(settings, "sync-endpoint-istiod")
    cluster = SaCluster(cluster)
    cluster.namespace(NS, {"istio-injection": "enabled", "envlane.io/enabled": "true"})
    # vault first: its TLS pods, so the first table already has them.
    cluster.service(NS, VAULT, port=SERVICE_PORT, target_port=VAULT_PORT)
    apps: list[Process] = [sds]
    for env, presents in (("dev", VAULT), ("dev.proj1", "impostor")):
        pod = f"{VAULT}-{env.replace('.', '-')}"
        ip = cluster.pod(NS, pod, {"app": VAULT, "virtual-env": env}, port=VAULT_PORT)
        cert, pkey = pki[presents]
        app = Process(f"app-{NS}-{pod}", ["python3", "-c", TLS_APP, ip, str(VAULT_PORT), f"{VAULT} @ {env}",
                                          str(cert), str(pkey), str(pki["ca"][0])], d)
        apps.append(app)
        wait_for(lambda app=app: "listening" in app.log(), f"TLS app {pod}", 10, app)
    cluster.sync_endpoints(NS, VAULT)
    mesh = DeployedMesh(cluster, NS, ALIBABA, d, cp.istiod_grpc)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mesh_mod, "Sidecar", functools.partial(SdsSidecar, sds_port=sds_port))
            mesh.start()
        envs = {env for s in ALIBABA.services for env in s.envs}

        def converged():
            wp = cluster.get("extensions.istio.io/v1alpha1", "WasmPlugin", NS, "envlane")
            table = wp and wp["spec"]["pluginConfig"]
            if not table or not envs <= {e["name"] for e in table.get("envs", [])}:
                return None
            # (In the full suite the table also has the earlier modules' services.)
            if not {fqdn(s) for s in SERVICES} <= {s["host"] for s in table["services"]}:
                return None
            held = all(sc.ecds_table(s.config_dump()) == table for s in mesh.sidecars.values())
            return held and table

        table = wait_for(converged, f"the {NS} endpoint-mode table in every sidecar", 90)
        targets = set(filter_targets(table))

        def pushed():
            dump = mesh.client.config_dump()
            return (targets <= set(dump_clusters(dump))
                    and all("inline_cluster_specifier_plugin" in r["route"]
                            for s in SERVICES for r in route_vhost(dump, s)["routes"]))

        wait_for(pushed, "istiod's push of the ORIGINAL_DST clusters and route patches", 90)
        yield mesh, cluster, sync, table
    finally:
        mesh.close()
        for a in apps:
            a.close()
        restore_cluster_mode(cluster, sync, start_sync)


def restore_cluster_mode(cluster: Cluster, sync, start_sync) -> None:
    """Leaves the control plane as the rest of the suite expects it: this
    namespace opted out (its objects deleted) and the shipped settings
    (cluster mode) rendered, so no EnvoyFilter keeps a CLUSTER ADD for
    sidecars without `sds-grpc` (upstream Envoy as sidecar.py bootstraps it)."""
    cluster.namespace(NS, {"istio-injection": "enabled"})

    def opted_out():
        names = [f["metadata"]["name"] for f in cluster.list("networking.istio.io/v1alpha3", "EnvoyFilter", ROOT_NS)]
        return not any(n.startswith(f"envlane-routes.{NS}.") for n in names)

    sync.wait(opted_out, f"envlane-sync deleting the route EnvoyFilters of {NS}", 60)
    sync.stop()
    restored = start_sync(shipped_settings(), "sync-endpoint-istiod-restore")

    def no_cluster_add():
        return not any(p["applyTo"] == "CLUSTER"
                       for f in cluster.list("networking.istio.io/v1alpha3", "EnvoyFilter", ROOT_NS)
                       for p in f["spec"].get("configPatches", []))

    restored.wait(no_cluster_add, "cluster mode: no CLUSTER ADD patch left", 60)


# -- (1) what envlane-sync wrote ---------------------------------------------------

def test_no_destination_rule_and_one_envoy_filter_per_service_with_cluster_add_and_route_patch(shop):
    mesh, cluster, sync, table = shop
    # None of envlane-sync's, in any namespace (in the full suite, the
    # earlier modules' cluster-mode DestinationRules are deleted), and none
    # at all for this module's Services.
    def owned():
        return cluster.list("networking.istio.io/v1", "DestinationRule", selector=OWNED)

    wait_for(lambda: owned() == [], "no DestinationRule of envlane-sync", 30)
    drs = cluster.list("networking.istio.io/v1", "DestinationRule", NS)
    assert drs == [], [d["metadata"]["name"] for d in drs]
    pairs = sum(len(s["envs"]) for s in table["services"] if s["host"].endswith(f".{NS}.svc.cluster.local"))
    fact("envlane-sync's objects", f"endpoint mode: envlane-sync wrote 0 DestinationRules (none of its own in any "
         f"namespace) for {len(SERVICES)} services with {pairs} (service, env) pairs")
    for svc in SERVICES:
        ef = envoy_filter(cluster, svc)
        assert ef is not None, svc
        patches = ef["spec"]["configPatches"]
        adds = [p for p in patches if p["applyTo"] == "CLUSTER"]
        routes = [p for p in patches if p["applyTo"] == "HTTP_ROUTE"]
        assert len(adds) == 1, patches  # one service port
        (add,) = adds
        assert add["match"] == {"context": "SIDECAR_OUTBOUND"}
        assert add["patch"]["operation"] == "ADD"
        value = add["patch"]["value"]
        assert value["name"] == endpoint_cluster(svc)
        assert value["type"] == "ORIGINAL_DST" and value["lb_policy"] == "CLUSTER_PROVIDED"
        assert routes, patches
        for r in routes:
            assert r["patch"]["operation"] == "MERGE"
            spec = json.dumps(r["patch"]["value"])
            assert endpoint_cluster(svc) in spec, spec
    fact("EnvoyFilters", f"endpoint mode: each of {len(SERVICES)} route EnvoyFilters (envlane-routes.{NS}.SVC) holds "
         "1 CLUSTER ADD (SIDECAR_OUTBOUND) per service port and the route patch mapping it")


# -- (2) what istiod generated and Envoy took ---------------------------------------

def check_endpoint_cluster(c: dict, svc: str, where: str) -> None:
    assert c["type"] == "ORIGINAL_DST", (where, c)
    assert c["lb_policy"] == "CLUSTER_PROVIDED", (where, c)
    assert "original_dst_lb_config" not in c, (where, c)  # no use_http_header
    ts = c["transport_socket"]
    assert ts["name"] == "envoy.transport_sockets.tls", (where, ts)
    tls = ts["typed_config"]
    assert tls["@type"] == TLS_TYPE, (where, tls)
    assert tls["sni"] == f"outbound_.{SERVICE_PORT}_._.{fqdn(svc)}", (where, tls)
    ctx = tls["common_tls_context"]
    (cert,) = ctx["tls_certificate_sds_secret_configs"]
    combined = ctx["combined_validation_context"]
    root = combined["validation_context_sds_secret_config"]
    for secret, name in ((cert, "default"), (root, "ROOTCA")):
        assert secret["name"] == name, (where, secret)
        (grpc,) = secret["sds_config"]["api_config_source"]["grpc_services"]
        assert grpc["envoy_grpc"]["cluster_name"] == "sds-grpc", (where, secret)
    sans = combined["default_validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "URI", "matcher": {"exact": spiffe(SAS[svc])}}], (where, sans)


def test_istiod_generates_one_original_dst_cluster_per_service_port_with_istio_mtls(shop, cp):
    mesh, _, _, table = shop
    targets = filter_targets(table)
    ours = sorted(t for t in targets if t.endswith(f".{NS}.svc.cluster.local"))
    assert ours == sorted(endpoint_cluster(s) for s in SERVICES), targets
    istiod = dump_clusters(sp.istiod_dump(cp, f"client.{NS}"))
    envoy = dump_clusters(mesh.client.config_dump())
    for where, clusters in (("istiod", istiod), ("envoy", envoy)):
        odst = original_dst(clusters)
        # Istio's own ORIGINAL_DST clusters (PassthroughCluster,
        # InboundPassthroughCluster) aside, exactly the filter's targets.
        # (In the full suite, other opted-in namespaces' Services have theirs.)
        mine = sorted(n for n in odst if n not in ISTIO_ORIGINAL_DST and n.endswith(f".{NS}.svc.cluster.local"))
        assert mine == ours, (where, sorted(odst))
        assert all(n in ISTIO_ORIGINAL_DST or f"|{ENDPOINTS_SUBSET}|" in n for n in odst), (where, sorted(odst))
        for svc in SERVICES:
            check_endpoint_cluster(odst[endpoint_cluster(svc)], svc, where)
        # No cluster per (service, env): only the services' own ones.
        per_env = [n for n in clusters if n.startswith("outbound|") and n.split("|")[2] not in ("", ENDPOINTS_SUBSET)
                   and n.endswith(f".{NS}.svc.cluster.local")]
        assert per_env == [], (where, per_env)
    assert warming(mesh.client.config_dump()) == []
    fact("istiod's clusters", f"istiod generated, and the client Envoy holds (active, not warming), exactly {len(ours)} "
         "ORIGINAL_DST clusters outbound|8080|envlane-endpoints|FQDN (one per service port), "
         "CLUSTER_PROVIDED, TLS with SDS default/ROOTCA over sds-grpc, SNI outbound_.8080_._.FQDN, "
         "SAN = spiffe://cluster.local/ns/NS/sa/SA of the Service's pods; no per-env cluster")


def test_route_patch_maps_the_endpoint_cluster_in_envoy(shop):
    mesh, _, _, _ = shop
    dump = mesh.client.config_dump()
    for svc in SERVICES:
        for r in route_vhost(dump, svc)["routes"]:
            plugin = r["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
            tree = plugin["cluster_matcher"]["matcher_tree"]
            assert tree["input"]["typed_config"]["key"] == "wasm.envlane_route"
            exact = tree["exact_match_map"]["map"]
            assert list(exact) == [endpoint_cluster(svc)], exact
            assert exact[endpoint_cluster(svc)]["action"]["typed_config"]["cluster"] == endpoint_cluster(svc)
            default = plugin["cluster_matcher"]["on_no_match"]["action"]["typed_config"]["cluster"]
            assert default == f"outbound|{SERVICE_PORT}||{fqdn(svc)}"


def test_envoy_rejected_no_update(shop):
    mesh, _, sync, _ = shop
    for sidecar in mesh.sidecars.values():
        stats = sidecar.stats()
        assert sc.rejected_updates(stats) == {}, (sidecar.pod, sc.rejected_updates(stats))
        for kind in ("cluster_manager.cds", "listener_manager.lds"):
            assert stats.get(f"{kind}.update_success", 0) > 0, (sidecar.pod, kind)
        assert any(k.endswith(".update_success") and k.startswith("http.") and "rds" in k and v
                   for k, v in stats.items()), sidecar.pod
        assert warming(sidecar.config_dump()) == [], sidecar.pod
    assert sync.alive()
    fact("Envoy updates", f"all {len(mesh.sidecars)} sidecars took every CDS/LDS/RDS update "
         "(no update_rejected, no config_fail, no warming cluster) with the CLUSTER ADD patches")


# -- (3) clusters do not grow with envs ---------------------------------------------

def test_cluster_count_stays_when_an_env_is_added(shop):
    mesh, cluster, sync, table = shop
    java = fqdn("java")
    before_dump = mesh.client.config_dump()
    before = set(dump_clusters(before_dump))
    cds_before = mesh.client.stats().get("cluster_manager.cds.update_success", 0)
    pairs_before = {e["name"] for s in table["services"] if s["host"] == java for e in
                    (table["envs"][i] for i in s["envs"])}
    assert NEW_ENV not in pairs_before
    cluster_mode_before = len(filter_targets(as_cluster_mode(table)))

    ip = cluster.pod(NS, "java-dev-proj3", {"app": "java", "virtual-env": NEW_ENV}, port=APP_PORT)
    cluster.sync_endpoints(NS, "java")

    def grown():
        t = sc.ecds_table(mesh.client.config_dump())
        if not t:
            return None
        names = [e["name"] for e in t["envs"]]
        svc = next(s for s in t["services"] if s["host"] == java)
        return NEW_ENV in names and names.index(NEW_ENV) in svc["envs"] and t

    new_table = wait_for(grown, f"the client's table with (java, {NEW_ENV})", 60)
    svc = next(s for s in new_table["services"] if s["host"] == java)
    where = svc["envs"].index([e["name"] for e in new_table["envs"]].index(NEW_ENV))
    assert svc["endpoints"][where] == [ip], svc
    # An absence window: nothing may be added while istiod's pushes for the
    # new pod (EDS) and any config change land.
    time.sleep(5)
    after_dump = mesh.client.config_dump()
    after = set(dump_clusters(after_dump))
    # No cluster came with the pair; java's clusters are the same. (Other
    # namespaces' clusters may leave meanwhile: earlier modules tear down.)
    assert not after - before, sorted(after - before)
    of_java = lambda names: {n for n in names if n.endswith(f"|{java}")}  # noqa: E731
    assert of_java(after) == of_java(before), (sorted(of_java(before)), sorted(of_java(after)))
    assert sorted(filter_targets(new_table)) == sorted(filter_targets(table))
    assert sc.rejected_updates(mesh.client.stats()) == {}
    cluster_mode_after = len(filter_targets(as_cluster_mode(new_table)))
    assert cluster_mode_after == cluster_mode_before + 1
    cds_after = mesh.client.stats().get("cluster_manager.cds.update_success", 0)
    FIGURES["endpoint mode, client sidecar clusters"] = (
        f"{len(before)} before and {len(after)} after adding (java, {NEW_ENV}); the filter's targets "
        f"{len(filter_targets(table))} -> {len(filter_targets(new_table))} (cluster mode: "
        f"{cluster_mode_before} -> {cluster_mode_after}); CDS updates {cds_before} -> {cds_after}")
    print(f"e2e figure: endpoint mode: the client sidecar has {len(before)} clusters before and {len(after)} "
          f"after adding the pair (java, {NEW_ENV}); the same table in cluster mode names "
          f"{cluster_mode_before} -> {cluster_mode_after} env clusters")
    fact("cluster count", f"endpoint mode: adding env {NEW_ENV} to java grew the table (pod {ip} in its endpoints), "
         "not the sidecar's clusters (cluster mode would add outbound|8080|SUBSET|java...)")


# -- (4) real traffic through the ORIGINAL_DST cluster -------------------------------

def test_alibaba_answers_through_the_endpoint_clusters(shop):
    """The alibaba apps are plain HTTP, the ORIGINAL_DST clusters mTLS: an
    env request to them fails the handshake; the filter did pick (the
    cluster opened the connection)."""
    mesh, _, _, _ = shop
    name = endpoint_cluster("node")
    cx = f"cluster.{name}.upstream_cx_total"
    before = mesh.client.stats(cx).get(cx, 0)
    status, body = mesh.call("node", {"x-virtual-env": "dev.proj1"})
    assert status == 503, (status, body)
    assert mesh.client.stats(cx).get(cx, 0) > before, mesh.client.stats(name)
    fact("plain-text pods", f"an env request to a plain-text alibaba pod through {name} fails TLS ({status}): "
         "endpoint mode needs the pods' mTLS (their istio-proxy) as in the mesh")


def test_mtls_traffic_through_the_original_dst_cluster_to_the_env_pod(shop):
    mesh, cluster, _, table = shop
    name = endpoint_cluster(VAULT)
    stat = f"cluster.{name}.upstream_rq_200"
    before = mesh.client.stats(stat).get(stat, 0)
    for _ in range(3):
        status, body = mesh.call(VAULT, {"x-virtual-env": "dev"})
        assert status == 200, body
        assert body == f"[{VAULT} @ dev] peer={spiffe('client')} env=dev", body
    assert mesh.client.stats(stat).get(stat, 0) == before + 3
    fact("mTLS traffic", f"mTLS through {name}: the client sidecar connected to vault-dev's IP:{VAULT_PORT} (the address "
         f"the filter wrote), verified its SAN {spiffe(VAULT)} and presented the SDS workload certificate "
         f"({spiffe('client')})")


def test_the_san_check_refuses_a_pod_with_another_identity(shop):
    mesh, _, _, _ = shop
    name = endpoint_cluster(VAULT)
    err = f"cluster.{name}.ssl.fail_verify_san"
    before = mesh.client.stats(err).get(err, 0)
    status, body = mesh.call(VAULT, {"x-virtual-env": "dev.proj1"})
    assert status == 503, (status, body)
    assert mesh.client.stats(err).get(err, 0) > before, mesh.client.stats(name)
    fact("SAN check", f"{name} refused vault-dev-proj1, whose certificate says {spiffe('impostor')} "
         f"(not a SAN of the cluster): 503, ssl.fail_verify_san counted")


# -- a proxy without istio-agent's sds-grpc -------------------------------------------

def test_a_proxy_without_sds_grpc(shop, cp):
    """What an Envoy bootstrapped without `sds-grpc` (upstream Envoy as
    sidecar.py bootstraps it; istio-proxy always has it) makes of the CLUSTER
    ADD patches: no refusal (so the stand-in above hides none), but the
    clusters never warm and the proxy never initializes. Why this module
    gives its sidecars `sds-grpc` and leaves cluster mode behind it."""
    mesh, cluster, _, _ = shop
    pod = "bare"
    labels = {"app": "bare", sc.POD_LABEL: pod}
    ip = cluster.pod(NS, pod, labels, port=APP_PORT)
    cluster.apply(sc.sidecar_resource(NS, pod, ip, SERVICE_PORT))
    bare = sc.Sidecar(ns=NS, pod=pod, ip=ip, labels=labels, xds=cp.istiod_grpc, port=SERVICE_PORT,
                      workdir=mesh.workdir)
    try:
        wait_for(lambda: bare.stats("cluster_manager.cds.update").get("cluster_manager.cds.update_attempt", 0) > 0
                 and (bare.stats().get("cluster_manager.cds.update_rejected", 0)
                      or bare.stats().get("cluster_manager.cds.update_success", 0)), "the bare proxy's first CDS", 60)
        # An absence window: the clusters must still be warming (never
        # ready) a while after CDS was taken; there is no event to wait on.
        time.sleep(2)
        stats = bare.stats()
        dump = bare.config_dump()
        odst = sorted(n for n in dump_clusters(dump) if f"|{ENDPOINTS_SUBSET}|" in n)
        refused = sc.rejected_updates(stats)
        errors = [line for line in bare.envoy.process.log().splitlines()
                  if "sds-grpc" in line or "rejected" in line.lower()][:3]
        warm = warming(dump)
        state = bare.admin("/ready").strip()
        print(f"bare proxy: warming {warm}, /ready {state}, errors {errors}")
        # Not refused: the clusters wait for secrets nobody serves
        # (initial_fetch_timeout 0s, as istiod's own ISTIO_MUTUAL clusters),
        # and Envoy's initialization with them: the proxy never gets ready.
        assert refused == {}, refused
        assert {endpoint_cluster(s) for s in SERVICES} <= set(warm), warm
        assert odst == [] and state != "LIVE", (odst, state)
        fact("proxy without sds-grpc", f"an Envoy without sds-grpc: CDS rejected={refused or 'none'}, "
             f"endpoint clusters active={len(odst)}, warming={len(warm)} "
             f"({sum(f'|{ENDPOINTS_SUBSET}|' in n for n in warm)} of them envlane-endpoints), /ready {state}")
    finally:
        bare.close()
        cluster.delete_pod(NS, pod)
