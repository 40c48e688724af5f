"""The alibaba e2e topology (node -> go -> java) routed by real Envoy sidecars
that the real istiod configures from what envlane-sync wrote to the real API
server: the cases, spoofing, and fallback when a Pod's env goes away."""

import time

import pytest

from conftest import FIGURES, shipped_settings
from harness import wait_for
from mesh import pod_name
from sidecar import clusters, sections
from topologies import ALIBABA, ALIBABA_CASES

NS = "alibaba"
PLAIN = "alibaba-plain"  # the same apps in a namespace that did not opt in
SPOOF_HEADER = "x-envlane-cluster"  # the old routing header: must be ignored


@pytest.fixture(scope="module")
def meshes(start_sync, deploy):
    sync = start_sync({**shipped_settings(), "defaultEnv": ALIBABA.default_env}, "sync-alibaba")
    mesh = deploy(NS, ALIBABA)
    plain = deploy(PLAIN, ALIBABA, opted_in=False)
    mesh.wait_table()
    return mesh, plain, sync


@pytest.mark.parametrize("env", list(ALIBABA_CASES), ids=lambda e: e or "no-header")
def test_alibaba_cases(meshes, env):
    mesh, _, _ = meshes
    headers = {"x-virtual-env": env} if env else {}
    assert mesh.call("node", headers) == (200, ALIBABA_CASES[env])


def cluster_of(mesh, service: str, env: str) -> str:
    """The env cluster istiod generated for (service, env): the one whose only
    endpoint is that env's Pod, found in the client sidecar's CDS/EDS rather
    than by re-deriving Istio's names."""
    fqdn = mesh.fqdn(service)
    dump = mesh.client.config_dump()
    eds = {c["endpoint_config"]["cluster_name"]: c["endpoint_config"]
           for c in sections(dump)["EndpointsConfigDump"].get("dynamic_endpoint_configs", [])}
    pod_ip = mesh.cluster.api("GET", f"/api/v1/namespaces/{mesh.ns}/pods/{pod_name(service, env)}")["status"]["podIP"]
    subsets = [name for name in clusters(dump) if name.startswith("outbound|8080|") and name.endswith(f"|{fqdn}")
               and name.split("|")[2]]
    for name in subsets:
        addrs = [e["endpoint"]["address"]["socket_address"]["address"]
                 for group in eds.get(name, {}).get("endpoints", []) for e in group.get("lb_endpoints", [])]
        if addrs == [pod_ip]:
            return name
    raise AssertionError(f"no cluster with only {pod_ip} among {subsets}")


@pytest.mark.parametrize("spoof_env", ["dev.proj1", "dev"])
@pytest.mark.parametrize("header_case", [SPOOF_HEADER, SPOOF_HEADER.upper()])
def test_a_client_header_never_picks_a_cluster(meshes, spoof_env, header_case):
    mesh, _, _ = meshes
    target = cluster_of(mesh, "node", spoof_env)
    other = "dev" if spoof_env != "dev" else "dev.proj1"
    status, body = mesh.call("node", {"x-virtual-env": other, header_case: target})
    assert status == 200
    assert body.endswith(f"[node @ {other}] <-{other}"), body


def test_a_client_header_cannot_send_a_request_to_another_service(meshes):
    mesh, plain, _ = meshes
    java = cluster_of(mesh, "java", "dev.proj1")
    for m in (mesh, plain):
        status, body = m.call("node", {SPOOF_HEADER: java})
        assert status == 200 and "[node @ " in body.rsplit(",", 1)[-1], body


def test_a_namespace_that_did_not_opt_in_is_not_routed_by_env(meshes):
    mesh, plain, _ = meshes
    # No filter there: the env header is only forwarded; node's Service
    # balances over all its pods, whatever the header says.
    seen = set()
    for _ in range(40):  # all 40 on one pod by chance: 2 in 2^40
        status, body = plain.call("node", {"x-virtual-env": "dev.proj1"})
        assert status == 200, body
        seen.add(body.rsplit("[node @ ", 1)[1].split("]")[0])
    assert seen == {"dev", "dev.proj1"}, seen


def test_fallback_when_a_pods_env_goes_away_and_comes_back(meshes):
    """node's dev.proj1 Pod turns not Ready: envlane-sync drops the pair, istiod
    pushes the new table over ECDS, the sidecar falls back to dev. Measured
    from the Pod status write to the first request routed the new way."""
    mesh, _, _ = meshes
    pod = pod_name("node", "dev.proj1")
    headers = {"x-virtual-env": "dev.proj1"}
    before = ALIBABA_CASES["dev.proj1"]
    after = before.replace("[node @ dev.proj1]", "[node @ dev]")
    assert mesh.call("node", headers) == (200, before)
    timings = {}
    try:
        for ready, want in ((False, after), (True, before)):
            started = time.monotonic()
            mesh.cluster.set_ready(NS, pod, ready)
            mesh.cluster.sync_endpoints(NS, "node")
            failed = []

            def routed(want=want, failed=failed):
                status, body = mesh.call("node", headers)
                if status != 200:
                    failed.append(status)
                return (status, body) == (200, want)

            wait_for(routed, f"routing after {pod} Ready={ready}", 30)
            timings[ready] = (time.monotonic() - started, len(failed))
    finally:
        mesh.cluster.set_ready(NS, pod, True)
        mesh.cluster.sync_endpoints(NS, "node")
    (gone, gone_failed), (back, back_failed) = timings[False], timings[True]
    FIGURES["pod change -> routing change (debounce 1s, real istiod push)"] = (
        f"env gone {gone * 1000:.0f} ms ({gone_failed} non-200 while waiting), "
        f"env back {back * 1000:.0f} ms ({back_failed} non-200 while waiting)")
