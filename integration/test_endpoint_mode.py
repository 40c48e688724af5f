"""Endpoint mode (issue 13) with OUR filter in real Envoy 1.40 (V8).

The alibaba topology, every pod on its own loopback IP and its service's
target port, java's dev env with two pods. Each sidecar has per service port
one ORIGINAL_DST cluster (the filter's naming, from `envlane-sync
route-patches`) and the service's own cluster with all its pods; no cluster
per (service, env). Every sidecar reports the address its Envoy connected to
(`x-upstream-address`).
"""

import os

import pytest

from endpoint_mesh import UPSTREAM_HEADER, EndpointMesh
from gateway import envoy_processes_under
from harness import ROUTE_HEADER, fqdn
from topologies import ALIBABA, ALIBABA_CASES, load_config

REPLICAS = {("java", "dev"): 2}
JAVA = "java:8080"
# Requests per spread check. The filter's pick is its VM's stream counter
# scrambled (murmur3's finalizer), modulo the env's pods: pseudo-random, not
# strict round robin. With two pods the longest run of one pod over a VM's
# first 5,000 streams is 12, so 16 requests always reach both.
ROUNDS = 16


def table_config() -> dict:
    config = load_config("alibaba")
    config["debug"] = True
    return config


@pytest.fixture(scope="module")
def mesh():
    with EndpointMesh(ALIBABA, table_config(), replicas=REPLICAS) as m:
        yield m


def endpoint_cluster(service: str, port: int = 8080) -> str:
    return f"outbound|{port}|envlane-endpoints|{fqdn(service)}"


def upstreams(mesh: EndpointMesh, env: str | None, host: str = JAVA, rounds: int = ROUNDS, **extra: str):
    """(addresses connected to, answers) over `rounds` requests."""
    addrs, bodies = set(), set()
    for _ in range(rounds):
        headers = dict(extra)
        if env is not None:
            headers["x-virtual-env"] = env
        status, h, body = mesh.call(host, headers)
        assert status == 200, body
        addrs.add(h[UPSTREAM_HEADER])
        bodies.add(body.strip())
    return addrs, bodies


def addresses(mesh: EndpointMesh, service: str, env: str | None = None) -> set[str]:
    return {p.address for p in mesh.pods_of(service, env)}


def cluster_requests(mesh: EndpointMesh, cluster: str) -> int:
    return mesh.client.stats(f"cluster.{cluster}.upstream_rq_total").get(f"cluster.{cluster}.upstream_rq_total", 0)


def test_filter_names_one_original_dst_cluster_per_service_port(mesh):
    assert sorted(mesh.patches["targets"]) == sorted(endpoint_cluster(s.name) for s in ALIBABA.services)
    assert mesh.patches["warnings"] == []
    table = mesh.table()
    java = next(s for s in table["services"] if s["host"] == fqdn("java"))
    assert java["endpoints"][0] == sorted(p.ip for p in mesh.pods_of("java", "dev"))
    assert len(java["endpoints"][0]) == 2


@pytest.mark.parametrize("env", list(ALIBABA_CASES), ids=lambda e: e or "no-header")
def test_alibaba_e2e(mesh, env):
    before = cluster_requests(mesh, endpoint_cluster("node"))
    failed = mesh.client.stats("wasmcustom.envlane.route.failed")
    status, headers, body = mesh.call("node:8080", {"x-virtual-env": env} if env else {})
    assert status == 200, body
    assert body.strip() == ALIBABA_CASES[env]
    # Through the node port's ORIGINAL_DST cluster, to a node pod of the env the answer names.
    assert cluster_requests(mesh, endpoint_cluster("node")) == before + 1
    node_env = body.strip().rsplit("[node @ ", 1)[1].split("]")[0]
    assert headers[UPSTREAM_HEADER] in addresses(mesh, "node", node_env)
    assert mesh.client.stats("wasmcustom.envlane.route.failed") == failed


def test_every_hop_connects_to_its_env_pod(mesh):
    """go's and node's sidecars picked too: each sidecar's ORIGINAL_DST
    cluster served exactly its hop."""
    node = mesh.sidecars["node-dev.proj1"]
    name = endpoint_cluster("go")
    before = node.stats(f"cluster.{name}.upstream_rq_total").get(f"cluster.{name}.upstream_rq_total", 0)
    status, _, body = mesh.call("node:8080", {"x-virtual-env": "dev.proj1.feature1"})
    assert status == 200 and body.strip() == ALIBABA_CASES["dev.proj1.feature1"]
    assert node.stats(f"cluster.{name}.upstream_rq_total")[f"cluster.{name}.upstream_rq_total"] == before + 1
    go = mesh.sidecars["go-dev"]
    assert go.stats("wasmcustom.envlane.decision.exact").get("wasmcustom.envlane.decision.exact", 0) >= 1


def test_request_spreads_over_the_env_pods(mesh):
    addrs, bodies = upstreams(mesh, "dev")
    assert addrs == addresses(mesh, "java", "dev") and len(addrs) == 2
    assert bodies == {"[springboot @ dev] <-dev"}


def test_single_pod_env_always_that_pod(mesh):
    addrs, bodies = upstreams(mesh, "dev.proj1.feature1", rounds=6)
    assert addrs == addresses(mesh, "java", "dev.proj1.feature1")
    assert bodies == {"[springboot @ dev.proj1.feature1] <-dev.proj1.feature1"}


def test_no_header_goes_to_the_default_env_pods(mesh):
    addrs, bodies = upstreams(mesh, None)
    assert addrs == addresses(mesh, "java", "dev")
    assert bodies == {"[springboot @ dev] <-empty"}


@pytest.mark.parametrize("header", ["x-envoy-original-dst-host", ROUTE_HEADER])
def test_client_header_changes_nothing(mesh, header):
    (feature,) = addresses(mesh, "java", "dev.proj1.feature1")
    values = {"x-envoy-original-dst-host": feature,
              ROUTE_HEADER: endpoint_cluster("java")}
    other = {ROUTE_HEADER: f"outbound|8080|dev-proj1-feature1|{fqdn('java')}"}
    for value in [values[header]] + ([other[header]] if header in other else []):
        for env in ["dev", None]:
            addrs, bodies = upstreams(mesh, env, **{header: value})
            assert addrs == addresses(mesh, "java", "dev"), (header, value, env)
            assert len(bodies) == 1 and "[springboot @ dev]" in bodies.pop()


def test_debug_explanation_names_the_chosen_address(mesh):
    seen = set()
    for _ in range(8):
        status, headers, _ = mesh.call(JAVA, {"x-virtual-env": "dev.proj1.user9", "x-envlane-debug": "1"})
        assert status == 200
        why = headers["x-envlane-decision"]
        assert why.startswith(f"env=dev.proj1.user9; source=header; service={fqdn('java')}; "
                              "tried=dev.proj1.user9,dev.proj1; outcome=fallback; target=" + endpoint_cluster("java")), why
        chosen = why.rsplit("; endpoint=", 1)[1]
        assert chosen == headers[UPSTREAM_HEADER]
        seen.add(chosen)
    assert seen == addresses(mesh, "java", "dev.proj1")
    for _ in range(ROUNDS):
        _, headers, _ = mesh.call(JAVA, {"x-virtual-env": "dev", "x-envlane-debug": "1"})
        assert headers["x-envlane-decision"].endswith(f"; endpoint={headers[UPSTREAM_HEADER]}")
        seen.add(headers[UPSTREAM_HEADER])
    assert addresses(mesh, "java", "dev") <= seen


def test_without_the_filter_the_route_own_cluster_serves():
    """A namespace not opted in: the same routes (the patches are in the root
    namespace), no filter: the service's own cluster, all its pods, and no
    header reaches a pod through the ORIGINAL_DST cluster."""
    with EndpointMesh(ALIBABA, table_config(), replicas=REPLICAS, filter="absent") as mesh:
        everyone = addresses(mesh, "java")
        assert len(everyone) == 4
        (feature,) = addresses(mesh, "java", "dev.proj1.feature1")
        for extra in [{}, {"x-envoy-original-dst-host": feature}, {ROUTE_HEADER: endpoint_cluster("java")}]:
            addrs, bodies = upstreams(mesh, "dev.proj1.feature1", **extra)
            assert addrs == everyone, extra
        assert cluster_requests(mesh, endpoint_cluster("java")) == 0
        assert cluster_requests(mesh, f"outbound|8080||{fqdn('java')}") == 3 * ROUNDS


def test_push_removing_a_pod_stops_it_being_chosen():
    with EndpointMesh(ALIBABA, table_config(), replicas=REPLICAS) as mesh:
        gone, kept = mesh.pods_of("java", "dev")
        addrs, _ = upstreams(mesh, "dev")
        assert addrs == {gone.address, kept.address}
        mesh.push_and_wait(mesh.table(without={gone.name}))
        assert mesh.apps[gone.name].alive()  # still there: would answer if chosen
        addrs, bodies = upstreams(mesh, "dev", rounds=2 * ROUNDS)
        assert addrs == {kept.address}
        assert bodies == {"[springboot @ dev] <-dev"}
        # and back
        mesh.push_and_wait(mesh.table())
        addrs, _ = upstreams(mesh, "dev")
        assert addrs == {gone.address, kept.address}


def test_processes_are_always_stopped():
    mesh = EndpointMesh(ALIBABA, table_config(), replicas=REPLICAS)
    workdir = mesh.workdir
    with mesh:
        assert envoy_processes_under(workdir)
        procs = mesh.processes()
        assert all(p.alive() for p in procs)
    assert envoy_processes_under(workdir) == []
    assert not any(p.alive() for p in procs)
    assert not os.path.exists(workdir)
