"""The Helm chart charts/envlane/, tested as the kustomize base is
(integration/test_manifests.py), with a real helm:

* the committed chart and monitoring/ equal a fresh scripts/gen_chart.py run;
* `helm lint`; `helm template` with the default values renders exactly what
  `kubectl kustomize wasm-plugin-manifests/base` builds (object by object, the
  settings ConfigMap's hashed name included), and `mode=host` exactly the
  host-mode overlay;
* every rendered object validates against the Kubernetes OpenAPI v3 schema of
  the pinned Kubernetes (k8s.io/kubernetes in integration/controlplane/go.mod;
  unknown fields are errors) or, for Istio kinds, the Istio CRD schemas;
  the settings pass `envlane-sync settings` (strict);
* values are checked: the chart's values.schema.json refuses what the filter
  would refuse, and the values change what they say they change.

Helm is built once from its pinned Go module (scripts/tools.sh helm) and
kubectl with the control plane's (scripts/controlplane.sh build kubectl), so
nothing here skips on a fresh machine with Go. The same chart is applied to a
real API server by integration/e2e/test_helm.py.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "envlane"
MANIFESTS = ROOT / "wasm-plugin-manifests"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_chart  # noqa: E402
import gen_manifests  # noqa: E402
import test_manifests as tm  # noqa: E402

NS = "envlane-system"


def _run(argv: list[str], timeout: float = 900) -> str:
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(argv)}: {out.stderr}"
    return out.stdout


@functools.cache
def helm() -> str:
    return _run([str(ROOT / "scripts" / "tools.sh"), "helm"]).strip()


@functools.cache
def kubectl() -> str:
    paths = dict(line.split(" ", 1) for line in _run([str(ROOT / "scripts" / "controlplane.sh"), "build", "kubectl"]).splitlines())
    return paths["kubectl"]


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def template(*args: str, check: bool = True) -> list[dict] | subprocess.CompletedProcess:
    argv = [helm(), "template", "envlane", str(CHART), "-n", NS, *args]
    if not check:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return docs(_run(argv, 120))


def kustomize(path: Path) -> list[dict]:
    return docs(_run([kubectl(), "kustomize", str(path)], 120))


def key(d: dict) -> tuple[str, str, str]:
    return d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]


def by_key(objs: list[dict]) -> dict:
    out = {key(d): d for d in objs}
    assert len(out) == len(objs), "two objects with one name"
    return out


def assert_same_objects(got: list[dict], want: list[dict]) -> None:
    g, w = by_key(got), by_key(want)
    assert sorted(g) == sorted(w), f"only in the chart: {set(g) - set(w)}; only in kustomize: {set(w) - set(g)}"
    for k in w:
        assert g[k] == w[k], f"{k} differs:\nchart:     {json.dumps(g[k], sort_keys=True)}\nkustomize: {json.dumps(w[k], sort_keys=True)}"


# ---------------------------------------------------------------- generated == committed


def test_chart_is_generated():
    pins = gen_manifests.load_pins()
    assert gen_chart.differences(gen_chart.render(pins)) == [], "run python3 scripts/gen_chart.py (./build.sh manifests)"


def test_lint():
    out = _run([helm(), "lint", "--strict", str(CHART)], 120)
    assert "0 chart(s) failed" in out


# ---------------------------------------------------------------- equivalence with kustomize


def test_default_render_is_the_kustomize_base():
    assert_same_objects(template("--set", "namespace.create=true"), kustomize(MANIFESTS / "base"))


def test_without_namespace_create_it_is_the_base_minus_the_namespace():
    base = [d for d in kustomize(MANIFESTS / "base") if d["kind"] != "Namespace"]
    assert_same_objects(template(), base)


def test_host_mode_is_the_host_mode_overlay():
    assert_same_objects(template("--set", "namespace.create=true", "--set", "mode=host"), kustomize(MANIFESTS / "overlays" / "host-mode"))


def test_equivalence_check_is_not_vacuous():
    """A changed value shows up as a difference (the comparison can fail)."""
    with pytest.raises(AssertionError):
        assert_same_objects(template("--set", "namespace.create=true", "--set", "logLevel=debug"), kustomize(MANIFESTS / "base"))
    with pytest.raises(AssertionError):
        assert_same_objects(template(), kustomize(MANIFESTS / "base"))


# ---------------------------------------------------------------- schemas


def k8s_openapi_dir() -> Path:
    gomod = (ROOT / "integration" / "controlplane" / "go.mod").read_text()
    version = next(line.split()[1] for line in gomod.splitlines() if line.strip().startswith("k8s.io/kubernetes "))
    kubectl()  # downloads the k8s.io/kubernetes module when it is not there yet
    cache = _run(["go", "env", "GOMODCACHE"]).strip()
    d = Path(cache) / f"k8s.io/kubernetes@{version}" / "api" / "openapi-spec" / "v3"
    assert d.is_dir(), d
    return d


@functools.cache
def k8s_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    group, _, version = api_version.rpartition("/")
    name = f"api__{version}_openapi.json" if not group else f"apis__{group}__{version}_openapi.json"
    spec = json.loads((k8s_openapi_dir() / name).read_text())
    schemas = spec["components"]["schemas"]
    (ref,) = [n for n, s in schemas.items()
              if any(g.get("kind") == kind and g.get("version") == version and g.get("group", "") == group
                     for g in s.get("x-kubernetes-group-version-kind", []))]
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{ref}", "components": {"schemas": tm.strict(schemas)}})


@functools.cache
def namespaced(api_version: str, kind: str) -> bool:
    """From the OpenAPI paths: the kind has a /namespaces/{namespace}/ path."""
    group, _, version = api_version.rpartition("/")
    name = f"api__{version}_openapi.json" if not group else f"apis__{group}__{version}_openapi.json"
    spec = json.loads((k8s_openapi_dir() / name).read_text())
    found = set()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            if isinstance(op, dict) and op.get("x-kubernetes-group-version-kind", {}).get("kind") == kind:
                found.add("{namespace}" in path)
    assert found, f"{api_version} {kind}: no paths"
    return True in found


def basics(doc: dict) -> None:
    """Names, labels and namespaces as test_manifests checks them; which kinds
    are namespaced comes from the Kubernetes OpenAPI paths (Istio's and the
    monitoring kinds are namespaced)."""
    meta = doc["metadata"]
    k8s = not doc["apiVersion"].split("/")[0].endswith(("istio.io", "coreos.com"))
    if k8s and not namespaced(doc["apiVersion"], doc["kind"]):
        assert "namespace" not in meta, key(doc)
    else:
        assert tm.DNS1123_LABEL.match(meta.get("namespace", "")), key(doc)
    pattern = tm.DNS1123_LABEL if doc["kind"] in ("Namespace", "Service") else tm.DNS1123_SUBDOMAIN
    assert pattern.match(meta["name"]), key(doc)
    labels = {**meta.get("labels", {}), **doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})}
    for k, v in labels.items():
        prefix, _, label = k.rpartition("/")
        assert tm.LABEL_NAME.match(label) and (not prefix or tm.DNS1123_SUBDOMAIN.match(prefix)), k
        assert isinstance(v, str) and len(v) <= 63 and tm.LABEL_VALUE.match(v), (k, v)
    assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "envlane", key(doc)


def k8s_errors(doc: dict) -> list[str]:
    v = k8s_validator(doc["apiVersion"], doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


ALL_ON = ["--set", "namespace.create=true", "--set", "grafanaDashboard.enabled=true",
          "--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true"]


def rendered_everything() -> list[dict]:
    return template(*ALL_ON) + template("--set", "mode=host")


def test_every_rendered_object_validates():
    checked = 0
    for doc in rendered_everything():
        if doc["apiVersion"].split("/")[0].endswith("istio.io"):
            assert tm.crd_errors(doc) == [], key(doc)
        elif doc["apiVersion"].startswith("monitoring.coreos.com/"):
            basics(doc)  # their spec: test_monitoring.py (promtool)
            continue
        else:
            assert k8s_errors(doc) == [], key(doc)
        basics(doc)
        checked += 1
    assert checked >= 9


def test_schema_validation_catches_mistakes():
    dep = next(d for d in template() if d["kind"] == "Deployment")
    for what, mutate in {
        "unknown field": lambda d: d["spec"].update(replica=2),
        "bad type": lambda d: d["spec"].update(replicas="one"),
        "unknown container field": lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
        "port as text": lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="http"),
    }.items():
        bad = copy.deepcopy(dep)
        mutate(bad)
        assert k8s_errors(bad), what


def settings_of(objs: list[dict]) -> dict:
    (cm,) = [d for d in objs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envlane-sync-settings")]
    return json.loads(cm["data"][gen_manifests.SETTINGS_FILE])


def test_settings_pass_envlane_sync(tmp_path):
    objs = template("--set", "defaultEnv=dev", "--set", "settings.baggageKey=lane", "--set", "mode=host")
    settings = settings_of(objs)
    assert settings["defaultEnv"] == "dev" and settings["baggageKey"] == "lane" and settings["mode"] == "host"
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    out = subprocess.run([str(gen_manifests.sync_binary()), "settings", "--settings", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == settings, "the chart writes the settings as envlane-sync would fill them in"


# ---------------------------------------------------------------- values


def dep_of(objs: list[dict]) -> dict:
    return next(d for d in objs if d["kind"] == "Deployment")


def args_of(objs: list[dict]) -> dict:
    (c,) = dep_of(objs)["spec"]["template"]["spec"]["containers"]
    return dict(a.removeprefix("--").split("=", 1) for a in c["args"])


def test_values_do_what_they_say():
    default = template()
    objs = template(
        "--set", "image.repository=my.registry/envlane-sync", "--set", "image.tag=9.9.9", "--set", "image.digest=",
        "--set", "filter.url=oci://my.registry/envlane-filter:9.9.9", "--set", "filter.sha256=" + "ab" * 32,
        "--set", "resources.limits.memory=512Mi", "--set", "logLevel=debug", "--set", "extraArgs={--resync=10m}",
        "--set", "nodeSelector.pool=system", "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
        "--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
        "--set", "prometheusRule.labels.release=kps", "--set", "defaultEnv=base",
    )
    (c,) = dep_of(objs)["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "my.registry/envlane-sync:9.9.9"
    args = args_of(objs)
    assert args["wasm-url"] == "oci://my.registry/envlane-filter:9.9.9" and args["wasm-sha256"] == "ab" * 32
    assert args["log-level"] == "debug" and args["resync"] == "10m"
    assert c["resources"]["limits"]["memory"] == "512Mi"
    assert dep_of(objs)["spec"]["template"]["spec"]["nodeSelector"]["pool"] == "system"
    kinds = {d["kind"] for d in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    (rule,) = [d for d in objs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    # Another setting is another ConfigMap name: the Deployment rolls.
    vol = lambda o: dep_of(o)["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]  # noqa: E731
    assert vol(objs) != vol(default)
    assert {d["kind"] for d in default}.isdisjoint({"ServiceMonitor", "PrometheusRule", "Namespace"})


BAD_VALUES = {
    "unknown setting": ["settings.envheader=x"],
    "bad mode": ["mode=header"],
    "mode inside settings": ["settings.mode=host"],
    "bad default env": ["defaultEnv=dev..x"],
    "bad splitter": ["settings.splitter=ab"],
    "bad digest": ["image.digest=sha256:xyz"],
    "bad filter sha": ["filter.sha256=xyz"],
    "bad url": ["filter.url=ftp://x/y.wasm"],
    "unknown value": ["replicas=3"],
    "bad log level": ["logLevel=loud"],
}


@pytest.mark.parametrize("what", sorted(BAD_VALUES))
def test_bad_values_are_refused(what):
    args = [a for s in BAD_VALUES[what] for a in ("--set", s)]
    out = template(*args, check=False)
    assert out.returncode != 0, f"{what}: accepted"
    assert "schema" in out.stderr or "set mode" in out.stderr, out.stderr


def test_monitoring_objects_are_monitorings():
    """With them enabled the chart renders exactly monitoring/'s objects
    (which test_monitoring.py checks against promtool, the operator's CRDs
    and a real Prometheus)."""
    got = [d for d in template(*ALL_ON) if d["apiVersion"].startswith("monitoring.coreos.com/") or
           d["metadata"]["name"] == "envlane-dashboard"]
    want = [d for f in ("servicemonitor.yaml", "prometheusrule.yaml", "grafana-dashboard.yaml")
            for d in docs((ROOT / "monitoring" / f).read_text())]
    assert_same_objects(got, want)


def test_packaged_chart_renders_the_same(tmp_path):
    """`helm package` (what a chart repository serves) keeps every file the render needs."""
    _run([helm(), "package", str(CHART), "-d", str(tmp_path)], 120)
    (tgz,) = tmp_path.glob("envlane-*.tgz")
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert tgz.name == f"envlane-{version}.tgz"
    packaged = docs(_run([helm(), "template", "envlane", str(tgz), "-n", NS, *ALL_ON], 120))
    assert_same_objects(packaged, template(*ALL_ON))
