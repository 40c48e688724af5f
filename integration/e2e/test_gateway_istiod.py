"""Gateway mode on the real istiod: what it generates from what envlane-sync
(the real process, the shipped install, plus `--gateway` / `--waypoint`)
writes, read back from a real Envoy 1.40 and from istiod itself.

Router (ACMG-style centralized east-west gateway), on the suite's istiod: the
alibaba topology with no sidecar, its apps calling each other through one
gateway Envoy connected as a router; an Istio Gateway selecting the gateway
pod keeps the services' port (a service name resolves to the gateway), one
VirtualService per service bound to it. Checked from Envoy's config dump,
then with real traffic (a caller with no env header gets its own env, found
by its pod IP in the caller table).

Waypoint (Istio ambient), on a second control plane of this module's own:
istiod with PILOT_ENABLE_AMBIENT=true and the Gateway API CRDs (the release
istiod pins, gateway_api.py) applied before it starts, a Gateway `waypoint`
of class istio-waypoint, and an Envoy 1.40 connected as its pod. Upstream
Envoy refuses the waypoint listeners that name istio-proxy-only filters, so
what the waypoint gets is read from istiod: /debug/config_dump for that
proxy, and istiod's ECDS answer to an ADS stream with the proxy's identity.
"""

from __future__ import annotations

import functools
import http.client
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import gateway_api
import shared_proxy as sp
import sidecar as sc
from cluster import Cluster
from conftest import FIGURES, shipped_settings
from controlplane import DEFAULT_CRDS, ControlPlane
from harness import TESTAPP, Process, wait_for
from install import SYNC_BIN, WASM, EnvlaneSync, install
from topologies import ALIBABA, ALIBABA_CASES

ENV_LABEL = "virtual-env"  # the shipped settings' envLabel
OPT_IN = "envlane.io/enabled=true"
SERVICE_PORT, APP_PORT = 8080, 9080
MATCHER = "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier"
WASMPLUGIN = "extensions.istio.io/v1alpha1"
ROOT_NS = "istio-system"

# Router gateway
NS = "gwshop"
GW_NS = "envlane-gw"
GW_POD = "envlane-gateway-0"
GW_LABELS = {"app": "envlane-gateway", "istio": "envlane-gateway"}
GW_FLAG = f"{GW_NS}:app=envlane-gateway"
GATEWAY = "envlane-gateway"
CLIENT_ENV = "dev.proj1"

# Waypoint
WNS = "demo"
WAYPOINT = "waypoint"
WAYPOINT_POD = "waypoint-0"


def fqdn(service: str, ns: str) -> str:
    return f"{service}.{ns}.svc.cluster.local"


def pod_name(service: str, env: str) -> str:
    return f"{service}-{env.replace('.', '-')}"


@functools.cache
def names() -> dict:
    return json.loads(subprocess.run([str(SYNC_BIN), "names"], capture_output=True, text=True, check=True,
                                     timeout=30).stdout)


def route_patches(table: dict) -> dict:
    """`envlane-sync route-patches` for a table: the patches and every
    cluster the filter can choose (`targets`), from the filter's own code."""
    out = subprocess.run([str(SYNC_BIN), "route-patches", "-"], input=json.dumps(table), capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return json.loads(out)


def valid_env(env: str) -> bool:
    """The filter's env rules (README: levels split by `.`, none empty, only
    [A-Za-z0-9_-], at most 128 bytes and 8 levels); envlane-sync skips pods
    whose label breaks them."""
    levels = env.split(".")
    return len(env) <= 128 and len(levels) <= 8 and all(re.fullmatch(r"[A-Za-z0-9_-]+", lv) for lv in levels)


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def live_callers(cluster: Cluster) -> dict[str, str]:
    """What the caller table must be, from the API server: every Ready pod
    with an env label in an opted-in namespace, by pod IP (an address held
    by pods of two envs is left out)."""
    envs: dict[str, set[str]] = {}
    for ns in cluster.list("v1", "Namespace", selector=OPT_IN):
        for p in cluster.list("v1", "Pod", ns["metadata"]["name"]):
            env = (p["metadata"].get("labels") or {}).get(ENV_LABEL)
            if env and valid_env(env) and ready(p) and not p["metadata"].get("deletionTimestamp"):
                for ip in p["status"].get("podIPs") or []:
                    envs.setdefault(ip["ip"], set()).add(env)
    return {ip: e.pop() for ip, e in envs.items() if len(e) == 1}


def table_callers(table: dict) -> dict[str, str]:
    envs = [e["name"] for e in table["envs"]]
    return {ip: envs[c["env"]] for c in table.get("callers", []) for ip in c["ips"]}


def table_caller_workloads(table: dict) -> dict[tuple[str, str], str]:
    envs = [e["name"] for e in table["envs"]]
    return {(c["namespace"], w): envs[c["env"]] for c in table.get("callerWorkloads", []) for w in c["workloads"]}


def matcher(route: dict) -> tuple[dict[str, str], str]:
    """A patched route's cluster matcher: ({filter state value: cluster}, on_no_match)."""
    plugin = route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    assert plugin["@type"] == MATCHER, plugin
    tree = plugin["cluster_matcher"]["matcher_tree"]
    assert tree["input"]["typed_config"]["key"] == "wasm.envlane_route"
    exact = {k: a["action"]["typed_config"]["cluster"] for k, a in tree["exact_match_map"]["map"].items()}
    return exact, plugin["cluster_matcher"]["on_no_match"]["action"]["typed_config"]["cluster"]


def envlane_route_filters(cluster: Cluster) -> list[dict]:
    return [ef for ef in cluster.list("networking.istio.io/v1alpha3", "EnvoyFilter", ROOT_NS)
            if ef["metadata"]["name"].startswith("envlane-routes.")]


# -- router gateway ---------------------------------------------------------------

class Router:
    """The alibaba topology behind one istiod-configured gateway Envoy."""

    def __init__(self, cp, cluster: Cluster, workdir: Path):
        self.cp, self.cluster, self.workdir = cp, cluster, workdir
        self.apps: list[Process] = []
        self.ips: dict[str, str] = {}  # pod -> IP
        self.envs: dict[str, str] = {}  # pod -> env label
        self.sync: EnvlaneSync | None = None
        self.gateway: sp.Proxy | None = None

    def start(self) -> "Router":
        c = self.cluster
        c.namespace(NS, {"envlane.io/enabled": "true"})
        # The gateway's own namespace: labelled for envlane-gateway, not opted in.
        c.namespace(GW_NS, {names()["gatewayNamespaceLabel"]: "true"})
        self.gw_ip = c.pod(GW_NS, GW_POD, GW_LABELS, port=SERVICE_PORT)
        by_name = {s.name: s for s in ALIBABA.services}
        for svc in ALIBABA.services:
            c.service(NS, svc.name, port=SERVICE_PORT, target_port=APP_PORT)
            for env in svc.envs:
                pod = pod_name(svc.name, env)
                ip = self.ips[pod] = c.pod(NS, pod, {"app": svc.name, ENV_LABEL: env}, port=APP_PORT)
                self.envs[pod] = env
                argv = [str(TESTAPP), "--name", svc.app, "--env", env, "--listen", f"{ip}:{APP_PORT}",
                        "--show", ALIBABA.show]
                if svc.next:
                    # ACMG: the next service's name resolves to the gateway;
                    # the app connects from its own pod IP.
                    argv += ["--next", f"{self.gw_ip}:{SERVICE_PORT}",
                             "--next-host", fqdn(by_name[svc.next].name, NS), "--source-ip", ip]
                self.apps.append(Process(f"app-{NS}-{pod}", argv, self.workdir))
            c.sync_endpoints(NS, svc.name)
        # A caller that is no app: the test's client, labelled like a pod.
        self.ips["client"] = c.pod(NS, "client", {"app": "client", ENV_LABEL: CLIENT_ENV}, port=APP_PORT)
        self.envs["client"] = CLIENT_ENV
        c.apply({
            "apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": GATEWAY, "namespace": GW_NS},
            "spec": {"selector": {"istio": GW_LABELS["istio"]}, "servers": [{
                # The services' own port (its listener is 0.0.0.0_8080: no
                # sidecar holds 8080 in this module).
                "port": {"number": SERVICE_PORT, "name": "http", "protocol": "HTTP"},
                "hosts": [f"{NS}/*.{NS}.svc.cluster.local"],
            }]},
        })
        for svc in ALIBABA.services:
            c.apply({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": f"gw-{svc.name}", "namespace": NS},
                "spec": {"hosts": [fqdn(svc.name, NS)], "gateways": [f"{GW_NS}/{GATEWAY}"],
                         "http": [{"route": [{"destination": {"host": fqdn(svc.name, NS),
                                                              "port": {"number": SERVICE_PORT}}}]}]},
            })
        install(self.cp, shipped_settings())
        d = self.workdir / "sync-gateway"
        d.mkdir(exist_ok=True)
        self.sync = EnvlaneSync(self.cp, d, extra_args=["--gateway", GW_FLAG]).start()
        self.gateway = sp.Proxy("envoy-gateway", sp.router_bootstrap(
            ns=GW_NS, pod=GW_POD, ip=self.gw_ip, labels=GW_LABELS, xds=self.cp.istiod_grpc), self.workdir)
        for app in self.apps:
            wait_for(lambda app=app: "listening" in app.log(), f"{app.name} listening", 10, app)
        self.gateway.envoy.wait_ready()
        return self

    listener_name = f"0.0.0.0_{SERVICE_PORT}"

    def plugin(self) -> dict | None:
        return self.cluster.get(WASMPLUGIN, "WasmPlugin", GW_NS, names()["gatewayPlugin"])

    def wait_table(self, check=lambda table: True, what: str = "the gateway's table", timeout: float = 60) -> dict:
        """Waits until envlane-sync's envlane-gateway table lists exactly the
        live callers and passes `check`, and the gateway Envoy holds that
        table (istiod pushed it over ECDS); returns it."""
        def converged():
            wp = self.plugin()
            table = wp and wp["spec"].get("pluginConfig")
            if not table or not check(table):
                return None
            have, want = table_callers(table), live_callers(self.cluster)
            if have != want:
                raise AssertionError(f"callers: table has {sorted(set(have.items()) - set(want.items()))} "
                                     f"more, misses {sorted(set(want.items()) - set(have.items()))}")
            return sc.ecds_table(self.gateway.config_dump()) == table and table
        return self.sync.wait(converged, what, timeout)

    def call(self, service: str, headers: dict[str, str] | None = None, source: str | None = None,
             host: str | None = None) -> tuple[int, str]:
        """A request through the gateway from `source` (a pod IP)."""
        conn = http.client.HTTPConnection(self.gw_ip, SERVICE_PORT, timeout=10,
                                          source_address=(source, 0) if source else None)
        try:
            conn.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
            for k, v in {"host": host or fqdn(service, NS), **(headers or {})}.items():
                conn.putheader(k, v)
            conn.endheaders()
            r = conn.getresponse()
            return r.status, r.read().decode().strip()
        finally:
            conn.close()

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.close()
        if self.sync is not None:
            self.sync.stop()
        for app in self.apps:
            app.close()


@pytest.fixture(scope="module")
def router(cp, cluster, workdir):
    r = Router(cp, cluster, workdir)
    try:
        r.start()
        r.table = r.wait_table(lambda t: {e for s in ALIBABA.services for e in s.envs} <= {e["name"] for e in t["envs"]})
        targets = set(route_patches(r.table)["targets"])
        fqdns = {f"{fqdn(s.name, NS)}:{SERVICE_PORT}" for s in ALIBABA.services}

        def pushed():
            dump = r.gateway.config_dump()
            rcs = sc.route_configs(dump)
            vhosts = {v["name"] for rc in rcs.values() for v in rc["virtual_hosts"]}
            missing = {"listener": {r.listener_name} - set(sc.listeners(dump)),
                       "clusters": targets - set(sc.clusters(dump)), "vhosts": fqdns - vhosts}
            if any(missing.values()):
                raise AssertionError(f"missing {missing}; listeners {sorted(sc.listeners(dump))}, "
                                     f"route configs {sorted(rcs)}")
            return True
        r.sync.wait(pushed, "istiod's push to the gateway (listener, every target cluster, vhosts)", 60)
        yield r
    finally:
        r.close()


def test_the_gateway_module_arrives_by_ecds_with_the_current_table(router, cluster):
    router.wait_table()
    dump = router.gateway.config_dump()
    entry = sc.envlane_ecds(dump)
    name = entry["ecds_filter"]["name"]
    assert f"{GW_NS}.{names()['gatewayPlugin']}" in name, name
    wasm = entry["ecds_filter"]["typed_config"]
    assert wasm["@type"] == "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    assert wasm["config"]["vm_config"]["code"]["local"]["filename"] == str(WASM)
    assert wasm["config"]["failure_policy"] == "FAIL_OPEN"
    table = json.loads(wasm["config"]["configuration"]["value"])
    assert table == router.plugin()["spec"]["pluginConfig"]
    assert table["proxy"] == "gateway"
    callers = table_callers(table)
    assert callers == live_callers(cluster)
    # Every pod of this topology and the client are there with their env.
    ours = {router.ips[pod]: env for pod, env in router.envs.items()}
    assert {ip: callers.get(ip) for ip in ours} == ours
    assert router.gw_ip not in callers  # the gateway's namespace is not opted in
    assert "callerWorkloads" not in table
    FIGURES["gateway: ECDS resource (router)"] = name


def test_the_filter_is_first_in_the_gateway_http_chain(router):
    listener = sc.listeners(router.gateway.config_dump())[router.listener_name]
    filters = sc.http_filters(listener)
    names_ = [f["name"] for f in filters]
    assert "envlane" in names_[0] and names_[-1] == "envoy.filters.http.router", names_
    assert sum("envlane" in n for n in names_) == 1, names_
    assert "ads" in filters[0]["config_discovery"]["config_source"], filters[0]
    FIGURES["gateway: HTTP filters (router)"] = ", ".join(names_)


def test_the_gateway_envoy_took_everything_istiod_sent(router):
    stats = router.gateway.stats()
    assert sc.rejected_updates(stats) == {}
    assert stats.get("listener_manager.lds.update_success", 0) > 0
    assert stats.get("cluster_manager.cds.update_success", 0) > 0
    reloads = {k: v for k, v in stats.items() if k.startswith("extension_config_discovery.") and k.endswith("config_reload")}
    assert any(v > 0 for v in reloads.values()), reloads


def test_every_target_the_filter_can_choose_is_a_gateway_cluster(router):
    table = router.wait_table()
    targets = route_patches(table)["targets"]
    ours = [t for t in targets if t.endswith(f".{NS}.svc.cluster.local")]
    # outbound|8080|SUBSET|FQDN: the service's port, not the gateway's.
    assert len(ours) == sum(len(s.envs) for s in ALIBABA.services), targets
    assert all(t.startswith(f"outbound|{SERVICE_PORT}|") for t in ours), ours
    clusters = sc.clusters(router.gateway.config_dump())
    assert set(targets) <= set(clusters), set(targets) - set(clusters)


def test_the_gateway_route_patch_maps_each_env_cluster_to_itself(router, cluster):
    """After the "Gateway routes:" change: envlane's GATEWAY-context patch
    lands on each service's gateway vhost (FQDN:8080, the VS host with the
    gateway server's port, which is the service's)."""
    table = router.wait_table()
    targets = route_patches(table)["targets"]
    gateway_vhosts = {p["match"].get("routeConfiguration", {}).get("vhost", {}).get("name")
                      for ef in envlane_route_filters(cluster) for p in ef["spec"]["configPatches"]
                      if p["match"].get("context") == "GATEWAY"}
    fq = [fqdn(s.name, NS) for s in ALIBABA.services]
    assert {f"{f}:{SERVICE_PORT}" for f in fq} <= gateway_vhosts, gateway_vhosts

    def patched():
        rc = sc.route_configs(router.gateway.config_dump()).get(f"http.{SERVICE_PORT}", {})
        vhosts = {v["name"]: v for v in rc.get("virtual_hosts", [])}
        vs = [vhosts.get(f"{f}:{SERVICE_PORT}") for f in fq]
        return all(v and all("inline_cluster_specifier_plugin" in r["route"] for r in v["routes"]) for v in vs) and vs
    vhosts = router.sync.wait(patched, "envlane's route patch on every gateway vhost", 30)
    for f, vhost in zip(fq, vhosts):
        want = {t: t for t in targets if t.endswith(f"|{f}")}
        for r in vhost["routes"]:
            exact, default = matcher(r)
            assert exact == want
            assert default == f"outbound|{SERVICE_PORT}||{f}"
            assert "cluster" not in r["route"]


def test_a_caller_without_header_gets_its_own_env_through_the_gateway(router):
    """Real traffic through the istiod-configured gateway: the client pod
    (labelled dev.proj1, in the caller table) sends no header; every hop
    goes through the gateway from its pod's IP."""
    client = router.ips["client"]
    assert router.call("java", source=client) == (200, f"[springboot @ {CLIENT_ENV}] <-{CLIENT_ENV}")
    assert router.call("node", source=client) == (200, ALIBABA_CASES[CLIENT_ENV])


@pytest.mark.parametrize("env", [e for e in ALIBABA_CASES if e], ids=str)
def test_the_request_header_beats_the_caller_table(router, env):
    assert router.call("node", {"x-virtual-env": env}, source=router.ips["client"]) == (200, ALIBABA_CASES[env])


def test_an_address_in_no_caller_table_gets_the_default_env(router):
    assert router.call("node", source="127.0.0.1") == (200, ALIBABA_CASES[None])


def test_a_host_with_the_service_port_finds_the_gateway_vhost(router):
    """The vhost lists only the bare FQDN, and Istio's gateway route config
    ignores the port in host matching: a caller that sends Host FQDN:8080
    (what a client of the service's name and port sends) finds the vhost."""
    rc = sc.route_configs(router.gateway.config_dump())[f"http.{SERVICE_PORT}"]
    domains = {v["name"]: v["domains"] for v in rc["virtual_hosts"]}[f"{fqdn('java', NS)}:{SERVICE_PORT}"]
    assert domains == [fqdn("java", NS)], domains
    assert rc.get("ignore_port_in_host_matching") is True, sorted(rc)
    status, body = router.call("java", source=router.ips["client"], host=f"{fqdn('java', NS)}:{SERVICE_PORT}")
    assert status == 200 and body.startswith("[springboot @ "), (status, body)
    FIGURES["gateway: Host FQDN:8080 through the router"] = (
        f"HTTP {status}: vhost domains {domains}, ignore_port_in_host_matching true")


def test_a_pod_that_is_not_ready_leaves_the_caller_table(router, cluster):
    ip = cluster.pod(NS, "caller-a", {"app": "caller", ENV_LABEL: "dev.proj2"}, port=APP_PORT)
    router.wait_table(lambda t: table_callers(t).get(ip) == "dev.proj2", "caller-a (dev.proj2) in the table")
    cluster.set_ready(NS, "caller-a", False)
    table = router.wait_table(lambda t: ip not in table_callers(t), "caller-a out of the table")
    assert ip not in table_callers(sc.ecds_table(router.gateway.config_dump()))
    assert table_callers(table) == live_callers(cluster)
    assert router.call("node", source=ip) == (200, ALIBABA_CASES[None])


def test_a_new_pod_on_a_deleted_pods_ip_gets_its_own_env(router, cluster):
    ip = cluster.pod(NS, "caller-old", {"app": "caller", ENV_LABEL: "dev.proj2"}, port=APP_PORT)
    router.wait_table(lambda t: table_callers(t).get(ip) == "dev.proj2", "caller-old (dev.proj2) in the table")
    cluster.delete_pod(NS, "caller-old")
    cluster.pod(NS, "caller-new", {"app": "caller", ENV_LABEL: "dev.proj1.feature1"}, port=APP_PORT, ip=ip)
    table = router.wait_table(lambda t: table_callers(t).get(ip) == "dev.proj1.feature1",
                              "the reused address with the new pod's env")
    assert table_callers(table)[ip] == "dev.proj1.feature1"
    assert router.call("node", source=ip) == (200, ALIBABA_CASES["dev.proj1.feature1"])


# -- waypoint -----------------------------------------------------------------------

class Waypoint:
    """A control plane with ambient on, the alibaba services in `demo` using
    the waypoint, envlane-sync with --waypoint, and an Envoy as the waypoint."""

    def __init__(self):
        self.workdir: Path | None = None
        self.cp: ControlPlane | None = None
        self.sync: EnvlaneSync | None = None
        self.sds: Process | None = None
        self.proxy: sp.Proxy | None = None
        self.failed = False

    def start(self) -> "Waypoint":
        gw_crds = gateway_api.crds()
        self.gateway_api = (gateway_api.pinned()[0], len(gateway_api.crd_names(gw_crds)))
        # The Gateway API CRDs with Istio's, applied before istiod starts: it
        # sets up its Gateway API controllers only for CRDs that exist then.
        tmp = Path(tempfile.mkdtemp(prefix="envlane-e2e-crds-"))
        try:
            crds = tmp / "crds.yaml"
            crds.write_text(DEFAULT_CRDS.read_text().rstrip() + "\n---\n" + gw_crds.read_text())
            env = {**sc.istiod_env(), "PILOT_ENABLE_AMBIENT": "true"}
            self.cp = ControlPlane(istiod_env=env, mesh_config=sc.mesh_config(), crds=crds)
            self.cp.start()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Logs of what runs here are kept with the control plane's on failure.
        self.workdir = self.cp.dir / "e2e"
        self.workdir.mkdir()
        c = self.cluster = Cluster(self.cp)
        c.namespace(WNS, {"envlane.io/enabled": "true", "istio.io/dataplane-mode": "ambient",
                          "istio.io/use-waypoint": WAYPOINT})
        self.pods: dict[str, tuple[str, str]] = {}  # pod -> (IP, env)
        for svc in ALIBABA.services:
            c.service(WNS, svc.name, port=SERVICE_PORT, target_port=APP_PORT)
            for env in svc.envs:
                pod = pod_name(svc.name, env)
                self.pods[pod] = (c.pod(WNS, pod, {"app": svc.name, ENV_LABEL: env}, port=APP_PORT), env)
            c.sync_endpoints(WNS, svc.name)
        self.pods["client"] = (c.pod(WNS, "client", {"app": "client", ENV_LABEL: CLIENT_ENV}, port=APP_PORT),
                               CLIENT_ENV)
        c.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": WAYPOINT, "namespace": WNS}})
        c.apply({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                 "metadata": {"name": WAYPOINT, "namespace": WNS, "labels": {"istio.io/waypoint-for": "service"}},
                 "spec": {"gatewayClassName": "istio-waypoint",
                          "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
        # istiod's deployment controller would write the waypoint's Deployment
        # and Service from its `waypoint` injection template, which this
        # istiod has not (no injector runs), and no controller-manager makes
        # Pods: the Service as the template makes it, the Pod and its
        # EndpointSlice are written here.
        gw_selector = {"gateway.networking.k8s.io/gateway-name": WAYPOINT}
        c.apply({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": WAYPOINT, "namespace": WNS, "labels": {
                     **gw_selector, "gateway.networking.k8s.io/gateway-class-name": "istio-waypoint"}},
                 "spec": {"selector": gw_selector, "ports": [
                     {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
                     {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"}]}})
        self.ip = c.pod(WNS, WAYPOINT_POD, sp.waypoint_labels(WAYPOINT), port=15008)
        c.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": f"{WAYPOINT}-e2e", "namespace": WNS, "labels": {
                     "kubernetes.io/service-name": WAYPOINT,
                     "endpointslice.kubernetes.io/managed-by": "envlane-e2e-endpointslices"}},
                 "addressType": "IPv4",
                 "endpoints": [{"addresses": [self.ip], "nodeName": "node-0",
                                "conditions": {"ready": True, "serving": True, "terminating": False},
                                "targetRef": {"kind": "Pod", "namespace": WNS, "name": WAYPOINT_POD}}],
                 "ports": [{"name": "status-port", "port": 15021, "protocol": "TCP"},
                           {"name": "mesh", "port": 15008, "protocol": "TCP"}]})
        install(self.cp, shipped_settings())
        d = self.workdir / "sync-waypoint"
        d.mkdir(exist_ok=True)
        self.sync = EnvlaneSync(self.cp, d, extra_args=["--waypoint", f"{WNS}/{WAYPOINT}"]).start()
        self.sds, sds_port = sp.start_sds(self.workdir, f"spiffe://cluster.local/ns/{WNS}/sa/{WAYPOINT}")
        self.boot = sp.waypoint_bootstrap(ns=WNS, gateway=WAYPOINT, pod=WAYPOINT_POD, ip=self.ip,
                                          xds=self.cp.istiod_grpc, sds_port=sds_port)
        self.proxy = sp.Proxy("envoy-waypoint", self.boot, self.workdir)
        return self

    def plugin(self) -> dict | None:
        return self.cluster.get(WASMPLUGIN, "WasmPlugin", WNS, names()["waypointPlugin"])

    def table(self) -> dict:
        """envlane-sync's envlane-waypoint table once it lists every env and
        exactly the live callers."""
        envs = {e for s in ALIBABA.services for e in s.envs}

        def current():
            wp = self.plugin()
            t = wp and wp["spec"].get("pluginConfig")
            return (t and envs <= {e["name"] for e in t["envs"]}
                    and table_callers(t) == live_callers(self.cluster) and t)
        return self.sync.wait(current, "the envlane-waypoint table", 60)

    def istiod_dump(self) -> dict:
        return sp.istiod_dump(self.cp, self.proxy.proxy_id)

    def main_internal(self, dump: dict | None = None) -> dict:
        listeners = {e["name"]: e["active_state"]["listener"]
                     for e in sc.sections(dump or self.istiod_dump())["ListenersConfigDump"]["dynamic_listeners"]}
        return listeners["main_internal"]

    def close(self) -> None:
        for p in (self.proxy, self.sds):
            if p is not None:
                p.close()
        if self.sync is not None:
            self.sync.stop()
        if self.cp is not None:
            self.cp.close(failed=self.failed)


def service_chain(service: str) -> str:
    return f"inbound-vip|{SERVICE_PORT}|http|{fqdn(service, WNS)}"


@pytest.fixture(scope="module")
def waypoint(request):
    w = Waypoint()
    try:
        w.start()
        table = w.table()
        chains = {service_chain(s.name) for s in ALIBABA.services}

        def generated():
            """istiod has the waypoint, with its filter chain per service and
            the plugin attached; Envoy answered LDS (took or refused)."""
            try:
                hcms = sp.hcm_chains(w.main_internal())
            except (KeyError, TypeError):
                return None
            first = {name: (hcm.get("http_filters") or [{}])[0].get("name", "") for name, hcm in hcms.items()}
            envoy = sp.listener_states(w.proxy.config_dump())
            return chains <= set(hcms) and all("envlane" in first[c] for c in chains) and "main_internal" in envoy
        wait_for(generated, "istiod's waypoint config with envlane attached, and Envoy's LDS", 60)
        w.table_at_start = table
        yield w
    except BaseException:
        w.failed = True
        raise
    finally:
        w.failed = w.failed or request.session.testsfailed > 0
        w.close()


def test_the_waypoint_gateway_is_accepted_and_programmed(waypoint):
    gw = waypoint.cluster.get("gateway.networking.k8s.io/v1", "Gateway", WNS, WAYPOINT)
    conditions = {c["type"]: c["status"] for c in gw.get("status", {}).get("conditions", [])}
    assert conditions.get("Accepted") == "True" and conditions.get("Programmed") == "True", gw.get("status")
    version, n = waypoint.gateway_api
    FIGURES["waypoint: Gateway API CRDs"] = f"{version} standard, {n} CRDs (istiod's go.mod pin)"


def test_envlane_is_first_in_every_waypoint_http_chain(waypoint):
    ecds_name = None
    hcms = sp.hcm_chains(waypoint.main_internal())
    for svc in ALIBABA.services:
        hcm = hcms[service_chain(svc.name)]
        filters = hcm["http_filters"]
        names_ = [f["name"] for f in filters]
        assert f"{WNS}.{names()['waypointPlugin']}" in names_[0], names_
        assert sum("envlane" in n for n in names_) == 1, names_
        assert names_[-1] == "envoy.filters.http.router", names_
        assert "ads" in filters[0]["config_discovery"]["config_source"], filters[0]
        ecds_name = names_[0]
    FIGURES["waypoint: ECDS resource"] = ecds_name
    FIGURES["waypoint: main_internal HTTP filters"] = ", ".join(
        f["name"] for f in hcms[service_chain("java")]["http_filters"])


def test_istiod_sends_the_waypoint_table_by_ecds(waypoint):
    table = waypoint.table()
    name = sp.hcm_chains(waypoint.main_internal())[service_chain("java")]["http_filters"][0]["name"]
    ecds = sp.ecds_from_istiod(waypoint.cp, waypoint.boot, name)
    assert ecds["type"] == "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    assert ecds["failure_policy"] == "FAIL_OPEN"
    assert ecds["filename"] == str(WASM)
    sent = json.loads(ecds["configuration"])
    assert sent == table
    assert sent["proxy"] == "waypoint"
    assert table_callers(sent) == live_callers(waypoint.cluster)
    assert {ip: env for ip, env in waypoint.pods.values()} == table_callers(sent)
    # By workload too: these pods have no owner, so Istio's workload name is the pod's.
    want = {(WNS, pod): env for pod, (_, env) in waypoint.pods.items()}
    assert table_caller_workloads(sent) == want


def test_every_waypoint_target_is_a_cluster_istiod_generated_for_it(waypoint):
    """After the "Gateway routes:" change: a waypoint table's targets are
    the waypoint's own subset clusters, inbound-vip|PORT|http/SUBSET|FQDN."""
    targets = route_patches(waypoint.table())["targets"]
    assert len(targets) == sum(len(s.envs) for s in ALIBABA.services), targets
    for t in targets:
        kind, port, subset, host = t.split("|")
        assert (kind, port) == ("inbound-vip", str(SERVICE_PORT)) and subset.startswith("http/"), t
    section = sc.sections(waypoint.istiod_dump())["ClustersConfigDump"]
    generated = {c["cluster"]["name"] for c in section.get("dynamic_active_clusters", [])}
    assert set(targets) <= generated, set(targets) - generated


def test_the_waypoint_route_patch_is_on_each_services_inbound_vip_route(waypoint):
    """After the "Gateway routes:" change: envlane's waypoint patch (root
    namespace, targetRefs GatewayClass istio-waypoint, SIDECAR_INBOUND, route
    config inbound-vip|8080|http|FQDN, vhost inbound|http|8080) lands."""
    targets = route_patches(waypoint.table())["targets"]
    found = {}
    for ef in envlane_route_filters(waypoint.cluster):
        refs = ef["spec"].get("targetRefs") or []
        for p in ef["spec"]["configPatches"]:
            rc = p["match"].get("routeConfiguration", {})
            if p["match"].get("context") == "SIDECAR_INBOUND" and rc.get("name", "").startswith("inbound-vip|"):
                found[rc["name"]] = (rc.get("vhost", {}).get("name"), refs)
    for svc in ALIBABA.services:
        vhost, refs = found[service_chain(svc.name)]
        assert vhost == f"inbound|http|{SERVICE_PORT}"
        assert {"group": "gateway.networking.k8s.io", "kind": "GatewayClass", "name": "istio-waypoint"} in refs, refs

    def patched():
        hcms = sp.hcm_chains(waypoint.main_internal())
        out = {}
        for svc in ALIBABA.services:
            rc = hcms[service_chain(svc.name)]["route_config"]
            assert rc["name"] == service_chain(svc.name)
            (vhost,) = [v for v in rc["virtual_hosts"] if v["name"] == f"inbound|http|{SERVICE_PORT}"]
            if not all("inline_cluster_specifier_plugin" in r["route"] for r in vhost["routes"]):
                return None
            out[svc.name] = vhost
        return out
    vhosts = wait_for(patched, "envlane's route patch on every inbound-vip route", 30)
    for svc in ALIBABA.services:
        f = fqdn(svc.name, WNS)
        want = {t: t for t in targets if t.endswith(f"|{f}")}
        for r in vhosts[svc.name]["routes"]:
            exact, default = matcher(r)
            assert exact == want
            assert default == service_chain(svc.name)
            assert "cluster" not in r["route"]


def test_what_upstream_envoy_refuses_as_a_waypoint(waypoint):
    """Recorded, and checked so that a change shows: Envoy 1.40 refuses the
    waypoint listeners that name istio-proxy-only filters (peer_metadata,
    double-HBONE filter state), main_internal among them, so envlane's
    filter cannot run in an upstream-Envoy waypoint without istio-proxy."""
    states = sp.listener_states(waypoint.proxy.config_dump())
    refused = {n: s["details"] for n, (state, s) in states.items() if state == "error_state"}
    assert "main_internal" in refused, states
    assert "peer_metadata" in refused["main_internal"], refused["main_internal"]
    stats = waypoint.proxy.stats("listener_manager")
    assert stats.get("listener_manager.lds.update_rejected", 0) > 0
    FIGURES["waypoint: listeners Envoy 1.40 refused"] = "; ".join(
        f"{n}: {d.splitlines()[0][:160]}" for n, d in sorted(refused.items()))
    FIGURES["waypoint: listeners Envoy 1.40 took"] = ", ".join(
        sorted(n for n, (state, _) in states.items() if state != "error_state"))
