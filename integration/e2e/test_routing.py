"""The alibaba e2e topology routed by real Envoy sidecars that istiod configures
from what envlane-sync wrote to the real API server."""

import pytest

from conftest import shipped_settings
from harness import wait_for
from mesh import DeployedMesh
from topologies import ALIBABA, ALIBABA_CASES

NS = "alibaba"


@pytest.fixture(scope="module")
def alibaba(cp, cluster, workdir, start_sync):
    cluster.namespace(NS, {"envlane.io/enabled": "true", "istio-injection": "enabled"})
    sync = start_sync({**shipped_settings(), "defaultEnv": ALIBABA.default_env}, "sync-alibaba")
    mesh = DeployedMesh(cluster, NS, ALIBABA, workdir, cp.istiod_grpc)
    try:
        mesh.start()
        want = ALIBABA_CASES["dev.proj1.feature1"]
        wait_for(lambda: mesh.call("node", {"x-virtual-env": "dev.proj1.feature1"}) == (200, want),
                 "alibaba routing through istiod's config", 60)
        yield mesh, sync
    finally:
        mesh.close()


@pytest.mark.parametrize("env", list(ALIBABA_CASES), ids=lambda e: e or "no-header")
def test_alibaba_cases(alibaba, env):
    mesh, _ = alibaba
    headers = {"x-virtual-env": env} if env else {}
    assert mesh.call("node", headers) == (200, ALIBABA_CASES[env])
