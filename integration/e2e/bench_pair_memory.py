"""Benchmark (issue 13): the memory one (service, env) pair adds to a
sidecar, cluster mode vs endpoint mode, on configuration the REAL istiod
(1.31) generates for a real Envoy 1.40 sidecar connected to it over ADS.

A namespace with SERVICES Services and one Ready pod per (Service, env)
(EndpointSlices as the controller would write them). One measuring sidecar
(a `client` pod whose Sidecar resource sees every host) is started fresh for
each phase; once its cluster count is stable, Envoy's /memory `allocated`
and its cluster count are read. Phases, per env count:

* baseline: the Services and pods, nothing of envlane (what the mesh costs
  anyway: one cluster per Service port, every pod an endpoint of it);
* cluster: what envlane-sync renders in cluster mode: a DestinationRule per
  Service with one subset per env (label virtual-env) and the route
  EnvoyFilter whose matcher maps each subset cluster to itself;
* endpoint: per Service port one EnvoyFilter in the root namespace: CLUSTER
  ADD of an ORIGINAL_DST cluster (CLUSTER_PROVIDED) with an mTLS transport
  socket (UpstreamTlsContext, SAN match on the Service's SPIFFE identity,
  certificate and CA by SDS; here SDS from a file, as no istio-agent runs)
  and the route patch mapping that one cluster.

KiB per pair = (phase − baseline) / pairs. The Wasm table's share (the
pods' addresses in the filter's VM) is not in Envoy's `allocated` (V8's
linear memory is mapped, not malloc'd) and is reported apart.

    integration/e2e/netns.sh python3 integration/e2e/bench_pair_memory.py [SERVICES ENVS...]

(default 100 10 100: 1,000 and 10,000 pairs.) Not a test: prints figures and
writes them as JSON to dist/bench/pair_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "controlplane")]

import sidecar as sc  # noqa: E402
from bench_sync_memory import Api  # noqa: E402
from controlplane import REPO, ControlPlane  # noqa: E402
from harness import free_port  # noqa: E402

NS = "shop"
ROOT_NS = "istio-system"
PORT, TARGET_PORT = 8080, 9080
ENV_LABEL = "virtual-env"
DOMAIN = "cluster.local"
MATCHER = "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier"
ACTION = "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction"
FS_INPUT = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput"


def envs(n: int) -> list[str]:
    return ["dev"] + [f"dev.p{i}" for i in range(1, n)]


def subset(env: str) -> str:
    return env.replace(".", "-")


def fqdn(svc: str) -> str:
    return f"{svc}.{NS}.svc.{DOMAIN}"


def pod_ip(s: int, e: int) -> str:
    n = 10 + s * 200 + e  # 10.244.0.10 ... ; e < 200
    return f"10.244.{n // 250}.{n % 250 + 1}"


def populate(api: Api, services: int, env_list: list[str], first_env: int) -> None:
    """Services (once) and the pods of envs[first_env:], then each Service's
    EndpointSlice with all its pods."""
    def one(s: int) -> None:
        app = f"svc{s}"
        if first_env == 0:
            api.call("POST", f"/api/v1/namespaces/{NS}/services", {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
                "spec": {"selector": {"app": app},
                         "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT}]}})
        for e in range(first_env, len(env_list)):
            name, ip = f"{app}-{e}", pod_ip(s, e)
            api.call("POST", f"/api/v1/namespaces/{NS}/pods", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {"app": app, ENV_LABEL: env_list[e]}},
                "spec": {"nodeName": "node-0", "containers": [{"name": "app", "image": "app"}]}})
            api.call("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [
                    {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}},
                "application/merge-patch+json")
        api.call("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{app}-e2e"
                 "?fieldManager=bench&force=true", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{app}-e2e", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": app,
                                    "endpointslice.kubernetes.io/managed-by": "bench"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [pod_ip(s, e)], "conditions": {"ready": True},
                           "nodeName": "node-0",
                           "targetRef": {"kind": "Pod", "namespace": NS, "name": f"{app}-{e}"}}
                          for e in range(len(env_list))],
            "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        }, "application/apply-patch+yaml")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(services)))


def action(cluster: str) -> dict:
    return {"action": {"name": "cluster", "typed_config": {"@type": ACTION, "cluster": cluster}}}


def route_patch(svc: str, targets: list[str]) -> dict:
    """envlane's route patch (sync/src/routes.rs), whole vhost."""
    return {
        "applyTo": "HTTP_ROUTE",
        "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {
            "vhost": {"name": f"{fqdn(svc)}:{PORT}", "route": {"action": "ROUTE"}}}},
        "patch": {"operation": "MERGE", "value": {"route": {"inline_cluster_specifier_plugin": {
            "extension": {"name": "envlane", "typed_config": {"@type": MATCHER, "cluster_matcher": {
                "matcher_tree": {"exact_match_map": {"map": {t: action(t) for t in targets}},
                                 "input": {"name": "envlane_route", "typed_config": {
                                     "@type": FS_INPUT, "key": "wasm.envlane_route"}}},
                "on_no_match": action(f"outbound|{PORT}||{fqdn(svc)}")}}}}}}},
    }


def od_cluster_name(svc: str) -> str:
    return f"outbound|{PORT}|envlane-endpoints|{fqdn(svc)}"


def od_cluster(svc: str, sds_dir: Path) -> dict:
    """The endpoint mode's one cluster per Service port."""
    def sds(name: str) -> dict:
        return {"name": name, "sds_config": {"path_config_source": {"path": str(sds_dir / f"{name}.json")},
                                             "resource_api_version": "V3"}}
    return {
        "name": od_cluster_name(svc),
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "cleanup_interval": "60s",
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": f"outbound_.{PORT}_._.{fqdn(svc)}",
            "common_tls_context": {
                "alpn_protocols": ["istio-peer-exchange", "istio"],
                "tls_certificate_sds_secret_configs": [sds("default")],
                "combined_validation_context": {
                    "default_validation_context": {"match_subject_alt_names": [
                        {"exact": f"spiffe://{DOMAIN}/ns/{NS}/sa/default"}]},
                    "validation_context_sds_secret_config": sds("ROOTCA")}}}},
    }


def write_sds(d: Path) -> None:
    """`default` (a workload certificate) and `ROOTCA`, as SDS resources in
    files (istio-agent serves the same two names over sds-grpc)."""
    def run(*a):
        subprocess.run([str(x) for x in a], check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", "2", "-subj", "/O=cluster.local")
    (d / "w.ext").write_text(f"subjectAltName=URI:spiffe://{DOMAIN}/ns/{NS}/sa/default\n")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", d / "w.key", "-out", d / "w.csr", "-subj", "/")
    run("openssl", "x509", "-req", "-in", d / "w.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
        "-CAcreateserial", "-out", d / "w.crt", "-days", "2", "-extfile", d / "w.ext")
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    (d / "default.json").write_text(json.dumps({"resources": [{"@type": secret, "name": "default",
        "tls_certificate": {"certificate_chain": {"filename": str(d / "w.crt")},
                            "private_key": {"filename": str(d / "w.key")}}}]}))
    (d / "ROOTCA.json").write_text(json.dumps({"resources": [{"@type": secret, "name": "ROOTCA",
        "validation_context": {"trusted_ca": {"filename": str(d / "ca.crt")}}}]}))


class Phase:
    """Writes a mode's objects for `services` x `env_list`, and removes them."""

    def __init__(self, api: Api, services: int, env_list: list[str], sds_dir: Path):
        self.api, self.services, self.envs, self.sds_dir = api, services, env_list, sds_dir

    def apply(self, mode: str) -> None:
        def one(s: int) -> None:
            svc = f"svc{s}"
            if mode == "cluster":
                self._apply(f"/apis/networking.istio.io/v1/namespaces/{NS}/destinationrules/envlane-{svc}", {
                    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                    "metadata": {"name": f"envlane-{svc}", "namespace": NS},
                    "spec": {"host": fqdn(svc), "subsets": [
                        {"name": subset(e), "labels": {ENV_LABEL: e}} for e in self.envs]}})
                targets = [f"outbound|{PORT}|{subset(e)}|{fqdn(svc)}" for e in self.envs]
                patches = [route_patch(svc, targets)]
            else:
                patches = [
                    {"applyTo": "CLUSTER", "match": {"context": "SIDECAR_OUTBOUND"},
                     "patch": {"operation": "ADD", "value": od_cluster(svc, self.sds_dir)}},
                    route_patch(svc, [od_cluster_name(svc)]),
                ]
            self._apply(f"/apis/networking.istio.io/v1alpha3/namespaces/{ROOT_NS}/envoyfilters/envlane-routes-{NS}-{svc}", {
                "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                "metadata": {"name": f"envlane-routes-{NS}-{svc}", "namespace": ROOT_NS},
                "spec": {"configPatches": patches}})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(self.services)))

    def remove(self) -> None:
        def one(s: int) -> None:
            svc = f"svc{s}"
            for path in (f"/apis/networking.istio.io/v1/namespaces/{NS}/destinationrules/envlane-{svc}",
                         f"/apis/networking.istio.io/v1alpha3/namespaces/{ROOT_NS}/envoyfilters/envlane-routes-{NS}-{svc}"):
                try:
                    self.api.call("DELETE", path)
                except RuntimeError as e:
                    if " 404 " not in str(e):
                        raise

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(self.services)))

    def _apply(self, path: str, obj: dict) -> None:
        self.api.call("PATCH", f"{path}?fieldManager=bench&force=true", obj, "application/apply-patch+yaml")


def check(dump: dict, mode: str, services: int, env_list: list[str]) -> dict:
    """What the sidecar holds is what the mode meant: the route patch on
    every Service's vhost (its matcher's keys) and, in endpoint mode, the
    ORIGINAL_DST cluster with its TLS transport socket."""
    clusters = sc.clusters(dump)
    hosts = {v["name"]: v for v in sc.route_configs(dump)[str(PORT)]["virtual_hosts"]}
    for s in range(services):
        svc = f"svc{s}"
        route = hosts[f"{fqdn(svc)}:{PORT}"]["routes"][0]["route"]
        keys = set(route["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
                   ["cluster_matcher"]["matcher_tree"]["exact_match_map"]["map"])
        if mode == "cluster":
            assert keys == {f"outbound|{PORT}|{subset(e)}|{fqdn(svc)}" for e in env_list}, (svc, keys)
            assert keys <= set(clusters)
        else:
            assert keys == {od_cluster_name(svc)}, (svc, keys)
            c = clusters[od_cluster_name(svc)]
            assert c["type"] == "ORIGINAL_DST" and c["lb_policy"] == "CLUSTER_PROVIDED", c
            assert c["transport_socket"]["name"] == "envoy.transport_sockets.tls", c
    return {"verified": f"{mode}: route patch on {services} vhosts"}


def measure(cp: ControlPlane, client_ip: str, workdir: Path, name: str, want_clusters: int | None,
            timeout: float = 900, verify=None) -> dict:
    """A fresh sidecar for the client pod; its memory once istiod's config
    has arrived and its cluster count has not changed for 10 s."""
    car = sc.Sidecar(ns=NS, pod="client", ip=client_ip, labels={"app": "client", sc.POD_LABEL: "client"},
                     xds=cp.istiod_grpc, port=PORT, workdir=workdir)
    car.envoy.name = name
    t0 = time.monotonic()
    try:
        car.envoy.wait_ready(timeout)
        last, since = -1, time.monotonic()
        while True:
            st = car.stats("cluster_manager")
            n = st.get("cluster_manager.active_clusters", 0)
            warming = st.get("cluster_manager.warming_clusters", 0)
            if n != last or warming:
                last, since = n, time.monotonic()
            done = (want_clusters is None or n >= want_clusters) and not warming
            if done and time.monotonic() - since >= 10:
                break
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{name}: {n} clusters ({warming} warming), want {want_clusters}")
            time.sleep(1)
        mem = json.loads(car.admin("/memory"))
        rss = int(Path(f"/proc/{car.envoy.process.proc.pid}/status").read_text()
                  .split("VmRSS:")[1].split()[0]) * 1024
        out = {"clusters": last, "allocated": int(mem["allocated"]), "heap_size": int(mem["heap_size"]),
               "rss": rss, "seconds": round(time.monotonic() - t0, 1),
               "rejected": sc.rejected_updates(car.stats())}
        if verify:
            out.update(verify(car.config_dump()))
        print(f"  {name}: {out}", flush=True)
        return out
    finally:
        car.close()


def main(argv: list[str]) -> int:
    services = int(argv[1]) if len(argv) > 1 else 100
    env_counts = [int(a) for a in argv[2:]] or [10, 100]
    results: dict = {"services": services, "runs": []}
    with ControlPlane(istiod_env=sc.istiod_env(), mesh_config=sc.mesh_config()) as cp:
        api = Api(cp)
        work = cp.dir / "bench-pairs"
        work.mkdir()
        sds_dir = work / "sds"
        sds_dir.mkdir()
        write_sds(sds_dir)
        api.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-0"}})
        api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": NS, "labels": {"istio-injection": "enabled"}}})
        api.call("POST", f"/api/v1/namespaces/{NS}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})
        client_ip = "10.244.250.10"
        api.call("POST", f"/api/v1/namespaces/{NS}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "client", "labels": {"app": "client", sc.POD_LABEL: "client"}},
            "spec": {"nodeName": "node-0", "containers": [{"name": "app", "image": "app"}]}})
        api.call("PATCH", f"/api/v1/namespaces/{NS}/pods/client/status", {"status": {
            "phase": "Running", "podIP": client_ip, "podIPs": [{"ip": client_ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}}, "application/merge-patch+json")
        car = sc.sidecar_resource(NS, "client", client_ip, PORT)
        api.call("PATCH", f"/apis/networking.istio.io/v1/namespaces/{NS}/sidecars/{car['metadata']['name']}"
                 "?fieldManager=bench&force=true", car, "application/apply-patch+yaml")
        have = 0
        for n in env_counts:
            env_list = envs(n)
            t0 = time.monotonic()
            populate(api, services, env_list, have)
            have = n
            pairs = services * n
            print(f"{services} services x {n} envs = {pairs} pairs ({pairs} Ready pods; "
                  f"{time.monotonic() - t0:.0f} s to create)", flush=True)
            time.sleep(5)
            run = {"envs": n, "pairs": pairs}
            base = run["baseline"] = measure(cp, client_ip, work, f"baseline-{n}", services)
            phase = Phase(api, services, env_list, sds_dir)
            for mode, extra in (("cluster", pairs), ("endpoint", services)):
                phase.apply(mode)
                time.sleep(5)
                m = run[mode] = measure(cp, client_ip, work, f"{mode}-{n}", base["clusters"] + extra,
                                       verify=lambda d, mode=mode: check(d, mode, services, env_list))
                m["kib_per_pair"] = round((m["allocated"] - base["allocated"]) / pairs / 1024, 3)
                m["clusters_added"] = m["clusters"] - base["clusters"]
                print(f"  {mode} mode, {pairs} pairs: +{m['clusters_added']} clusters, "
                      f"{m['kib_per_pair']} KiB per pair", flush=True)
                phase.remove()
                time.sleep(5)
            results["runs"].append(run)
    if len(results["runs"]) >= 2:
        a, b = results["runs"][0], results["runs"][-1]
        for mode in ("cluster", "endpoint"):
            da = a[mode]["allocated"] - a["baseline"]["allocated"]
            db = b[mode]["allocated"] - b["baseline"]["allocated"]
            results[f"{mode}_marginal_kib_per_pair"] = round((db - da) / (b["pairs"] - a["pairs"]) / 1024, 3)
    out = REPO / "dist" / "bench" / "pair_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}), flush=True)
    print(f"written: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
