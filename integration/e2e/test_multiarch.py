"""The linux/arm64 envlane-sync (scripts/images.sh with
ENVLANE_SYNC_PLATFORMS=linux/amd64,linux/arm64: aarch64-unknown-linux-musl
built with cargo-zigbuild) against the real API server, run under qemu user
emulation: TLS to the API server, the Deployment's arguments and
ServiceAccount token, and a table written for an opted-in namespace.

Runs only where that binary and qemu-aarch64-static are present (a recorded
check: CI builds neither); skipped otherwise, saying so.
"""

from __future__ import annotations

import shutil

import pytest

import install
from controlplane import REPO
from install import EnvlaneSync

ARM_BIN = REPO / "target" / "aarch64-unknown-linux-musl" / "release" / "envlane-sync"
NS = "arm64-check"


@pytest.fixture(scope="module")
def arm_sync(cp, workdir, monkeypatch_module):
    qemu = shutil.which("qemu-aarch64-static")
    if not qemu or not ARM_BIN.is_file():
        pytest.skip("no linux/arm64 envlane-sync or no qemu-aarch64-static (recorded check)")
    newest = max(f.stat().st_mtime for d in ("sync/src", "src") for f in (REPO / d).rglob("*.rs"))
    if ARM_BIN.stat().st_mtime < newest:
        pytest.skip("the linux/arm64 envlane-sync is older than its sources: "
                    "ENVLANE_SYNC_PLATFORMS=linux/amd64,linux/arm64 scripts/images.sh sync")
    wrapper = workdir / "envlane-sync-arm64"
    wrapper.write_text(f"#!/bin/sh\nexec {qemu} {ARM_BIN} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch_module.setattr(install, "SYNC_BIN", wrapper)
    install.install(cp)
    d = workdir / "sync-arm64"
    d.mkdir(exist_ok=True)
    s = EnvlaneSync(cp, d).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_arm64_envlane_sync_syncs_a_namespace(cluster, arm_sync):
    assert "qemu-aarch64-static" in (arm_sync.dir / "envlane-sync.cmd").read_text() or \
        "envlane-sync-arm64" in (arm_sync.dir / "envlane-sync.cmd").read_text()
    cluster.namespace(NS, {"envlane.io/enabled": "true"})
    cluster.service(NS, "api", port=8080, target_port=8080)
    cluster.pod(NS, "api-dev", {"app": "api", "virtual-env": "dev"}, port=8080)
    cluster.sync_endpoints(NS, "api")
    wp = arm_sync.wait(lambda: cluster.get("extensions.istio.io/v1alpha1", "WasmPlugin", NS, "envlane"),
                       "the arm64 envlane-sync wrote the WasmPlugin", 60)
    assert [e["name"] for e in wp["spec"]["pluginConfig"]["envs"] if e["name"] == "dev"] == ["dev"]
    assert (arm_sync.metric("envlane_sync_table_pairs") or 0) >= 1
    # Opt out again: the arm64 build removes what it wrote.
    cluster.namespace(NS, {})
    arm_sync.wait(lambda: cluster.get("extensions.istio.io/v1alpha1", "WasmPlugin", NS, "envlane") is None,
                  "the arm64 envlane-sync removed the WasmPlugin", 60)
    for pod in ("api-dev",):
        cluster.delete_pod(NS, pod)
