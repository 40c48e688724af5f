"""The Helm chart on the real control plane, and the monitoring on a real
Prometheus scraping a real envlane-sync and istiod-configured sidecars.

* `helm template charts/envlane | kubectl apply` over what
  `kubectl apply -k wasm-plugin-manifests/base` made: the API server sees no
  difference (`kubectl diff` is empty, every object `unchanged`, no
  resourceVersion moves), and a changed value is a difference (not vacuous);
  the host-mode render passes the API server's strict validation;
* `helm install` (with `--set settings.baggageKey=lane`, over the deleted base's
  objects) deploys; the setting puts the Deployment on another settings
  ConfigMap; envlane-sync run from the Helm-installed Deployment (its
  arguments, settings and ServiceAccount token) routes alibaba's cases
  through real sidecars;
* Prometheus scrapes that envlane-sync and every sidecar: every dashboard
  panel that shows data in a healthy mesh has data, the table-size gauges
  equal envlane-sync's own /metrics, and a Pod with an invalid env label
  makes the EnvlanePairsRefused expression return (it returned nothing
  before). With ENVLANE_DASHBOARD_PNG=path the panels are drawn from the
  query results (the recorded picture in docs/monitoring/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from controlplane import REPO
from harness import wait_for
from install import BASE, SYSTEM_NS, EnvlaneSync
from topologies import ALIBABA, ALIBABA_CASES

sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "integration"))
import gen_chart  # noqa: E402
import prom  # noqa: E402

CHART = REPO / "charts" / "envlane"
NS = "helm-alibaba"


def helm_bin() -> str:
    out = subprocess.run([str(REPO / "scripts" / "tools.sh"), "helm"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"helm is not built (run scripts/tools.sh helm outside the e2e network namespace):\n{out.stderr}"
    return out.stdout.strip()


def helm_template(workdir: Path, name: str, *values: str) -> Path:
    argv = [helm_bin(), "template", "envlane", str(CHART), "-n", SYSTEM_NS, "--set", "namespace.create=true"]
    for v in values:
        argv += ["--set", v]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = workdir / f"{name}.yaml"
    path.write_text(out.stdout)
    return path


def versions(cp, manifest: Path) -> dict[tuple[str, str], str]:
    items = json.loads(cp.kubectl("get", "-f", str(manifest), "-o", "json").stdout)["items"]
    return {(i["kind"], i["metadata"]["name"]): i["metadata"]["resourceVersion"] for i in items}


@pytest.fixture(scope="module")
def applied(cp, workdir):
    d = workdir / "helm"
    d.mkdir(exist_ok=True)
    cp.kubectl("apply", "-k", str(BASE))
    # What applying the base once more says: kubectl reports some objects
    # (the PDB, a ValidatingAdmissionPolicy) as `configured` even then (a
    # no-op patch; their resourceVersion stays).
    again = cp.kubectl("apply", "-k", str(BASE))
    default = helm_template(d, "default")
    before = versions(cp, default)
    diff = cp.kubectl("diff", "-f", str(default), check=False)
    out = cp.kubectl("apply", "-f", str(default))
    return d, default, before, diff, out, again


def test_chart_applies_as_no_change_over_the_kustomize_base(cp, applied):
    _, default, before, diff, out, again = applied
    assert diff.returncode == 0 and diff.stdout == "", f"kubectl diff found differences:\n{diff.stdout}{diff.stderr}"
    lines = sorted(out.stdout.strip().splitlines())
    assert len(lines) == len(before) >= 8, out.stdout
    assert lines == sorted(again.stdout.strip().splitlines()), "the chart applies as the base re-applied"
    assert versions(cp, default) == before, "no object changed"


def test_a_changed_value_is_a_difference(cp, applied):
    d = applied[0]
    changed = helm_template(d, "debug", "logLevel=debug")
    diff = cp.kubectl("diff", "-f", str(changed), check=False)
    assert diff.returncode == 1 and "--log-level=debug" in diff.stdout, diff.stdout + diff.stderr


def test_host_mode_render_passes_strict_server_validation(cp, applied):
    host = helm_template(applied[0], "host", "mode=host")
    out = cp.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(host))
    assert "envlane-sync-host-mode" in out.stdout


# ---------------------------------------------------------------- running it


def helm(cp, *args: str) -> str:
    out = subprocess.run([helm_bin(), "--kubeconfig", str(cp.kubeconfig), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"helm {' '.join(args)}:\n{out.stdout}{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(cp, applied):
    """`helm install` as docs/install.md says, in place of the kustomize
    install: the base's objects are deleted first (all but the Namespace: no
    namespace controller runs here to finish deleting one), and put back
    with `kubectl apply -k` afterwards for the modules that follow."""
    d, default = applied[0], applied[1]
    objs = [o for o in yaml.safe_load_all(default.read_text()) if o and o["kind"] != "Namespace"]
    without_ns = d / "objects.yaml"
    without_ns.write_text(yaml.safe_dump_all(objs))
    cp.kubectl("delete", "-f", str(without_ns))
    out = helm(cp, "install", "envlane", str(CHART), "-n", SYSTEM_NS, "--create-namespace",
               "--set", "settings.baggageKey=lane")
    try:
        yield out
    finally:
        helm(cp, "uninstall", "envlane", "-n", SYSTEM_NS)
        cp.kubectl("apply", "-k", str(BASE))


def test_helm_install_deploys(cp, installed):
    assert "STATUS: deployed" in installed, installed
    assert "kubectl label namespace NAMESPACE envlane.io/enabled=true" in installed, "the chart's notes"
    status = json.loads(helm(cp, "status", "envlane", "-n", SYSTEM_NS, "-o", "json"))
    assert status["info"]["status"] == "deployed"


@pytest.fixture(scope="module")
def running(cp, cluster, installed, deploy, workdir):
    sync = EnvlaneSync(cp, workdir / "sync-helm")
    (workdir / "sync-helm").mkdir(exist_ok=True)
    sync.start()
    mesh = None
    p = None
    try:
        mesh = deploy(NS, ALIBABA)
        mesh.wait_table()
        targets = {
            "envlane-sync": [(f"127.0.0.1:{sync.port}", "/metrics", {"namespace": SYSTEM_NS, "pod": "envlane-sync-0"})],
            "envoy-stats": [(f"127.0.0.1:{sc.envoy.admin_port}", "/stats/prometheus", {"namespace": NS, "pod": pod})
                            for pod, sc in mesh.sidecars.items()],
        }
        p = prom.Prometheus(workdir / "prometheus", targets, honor_labels={"envlane-sync"})
        p.wait_up(1 + len(mesh.sidecars))
        yield sync, mesh, p
    finally:
        if p:
            p.close()
        # Opt out: envlane-sync removes what it wrote for this namespace.
        cluster.namespace(NS, {"istio-injection": "enabled"})
        try:
            sync.wait(lambda: cluster.get("extensions.istio.io/v1alpha1", "WasmPlugin", NS, "envlane") is None,
                      "envlane-sync removed the opted-out namespace's WasmPlugin", 30)
        finally:
            sync.stop()


def test_settings_changed_with_helm_roll_the_deployment(cp, running):
    sync, _, _ = running
    dep = sync.deployment()
    cm = dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    data = json.loads(cp.api("GET", f"/api/v1/namespaces/{SYSTEM_NS}/configmaps/{cm}")["data"]["settings.json"])
    assert data["defaultEnv"] == "dev", "the chart's default env is the base's"
    assert data["baggageKey"] == "lane"
    base_cm = [d for d in yaml.safe_load_all(cp.kubectl("kustomize", str(BASE)).stdout) if d and d["kind"] == "ConfigMap"][0]
    assert cm != base_cm["metadata"]["name"], "another setting, another ConfigMap: the Deployment rolls"


@pytest.mark.parametrize("env", list(ALIBABA_CASES), ids=lambda e: e or "no-header")
def test_helm_installed_envlane_routes(running, env):
    _, mesh, _ = running
    headers = {"x-virtual-env": env} if env else {}
    assert mesh.call("node", headers) == (200, ALIBABA_CASES[env])


def test_dashboard_and_alerts_on_the_running_mesh(cluster, running):
    sync, mesh, p = running
    start = time.time() - 5

    def traffic(scrapes: int) -> None:
        """A round of calls between each of `scrapes` scrapes (rate() needs
        samples across its window)."""
        for i in range(scrapes):
            for env in ALIBABA_CASES:
                mesh.call("node", {"x-virtual-env": env} if env else {})
            if i % 2:
                mesh.call("node", {"x-virtual-env": "dev..bad"})
            p.wait_next_scrape()

    traffic(15)
    # The table-size gauges are what envlane-sync says.
    for name in ("envlane_sync_table_pairs", "envlane_sync_table_services", "envlane_sync_table_envs"):
        own = sync.metric(name)
        assert own and own > 0, name
        p.wait_value(f"sum({name})", lambda v, own=own: v == own, f"{name} scraped")
    # Pairs refused: before, nothing; after a Pod with an invalid env label, the alert's expression.
    rule = next(r for r in gen_chart.alert_rules() if r["alert"] == "EnvlanePairsRefused")
    expr = rule["expr"].replace("[15m]", "[2m]")
    assert p.query(expr) == [], "nothing refused yet"
    cluster.pod(NS, "node-bad-label", {"app": "node", "virtual-env": "dev..bad"}, port=9080)
    sync.wait(lambda: (sync.metric("envlane_sync_invalid_env_labels_total") or 0) > 0, "envlane-sync counted the invalid env label")
    wait_for(lambda: p.query(expr), "EnvlanePairsRefused's expression returns", 30)
    traffic(10)
    end = time.time()
    quiet = {x["title"] for x in gen_chart.panels() if x.get("quiet_when_healthy")}
    dashboard = json.loads((REPO / "monitoring" / "envlane-dashboard.json").read_text())
    empty = []
    for panel in dashboard["panels"]:
        for t in panel["targets"]:
            if not p.query_range(t["expr"], start, end) and panel["title"] not in quiet:
                empty.append(f"{panel['title']}: {t['expr']}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)
    png = os.environ.get("ENVLANE_DASHBOARD_PNG")
    if png:
        counts = prom.draw_dashboard(dashboard, p, start, end, Path(png),
                                     "envlane dashboard, drawn from Prometheus query results (e2e: real kube-apiserver + istiod, "
                                     "envlane-sync installed with the Helm chart, alibaba's topology)")
        print(f"dashboard picture: {png} {counts}")


def operator_crd_files() -> list[Path]:
    """The Prometheus Operator's CRDs from its Go module (downloaded by
    integration/test_monitoring.py: no network in the suite's namespace)."""
    cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    module = "github.com/prometheus-operator/prometheus-operator@" + prom_operator_version()
    d = Path(cache) / module / "example" / "prometheus-operator-crd"
    files = [d / f"monitoring.coreos.com_{p}.yaml" for p in ("servicemonitors", "prometheusrules")]
    for f in files:
        assert f.is_file(), f"{f} is missing: run integration/test_monitoring.py first (it downloads {module})"
    return files


def prom_operator_version() -> str:
    text = (REPO / "integration" / "test_monitoring.py").read_text()
    import re

    return re.search(r'PROM_OPERATOR = "[^@]+@([^"]+)"', text).group(1)


def test_monitoring_objects_pass_the_api_server(cp, applied):
    for f in operator_crd_files():
        cp.kubectl("apply", "--server-side", "--field-manager", "envlane-e2e", "-f", str(f))
    for name in ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    render = helm_template(applied[0], "monitoring", "serviceMonitor.enabled=true", "prometheusRule.enabled=true",
                           "grafanaDashboard.enabled=true")
    out = cp.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(render)).stdout
    assert "servicemonitor.monitoring.coreos.com/envlane-sync created (server dry run)" in out, out
    assert "prometheusrule.monitoring.coreos.com/envlane created (server dry run)" in out, out
    bad = render.read_text().replace("honorLabels: true", "honorLabel: true")
    assert bad != render.read_text()
    refused = cp.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=bad, check=False)
    assert refused.returncode != 0 and "honorLabel" in refused.stderr, refused.stderr
