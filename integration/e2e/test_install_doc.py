"""docs/install.md's commands, run as written against the real control plane
with the outputs the document says to expect: install (step 3, kustomize),
opt a namespace in from nothing (step 4: create, label, show the labels), and
the waits before the first request (step 5: the WasmPlugin, the
DestinationRule and the route EnvoyFilter exist, the table has the sample's
envs).

The commands and the expected outputs are read from docs/install.md, so the
document is what is tested. What the harness cannot run is left out: istioctl,
Helm (test_helm.py covers the chart), the sample Deployments (no
kube-controller-manager or kubelet: the suite writes the sample's Pods,
Service and EndpointSlice itself), `rollout status`, and commands inside
istio-proxy.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from controlplane import REPO
from install import EnvlaneSync

DOC = REPO / "docs" / "install.md"
DOC_NS = "shop"  # the namespace the document uses
NS = "doc-shop"  # where this suite runs its commands (another module deploys into "shop")


def here(text: str) -> str:
    """A command or an expected output of the document, for this suite's namespace."""
    return re.sub(rf"\b{DOC_NS}\b", NS, text)


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def command(text: str, prefix: str) -> str:
    """The one shell line of the document's ```sh blocks that starts with `prefix` (comment dropped)."""
    found = [line for block in sh_blocks(text) for line in block.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, f"{prefix!r}: {found}"
    line = found[0]
    return re.sub(r"\s+#[^'\"]*$", "", line)


def expected_after(text: str, marker: str) -> str:
    """The plain ``` block that follows `marker` in the document."""
    at = text.index(marker)
    m = re.compile(r"```\n(.*?)```", re.S).search(text, at)
    return m.group(1)


def quoted_after(text: str, marker: str, until: str) -> list[str]:
    """The `...` spans between `marker` and `until`."""
    at = text.index(marker)
    return re.findall(r"`([^`]+)`", text[at:text.index(until, at)])


@pytest.fixture(scope="module")
def doc():
    return DOC.read_text()


@pytest.fixture(scope="module")
def run(cp, workdir):
    bin_dir = workdir / "doc-bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "kubectl").exists():
        (bin_dir / "kubectl").symlink_to(cp.bin["kubectl"])
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBECONFIG": str(cp.kubeconfig), "HOME": str(workdir)}

    def run(cmd: str, timeout: float = 90) -> str:
        cmd = here(cmd)
        out = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{cmd}:\n{out.stdout}{out.stderr}"
        return out.stdout
    return run


def test_step3_kustomize_install(doc, run):
    out = run(command(doc, "kubectl apply -k wasm-plugin-manifests/base")).splitlines()
    want = expected_after(doc, "Expected: one line per object").strip().splitlines()
    # On this API server the base may be installed already (another module): `unchanged` then.
    assert [re.sub(r" (created|unchanged|configured)$", "", x) for x in out[:len(want)]] == \
        [re.sub(r" created$", "", x) for x in want]
    names = " ".join(out)
    assert re.search(r"configmap/envlane-sync-settings-\w+ ", names) and "deployment.apps/envlane-sync" in names


@pytest.fixture(scope="module")
def sync(cp, workdir, run, doc):
    run(command(doc, "kubectl apply -k wasm-plugin-manifests/base"))
    d = workdir / "sync-doc"
    d.mkdir(exist_ok=True)
    s = EnvlaneSync(cp, d).start()
    yield s
    s.stop()


def test_step4_namespace_from_nothing(doc, run, sync):
    outs = [run(command(doc, c)).strip() for c in ("kubectl create namespace shop", "kubectl label namespace shop envlane.io/enabled=true")]
    expected = [here(x) for x in quoted_after(doc, "Expected: `namespace/shop created`", "then")]
    assert outs == [f"namespace/{NS} created", f"namespace/{NS} labeled"] == expected[:2]
    got = run(command(doc, "kubectl get namespace shop -L")).strip().splitlines()
    want = here(expected_after(doc, "Expected: `namespace/shop created`")).strip().splitlines()
    strip_age = lambda line: [w for i, w in enumerate(line.split()) if i != 2]  # noqa: E731 - AGE varies
    assert [strip_age(x) for x in got] == [strip_age(x) for x in want]


def test_step5_waits_before_the_first_request(doc, run, sync, cluster):
    # The sample (step 5): Service go and the Ready pods of its two envs, and
    # the client, as the Deployments would make them.
    # No controller-manager makes the namespace's default ServiceAccount.
    cluster.api("POST", f"/api/v1/namespaces/{NS}/serviceaccounts",
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, ok=(409,))
    cluster.service(NS, "go", port=8080, target_port=8080)
    cluster.pod(NS, "go-dev-0", {"app": "go", "virtual-env": "dev"}, port=8080)
    cluster.pod(NS, "go-dev-proj1-0", {"app": "go", "virtual-env": "dev.proj1"}, port=8080)
    cluster.pod(NS, "client-0", {"app": "client", "virtual-env": "dev"}, port=8080)
    cluster.sync_endpoints(NS, "go")
    expected = [here(x) for x in quoted_after(doc, "Expected: `wasmplugin.extensions.istio.io/envlane condition met`", "(the table in")]
    waited = []
    for what in ("wasmplugin/envlane", "destinationrule/envlane-go"):
        waited += run(command(doc, f"kubectl -n shop wait --for=create {what}")).strip().splitlines()
    waited += run(command(doc, "kubectl -n istio-system wait --for=create")).strip().splitlines()
    assert waited == expected[:3]
    envs = run(command(doc, "kubectl -n shop get destinationrule envlane-go -o jsonpath")).strip()
    assert envs == expected[4] == "dev dev.proj1", expected
    # Uninstall, step 1: opting out removes what envlane-sync made there.
    run(command(doc, "kubectl label namespace shop envlane.io/enabled-"))
    sync.wait(lambda: cluster.get("extensions.istio.io/v1alpha1", "WasmPlugin", NS, "envlane") is None
              and not cluster.list("networking.istio.io/v1", "DestinationRule", NS),
              "the opted-out namespace's WasmPlugin and DestinationRules are gone", 30)
    for pod in ("go-dev-0", "go-dev-proj1-0", "client-0"):
        cluster.delete_pod(NS, pod)
    cluster.api("DELETE", f"/api/v1/namespaces/{NS}/services/go", ok=(404,))
