"""envlane installed as docs/install.md says, and envlane-sync run as its
Deployment would run it: same arguments, same settings (the ConfigMap), same
identity (a token of its ServiceAccount, so the API server enforces the
shipped RBAC). Only what cannot apply outside a Pod is changed: the settings
file path, the listen address, and the module URL (`file://` of the module
this checkout built, since no registry is reachable; istiod hands `file://`
URLs to Envoy as a local file).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from controlplane import REPO, ControlPlane, free_port
from harness import Process, wait_for

BASE = REPO / "wasm-plugin-manifests" / "base"
SYNC_BIN = REPO / "target" / "release" / "envlane-sync"
WASM = REPO / "dist" / "envlane.wasm"
SYSTEM_NS = "envlane-system"
DEPLOYMENT = "envlane-sync"


def install(cp: ControlPlane, settings: dict | None = None) -> str:
    """`kubectl apply -k` of the shipped base (docs/install.md, step 3). With
    `settings`, through an overlay that replaces base/settings.json (the
    file install.md tells you to edit). Returns kubectl's output."""
    target = BASE
    if settings is not None:
        overlay = Path(tempfile.mkdtemp(prefix="envlane-overlay-"))
        (overlay / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        (overlay / "kustomization.yaml").write_text(json.dumps({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(BASE, overlay)],
            "configMapGenerator": [{
                "name": "envlane-sync-settings", "namespace": SYSTEM_NS,
                "behavior": "replace", "files": ["settings.json"],
                "options": {"labels": {"app.kubernetes.io/name": "envlane-sync"}},
            }],
        }))
        target = overlay
    return cp.kubectl("apply", "-k", str(target)).stdout


class EnvlaneSync:
    """envlane-sync as a process with the install's ServiceAccount token."""

    def __init__(self, cp: ControlPlane, workdir: Path, extra_args: list[str] | None = None):
        self.cp = cp
        self.dir = workdir
        self.extra_args = extra_args or []
        self.process: Process | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "envlane-sync.log"
        self.port = 0

    # -- what the Deployment says ------------------------------------------

    def deployment(self) -> dict:
        return self.cp.api("GET", f"/apis/apps/v1/namespaces/{SYSTEM_NS}/deployments/{DEPLOYMENT}")

    def service_account(self) -> str:
        return self.deployment()["spec"]["template"]["spec"]["serviceAccountName"]

    def token(self, seconds: int = 3600) -> str:
        sa = self.service_account()
        answer = self.cp.api(
            "POST", f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts/{sa}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": seconds}},
        )
        return answer["status"]["token"]

    def kubeconfig(self) -> Path:
        """A kubeconfig with the ServiceAccount's token: what in-cluster config
        gives the Pod."""
        path = self.dir / "envlane-sync.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {
                "server": self.cp.server, "certificate-authority": str(self.cp.pki / "ca.crt")}}],
            "users": [{"name": "envlane-sync", "user": {"token": self.token()}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "envlane-sync"}}],
            "current-context": "e2e",
        }))
        return path

    def argv(self) -> list[str]:
        pod = self.deployment()["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "settings"]
        cm = self.cp.api(
            "GET", f"/api/v1/namespaces/{SYSTEM_NS}/configmaps/{volume['configMap']['name']}")
        settings = self.dir / "settings.json"
        settings.write_text(cm["data"]["settings.json"])
        module_sha = hashlib.sha256(WASM.read_bytes()).hexdigest()
        self.port = free_port()
        replace = {
            "--settings": str(settings),
            "--listen": f"127.0.0.1:{self.port}",
            "--wasm-url": f"file://{WASM}",
            "--wasm-sha256": module_sha,
            "--log-format": "text",
        }
        args = []
        for arg in container["args"]:
            flag, _, _ = arg.partition("=")
            args.append(f"{flag}={replace[flag]}" if flag in replace else arg)
        return [str(SYNC_BIN), *args, *self.extra_args]

    # -- lifecycle ---------------------------------------------------------

    def start(self, ready_within: float = 60) -> "EnvlaneSync":
        argv = self.argv()
        # As the Deployment's downward API sets them: the pod name is the
        # Lease holder identity and the Events' reportingInstance.
        env = {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(self.kubeconfig()),
               "HOME": str(self.dir), "POD_NAME": self.dir.name, "POD_NAMESPACE": SYSTEM_NS}
        (self.dir / "envlane-sync.cmd").write_text(" ".join(argv) + "\n")
        self.process = Process("envlane-sync", argv, self.dir, env)
        self.proc = self.process.proc
        self.wait(lambda: self.http("/readyz")[0] == 200, "envlane-sync /readyz", ready_within)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.close()
        self.process = self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float | None:
        for line in self.http("/metrics")[1].splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        return None

    def wait(self, check, what: str, timeout: float = 30.0):
        """Polls `check` until it returns something true (returned), with a
        deadline; fails at once if envlane-sync exits, with its log either way."""
        try:
            return wait_for(check, what, timeout, self.process)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log()[-4000:]}") from None
