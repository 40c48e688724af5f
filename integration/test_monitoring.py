"""The monitoring files (monitoring/, and the chart's copies): the
PrometheusRule's alerts and the Grafana dashboard's queries, checked with a
real Prometheus (Debian's package, pinned and installed by scripts/tools.sh):

* `promtool check rules` accepts the rule group; `promtool test rules` runs
  unit tests of every alert: each fires on the series that mean trouble and
  stays quiet on healthy ones;
* every metric a rule or panel names is one the Rust code defines
  (sync/src/metrics.rs, the filter's counters) or, for istio-agent's fetch
  counter, one Istio's source (the pinned istio.io/istio module) defines;
* the demo (integration/demo.py's mesh: alibaba's topology, real Envoy
  sidecars running the filter) scraped by Prometheus: every filter panel's
  query returns data, equal to what the Envoys count themselves; a refused
  table update makes the EnvlaneTableRejected expression return the sidecars
  that refused it (and nothing before). The companion's panels are checked
  against a running envlane-sync in integration/e2e/test_helm.py.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(HERE))

import gen_chart  # noqa: E402
import prom  # noqa: E402
from harness import Mesh, wait_for  # noqa: E402
from topologies import ALIBABA, ALIBABA_CASES, load_config  # noqa: E402

MONITORING = ROOT / "monitoring"


def rule_doc() -> dict:
    return yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())


def dashboard() -> dict:
    return json.loads((MONITORING / "envlane-dashboard.json").read_text())


def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "envlane.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_doc()["spec"]["groups"]}))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([prom.binary("promtool"), *args], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- static


def test_rules_and_dashboard_are_the_generated_ones():
    assert rule_doc()["spec"]["groups"][0]["rules"] == gen_chart.alert_rules()
    assert dashboard() == gen_chart.dashboard()
    alerts = {r["alert"] for r in gen_chart.alert_rules()}
    # The four conditions issue 15 asks for, plus envlane-sync down.
    assert {"EnvlaneTableStale", "EnvlaneWritesFailing", "EnvlanePairsRefused", "EnvlaneModuleFetchFailing",
            "EnvlaneTableRejected", "EnvlaneSyncDown"} == alerts


def test_promtool_checks_the_rules(tmp_path):
    out = promtool("check", "rules", str(rules_file(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout, out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(rate(x[5m]) >"}]}]}))
    assert promtool("check", "rules", str(bad)).returncode != 0, "promtool is not vacuous"


# The Prometheus Operator's CRDs (its Go module carries them as YAML).
PROM_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"


def operator_crd(plural: str) -> dict:
    out = subprocess.run(["go", "mod", "download", "-json", PROM_OPERATOR], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    path = Path(json.loads(out.stdout)["Dir"]) / "example" / "prometheus-operator-crd" / f"monitoring.coreos.com_{plural}.yaml"
    return yaml.safe_load(path.read_text())


def operator_errors(doc: dict) -> list[str]:
    import jsonschema
    import test_manifests as tm

    plural = {"ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules"}[doc["kind"]]
    crd = operator_crd(plural)
    group, version = doc["apiVersion"].split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = tm.strict(served["schema"]["openAPIV3Schema"]["properties"]["spec"])
    v = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc["spec"])]


def test_monitoring_objects_match_the_operator_crds():
    docs = [yaml.safe_load((MONITORING / f).read_text()) for f in ("servicemonitor.yaml", "prometheusrule.yaml")]
    for doc in docs:
        assert operator_errors(doc) == [], doc["kind"]
    sm = copy.deepcopy(docs[0])
    sm["spec"]["endpoints"][0]["honorlabels"] = True
    assert operator_errors(sm), "a misspelt field is refused"
    rule = copy.deepcopy(docs[1])
    rule["spec"]["groups"][0]["rules"][0]["for"] = 600
    assert operator_errors(rule), "a number where a duration goes is refused"


def metric_names(expr: str) -> set[str]:
    return gen_chart.used_metrics(expr)


def all_exprs() -> list[str]:
    return [r["expr"] for r in gen_chart.alert_rules()] + [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def test_every_metric_is_defined_by_the_code():
    names = {m for e in all_exprs() for m in metric_names(e)}
    rust = gen_chart.sync_metric_names() | gen_chart.filter_metric_names()
    assert names - rust == {gen_chart.ISTIO_AGENT_FETCH}, names - rust
    # Every companion metric and every filter counter is on the dashboard.
    assert rust <= names, f"not on the dashboard: {rust - names}"


def test_istio_agent_metric_is_istios():
    """istio-agent's counter name and result values, read from the pinned
    istio.io/istio module (the one istiod is built from)."""
    gomod = (HERE / "controlplane" / "istiod" / "go.mod").read_text()
    version = re.search(r"^(?:require)?\s*istio\.io/istio (\S+)", gomod, re.M).group(1)
    cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    src = Path(cache) / f"istio.io/istio@{version}" / "pkg" / "wasm" / "monitoring.go"
    if not src.is_file():
        subprocess.run(["go", "mod", "download", f"istio.io/istio@{version}"], cwd=HERE / "controlplane" / "istiod",
                       capture_output=True, timeout=900, check=True)
    text = src.read_text()
    assert gen_chart.ISTIO_AGENT_FETCH == "istio_agent_" + re.search(r'wasmRemoteFetchCount = monitoring\.NewSum\(\s*"(\w+)"', text).group(1)
    assert f'fetchSuccess     = "{gen_chart.ISTIO_AGENT_FETCH_OK}"' in text


def series(name: str, values: str, **labels) -> dict:
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{lab}}}", "values": values}


# For each alert: series that must fire it (and when), and healthy series that must not.
ALERT_CASES = {
    "EnvlaneSyncDown": (
        [series("envlane_sync_ready", "0x20")], "15m",
        [series("envlane_sync_ready", "1x20")],
    ),
    "EnvlaneTableStale": (
        [series("envlane_sync_watches_stale", "1x20"), series("envlane_sync_seconds_since_last_sync", "1+60x20")], "15m",
        [series("envlane_sync_watches_stale", "0x20"), series("envlane_sync_seconds_since_last_sync", "0+10x20")],
    ),
    "EnvlaneWritesFailing": (
        [series("envlane_sync_errors_total", "0+3x30", kind="api")], "25m",
        [series("envlane_sync_errors_total", "0+3x30", kind="watch"), series("envlane_sync_errors_total", "0x30", kind="api")],
    ),
    "EnvlanePairsRefused": (
        [series("envlane_sync_invalid_env_labels_total", "0 0 1 1 1 1"), series("envlane_sync_skipped_pairs_total", "0x5"),
         series("envlane_sync_subset_collisions", "0x5"), series("envlane_sync_errors_total", "0x5", kind="conflict")], "5m",
        [series("envlane_sync_invalid_env_labels_total", "3x5"), series("envlane_sync_skipped_pairs_total", "1x5"),
         series("envlane_sync_subset_collisions", "0x5"), series("envlane_sync_errors_total", "2x5", kind="conflict")],
    ),
    "EnvlaneModuleFetchFailing": (
        [series(gen_chart.ISTIO_AGENT_FETCH, "0 1 2 2 2", result="checksum_mismatched", namespace="shop", pod="client-1")], "4m",
        [series(gen_chart.ISTIO_AGENT_FETCH, "0 1 2 3 4", result="success", namespace="shop", pod="client-1")],
    ),
    "EnvlaneTableRejected": (
        [series("envlane_config_invalid", "0 0 1 1 1", namespace="shop", pod="client-1")], "4m",
        [series("envlane_config_invalid", "0x4", namespace="shop", pod="client-1"),
         series("envlane_config_invalid", "2x4", namespace="shop", pod="client-2")],
    ),
}


def test_every_alert_has_cases():
    assert set(ALERT_CASES) == {r["alert"] for r in gen_chart.alert_rules()}


@pytest.mark.parametrize("alert", sorted(ALERT_CASES))
def test_alert_fires_on_trouble_only(alert, tmp_path):
    firing, at, healthy = ALERT_CASES[alert]
    rule = next(r for r in gen_chart.alert_rules() if r["alert"] == alert)
    tests = []
    for name, input_series, fires in (("trouble", firing, True), ("healthy", healthy, False)):
        tests.append({"name": name, "interval": "1m", "input_series": input_series,
                      "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}]})
        if fires:
            # Which labels the alert carries is what the rule keeps: take the
            # ones promtool reports, but there must be an alert.
            kept = _kept_labels(rule, input_series)
            annotations = {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: kept[m.group(1)], v) for k, v in rule["annotations"].items()}
            tests[-1]["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {"severity": rule["labels"]["severity"], **kept},
                                                              "exp_annotations": annotations}]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": [str(rules_file(tmp_path))], "evaluation_interval": "1m", "tests": tests}))
    out = promtool("test", "rules", str(tmp_path / "test.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr


def _kept_labels(rule: dict, input_series: list[dict]) -> dict:
    m = re.search(r"sum by \(([^)]*)\)", rule["expr"])
    if not m:
        return {}
    keep = [k.strip() for k in m.group(1).split(",")]
    for s in input_series:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', s["series"]))
        if all(k in labels for k in keep):
            return {k: labels[k] for k in keep}
    return {}


def rule_annotations(alert: str) -> dict:
    return next(r for r in gen_chart.alert_rules() if r["alert"] == alert)["annotations"]


def test_alert_tests_are_not_vacuous(tmp_path):
    """promtool fails a test whose alert does not fire as expected."""
    tests = [{"name": "wrong", "interval": "1m", "input_series": [series("envlane_sync_ready", "1x20")],
              "alert_rule_test": [{"eval_time": "15m", "alertname": "EnvlaneSyncDown", "exp_alerts": [{"exp_labels": {"severity": "warning"},
                                                                                                       "exp_annotations": rule_annotations("EnvlaneSyncDown")}]}]}]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": [str(rules_file(tmp_path))], "evaluation_interval": "1m", "tests": tests}))
    assert promtool("test", "rules", str(tmp_path / "test.yaml")).returncode != 0


# ---------------------------------------------------------------- live: the demo scraped


def panels_of(group: str) -> list[dict]:
    """The dashboard panels of one group (filter or companion) that show data
    in a healthy mesh (the others are checked as valid PromQL only)."""
    live = {p["title"] for p in gen_chart.panels() if p["group"] == group and not p.get("quiet_when_healthy")}
    return [p for p in dashboard()["panels"] if p["title"] in live]


def filter_panels() -> list[dict]:
    return panels_of("filter")


@pytest.fixture(scope="module")
def scraped_demo(tmp_path_factory):
    config = load_config("alibaba")
    config["debug"] = True
    with Mesh(ALIBABA, config) as mesh:
        targets = {"envoy-stats": [(f"127.0.0.1:{env.admin_port}", "/stats/prometheus", {"namespace": "demo", "pod": pod})
                                   for pod, env in mesh.sidecars.items()]}
        p = prom.Prometheus(tmp_path_factory.mktemp("prometheus"), targets)
        try:
            p.wait_up(len(mesh.sidecars))
            yield mesh, p
        finally:
            p.close()


def envoy_total(mesh: Mesh, stat: str) -> int:
    return sum(env.stats(stat).get(stat, 0) for env in mesh.sidecars.values())


def test_filter_panels_show_the_demo(scraped_demo):
    mesh, p = scraped_demo
    import time

    start = time.time()
    for _ in range(3):
        for env in ALIBABA_CASES:
            status, _, body = mesh.call("node:8080", {"x-virtual-env": env} if env else {})
            assert (status, body.strip()) == (200, ALIBABA_CASES[env])
        assert mesh.call("node:8080", {"x-virtual-env": "dev..bad"})[0] == 200
        p.wait_next_scrape()  # spread over scrapes: rate() needs two samples
    # What Prometheus holds is what the Envoys count.
    for outcome in ("exact", "fallback", "default"):
        want = envoy_total(mesh, f"wasmcustom.envlane.decision.{outcome}")
        assert want > 0, outcome
        p.wait_value(f"sum(envlane_decision_{outcome})", lambda v, w=want: v == w, f"{outcome} decisions scraped")
    p.wait_value("sum(envlane_env_invalid)", lambda v: v == envoy_total(mesh, "wasmcustom.envlane.env.invalid") > 0, "invalid envs scraped")
    p.wait_next_scrape()
    p.wait_next_scrape()
    for panel in filter_panels():
        for t in panel["targets"]:
            result = p.query_range(t["expr"], start, time.time())
            assert result, f"panel {panel['title']!r}: no data for {t['expr']}"
    rate = p.value(f"sum(rate(envlane_decision_fallback[{prom.RATE_INTERVAL}]))")
    assert rate and rate > 0


def test_every_query_is_valid_promql(scraped_demo):
    _, p = scraped_demo
    for expr in all_exprs():
        p.query(expr)  # raises on a parse or evaluation error
    with pytest.raises(AssertionError):
        p.query("sum(rate(envlane_decision_exact[5m]) by")


def test_a_refused_table_fires_table_rejected(scraped_demo):
    mesh, p = scraped_demo
    rule = next(r for r in gen_chart.alert_rules() if r["alert"] == "EnvlaneTableRejected")
    # The rule's window, shortened to what a test can wait for.
    expr = rule["expr"].replace("[15m]", "[1m]")
    assert p.query(expr) == [], "no table was refused yet"
    before = mesh.config_events()
    bad = copy.deepcopy(mesh.plugin_config)
    bad["services"][0]["envs"] = [999]
    mesh.push(bad)
    mesh.wait_config(before)
    got = wait_for(lambda: (r := p.query(expr)) and len(r) == len(mesh.sidecars) and r,
                   "EnvlaneTableRejected's expression returns every refusing sidecar", 30)
    assert {r["metric"]["pod"] for r in got} == set(mesh.sidecars), got
    mesh.push(mesh.plugin_config)


def test_prometheus_scrapes_demo_serve(tmp_path):
    """`./build.sh demo --serve` as a user runs it: Prometheus scrapes the
    endpoints it prints, and the filter panels show the demo's requests."""
    import os
    import signal
    import time

    demo = subprocess.Popen([sys.executable, str(HERE / "demo.py"), "--serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ)
    p = None
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C to stop" in x for x in lines):
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        endpoints = re.findall(r"^\s+(\S+)\s+http://(127\.0\.0\.1:\d+)(/stats/prometheus)$", text, re.M)
        assert len(endpoints) == 5, text
        p = prom.Prometheus(tmp_path / "prometheus", {"demo": [(addr, path, {"pod": pod}) for pod, addr, path in endpoints]})
        p.wait_up(len(endpoints))
        curls = [line.strip() for line in lines if line.strip().startswith("curl -s -H")]
        start = time.time()
        for _ in range(5):
            for curl in curls:
                subprocess.run(curl, shell=True, capture_output=True, timeout=20, check=True)
            p.wait_next_scrape()
        p.wait_value("sum(envlane_decision_fallback)", lambda v: v >= 5, "the demo's fallbacks scraped")
        for panel in filter_panels():
            for t in panel["targets"]:
                assert p.query_range(t["expr"], start, time.time()), f"{panel['title']}: {t['expr']}"
    finally:
        if p:
            p.close()
        demo.send_signal(signal.SIGINT)
        try:
            demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def test_monitoring_kustomization_builds_its_files():
    import test_chart

    built = test_chart.kustomize(MONITORING)
    files = [d for f in ("servicemonitor.yaml", "prometheusrule.yaml", "grafana-dashboard.yaml")
             for d in yaml.safe_load_all((MONITORING / f).read_text()) if d]
    test_chart.assert_same_objects(built, files)
    (cm,) = [d for d in built if d["kind"] == "ConfigMap"]
    assert json.loads(cm["data"]["envlane-dashboard.json"]) == dashboard()
