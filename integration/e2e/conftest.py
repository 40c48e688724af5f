"""Session fixtures of the real-control-plane suite (./build.sh e2e).

One control plane (etcd, kube-apiserver with RBAC, istiod) per run; its temp
dir holds every log (control plane, envlane-sync, Envoys, apps) and is kept
and printed when a test fails.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "controlplane")]

import pytest  # noqa: E402

import sidecar  # noqa: E402
from cluster import Cluster, pod_ips_are_local  # noqa: E402
from controlplane import ControlPlane  # noqa: E402
from install import BASE, EnvlaneSync, install  # noqa: E402
from mesh import DeployedMesh  # noqa: E402

# Figures the tests measure (name -> text), printed at the end of the run.
FIGURES: dict[str, str] = {}


def pytest_configure(config):
    if not pod_ips_are_local():
        pytest.exit("the e2e suite needs its network namespace (Pod IPs 10.244.0.0/16 local): "
                    "run it with ./build.sh e2e", returncode=2)


@pytest.fixture(scope="session")
def cp(request):
    plane = ControlPlane(istiod_env=sidecar.istiod_env(), mesh_config=sidecar.mesh_config())
    try:
        plane.start()
    except BaseException:
        plane.close(failed=True)
        raise
    yield plane
    plane.close(failed=request.session.testsfailed > 0)


@pytest.fixture(scope="session")
def cluster(cp):
    return Cluster(cp)


@pytest.fixture(scope="session")
def workdir(cp):
    d = cp.dir / "e2e"
    d.mkdir()
    return d


def shipped_settings() -> dict:
    return json.loads((BASE / "settings.json").read_text())


@pytest.fixture(scope="module")
def start_sync(cp, workdir):
    """Installs envlane (kubectl apply -k) with the given settings and runs
    envlane-sync as its Deployment would; stopped at the end of the module."""
    running: list[EnvlaneSync] = []

    def start(settings: dict | None = None, name: str = "envlane-sync") -> EnvlaneSync:
        install(cp, settings)
        d = workdir / name
        d.mkdir(exist_ok=True)
        sync = EnvlaneSync(cp, d).start()
        running.append(sync)
        return sync

    yield start
    for s in running:
        s.stop()


@pytest.fixture(scope="module")
def deploy(cp, cluster, workdir):
    """deploy(ns, topology, opted_in) -> a started DeployedMesh; all stopped
    at the end of the module."""
    meshes: list[DeployedMesh] = []

    def start(ns: str, topology, opted_in: bool = True) -> DeployedMesh:
        labels = {"istio-injection": "enabled"}
        if opted_in:
            labels["envlane.io/enabled"] = "true"
        cluster.namespace(ns, labels)
        mesh = DeployedMesh(cluster, ns, topology, workdir, cp.istiod_grpc)
        meshes.append(mesh)
        return mesh.start()

    yield start
    for m in meshes:
        m.close()


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("e2e figures")
        for name, text in FIGURES.items():
            terminalreporter.write_line(f"{name}: {text}")
