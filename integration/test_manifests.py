"""Checks of what envlane ships: wasm-plugin-manifests/ and the OCI images.

* every Istio object's `spec` validates against the OpenAPI v3 schema of its
  CRD in ../shared/istio/crds.gen.yaml (served version; unknown fields are
  errors, as with `kubectl apply --validate=strict`);
* Kubernetes basics (apiVersion/kind, DNS-1123 names, label syntax), the
  envlane-sync Deployment's hardening and RBAC scope;
* kustomizations reference files that exist (and build, when kubectl is here);
* plugin-config.schema.json and the settings files are what `envlane-sync
  schema` / `envlane-sync settings` print (made from src/config.rs); the schema
  accepts / refuses the right documents; every pluginConfig shipped passes it;
* the committed files equal a fresh `scripts/gen_manifests.py` run;
* the filter image is what Istio's image fetcher accepts, and is reproducible.

Only the checks that need dist/ skip when it is missing (`./build.sh` makes it).
target/release/envlane-sync is built when missing or older than its sources
(scripts/gen_manifests.py runs it).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "wasm-plugin-manifests"
CRDS = Path(os.environ.get("ENVLANE_ISTIO_CRDS", ROOT.parent / "shared" / "istio" / "crds.gen.yaml"))
SCHEMA = MANIFESTS / "plugin-config.schema.json"
WASM = ROOT / "dist" / "envlane.wasm"

sys.path.insert(0, str(ROOT / "scripts"))
import gen_manifests  # noqa: E402
import oci  # noqa: E402

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
ISTIO_GROUPS = ("istio.io",)


# ---------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomizations() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> list[tuple[str, dict]]:
    out = []
    for path in manifest_files():
        for doc in load_docs(path):
            out.append((str(path.relative_to(ROOT)), doc))
    return out


def objects_of(kind: str) -> list[dict]:
    return [doc for _, doc in all_objects() if doc.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in objects_of(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def plugin_schema() -> dict:
    return json.loads(SCHEMA.read_text())


def plugin_validator() -> jsonschema.Draft202012Validator:
    schema = plugin_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# ---------------------------------------------------------------- CRD schemas


def crd_docs() -> list[dict]:
    if not CRDS.is_file():
        pytest.skip(f"Istio CRDs not found at {CRDS} (shared/ sits beside the repo)")
    return [d for d in yaml.safe_load_all(CRDS.read_text()) if d]


def strict(schema: object) -> object:
    """A CRD OpenAPI v3 schema as plain JSON Schema (draft 7 semantics).

    `x-kubernetes-*` keywords are dropped; `nullable` becomes a null type; an
    object with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` refuses unknown fields (the API
    server prunes them silently, `kubectl apply` refuses them: either way a
    typo would be lost).
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[tuple[str, str], jsonschema.Draft7Validator] = {}


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    key = (api_version, kind)
    if key not in _VALIDATORS:
        group, version = api_version.split("/", 1)
        for crd in crd_docs():
            spec = crd["spec"]
            if spec["group"] == group and spec["names"]["kind"] == kind:
                served = [v for v in spec["versions"] if v["name"] == version and v.get("served")]
                assert served, f"{kind}: version {version} is not served by the CRD"
                schema = strict(served[0]["schema"]["openAPIV3Schema"]["properties"]["spec"])
                jsonschema.Draft7Validator.check_schema(schema)
                _VALIDATORS[key] = jsonschema.Draft7Validator(schema)
                break
        else:
            raise AssertionError(f"no CRD for {group} {kind} in {CRDS}")
    return _VALIDATORS[key]


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc.get("spec", {}))]
    errors += cel_errors(doc)
    return errors


def cel_errors(doc: dict) -> list[str]:
    """The CEL rules (x-kubernetes-validations) that matter here, by hand."""
    spec = doc.get("spec", {})
    errs = []
    if doc["kind"] in ("WasmPlugin", "TrafficExtension"):
        wasm = spec if doc["kind"] == "WasmPlugin" else spec.get("wasm", {})
        scheme = wasm.get("url", "").split("://", 1)[0] if "://" in wasm.get("url", "") else ""
        if scheme not in ("", "http", "https", "oci", "file"):
            errs.append(f"url scheme {scheme!r} is not one of http, https, oci, file")
        if "selector" in spec and ("targetRefs" in spec or "targetRef" in spec):
            errs.append("only one of targetRefs or selector can be set")
    if doc["kind"] == "TrafficExtension" and ("wasm" in spec) == ("lua" in spec):
        errs.append("exactly one of wasm or lua must be set")
    return errs


def istio_objects() -> list[tuple[str, dict]]:
    return [(p, d) for p, d in all_objects() if d.get("apiVersion", "").split("/")[0].endswith(ISTIO_GROUPS)]


def test_istio_objects_present():
    kinds = sorted(d["kind"] for _, d in istio_objects())
    # The route EnvoyFilters are envlane-sync's to render, per Service.
    assert kinds == ["TrafficExtension", "WasmPlugin", "WasmPlugin"]


def test_edge_overlay_strips_with_the_mesh_settings():
    """The edge WasmPlugin: on the ingress gateway, `edge: true`, and
    otherwise the very settings envlane-sync gives the mesh's filter."""
    edge = one("WasmPlugin", "envlane-edge")
    spec = edge["spec"]
    assert edge["metadata"]["namespace"] == "istio-system"
    assert spec["selector"] == {"matchLabels": {"istio": "ingressgateway"}}
    assert "match" not in spec, "all of the gateway's traffic"
    mesh = one("WasmPlugin", "envlane")["spec"]
    for key in ("url", "sha256", "phase", "priority", "type"):
        assert spec[key] == mesh[key], key
    config = dict(spec["pluginConfig"])
    assert config.pop("edge") is True
    assert config == mesh["pluginConfig"]
    plugin_validator().validate(spec["pluginConfig"])


@pytest.mark.parametrize("path,doc", istio_objects(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_istio_spec_matches_crd_schema(path, doc):
    assert crd_errors(doc) == [], path


def test_crd_validation_catches_mistakes():
    """The validator is not vacuous: typical mistakes are refused."""
    wp = one("WasmPlugin", "envlane")
    cases = {
        "unknown field": lambda s: s.update(failstrategy="FAIL_OPEN"),
        "bad enum": lambda s: s.update(phase="ROUTER"),
        "bad sha256": lambda s: s.update(sha256="sha256:" + "0" * 64),
        "bad match mode": lambda s: s.update(match=[{"mode": "OUTBOUND"}]),
        "bad url scheme": lambda s: s.update(url="ftp://example.com/x.wasm"),
        "priority not int": lambda s: s.update(priority="high"),
    }
    for what, mutate in cases.items():
        bad = copy.deepcopy(wp)
        mutate(bad["spec"])
        assert crd_errors(bad), what
    te = copy.deepcopy(one("TrafficExtension"))
    te["spec"]["lua"] = {"inlineCode": "function envoy_on_request(h) end"}
    assert crd_errors(te), "wasm and lua together"


# ---------------------------------------------------------------- Kubernetes basics


@pytest.mark.parametrize("path,doc", all_objects(), ids=lambda v: v if isinstance(v, str) else f"{v.get('kind')}")
def test_kubernetes_object_basics(path, doc):
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path
    assert isinstance(doc.get("kind"), str) and re.match(r"^[A-Z][A-Za-z0-9]*$", doc["kind"]), path
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    pattern = DNS1123_LABEL if doc["kind"] in ("Namespace", "Service") else DNS1123_SUBDOMAIN
    assert pattern.match(name), f"{path}: bad name {name!r}"
    if doc["kind"] in CLUSTER_SCOPED:
        assert "namespace" not in meta, f"{path}: cluster-scoped {doc['kind']} has a namespace"
    else:
        assert DNS1123_LABEL.match(meta.get("namespace", "")), f"{path}: namespaced {doc['kind']} needs a namespace"
    for key, value in {**meta.get("labels", {}), **_template_labels(doc)}.items():
        prefix, _, label = key.rpartition("/")
        assert LABEL_NAME.match(label), f"{path}: label key {key!r}"
        assert not prefix or DNS1123_SUBDOMAIN.match(prefix), f"{path}: label prefix {key!r}"
        assert isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.match(value), f"{path}: label {key}={value!r}"
    for key, value in meta.get("annotations", {}).items():
        assert isinstance(value, str), f"{path}: annotation {key} must be a string"
    if not path.endswith("overlays/namespace/namespace.yaml"):  # the user's own namespace
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "envlane", f"{path}: missing part-of label"


def _template_labels(doc: dict) -> dict:
    return doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) if doc["kind"] == "Deployment" else {}


def test_generated_files_say_so():
    for path in manifest_files():
        assert path.read_text().startswith(gen_manifests.GENERATED), path


# ---------------------------------------------------------------- kustomize


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.parent.relative_to(MANIFESTS)))
def test_kustomization_references_exist(path):
    k = yaml.safe_load(path.read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    refs = list(k.get("resources", []))
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        refs += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    refs += [p["path"] for p in k.get("patches", []) if "path" in p]
    assert refs, path
    for ref in refs:
        target = (path.parent / ref).resolve()
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {ref} does not exist"
    # Every manifest next to a kustomization is used by it.
    used = {(path.parent / r).resolve() for r in refs}
    for sibling in path.parent.glob("*.yaml"):
        if sibling.name != "kustomization.yaml":
            assert sibling.resolve() in used, f"{sibling} is not listed in {path}"


def kustomize_build(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: kustomize builds not checked")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_base_builds_and_installs_sync():
    docs = kustomize_build(MANIFESTS / "base")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ConfigMap", "Deployment",
                            "PodDisruptionBudget", "Service"])
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"]["namespace"] == "envlane-system", d["kind"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    plugin_validator().validate(json.loads(cm["data"]["settings.json"]))


def test_namespace_overlay_labels_the_chosen_namespace(tmp_path):
    docs = kustomize_build(MANIFESTS / "overlays" / "namespace")
    assert len(docs) == 1 and docs[0]["kind"] == "Namespace"
    assert docs[0]["metadata"]["labels"]["envlane.io/enabled"] == "true"
    assert docs[0]["metadata"]["labels"]["istio-injection"] == "enabled"
    # The documented way to pick the namespace: kustomize's `namespace:` renames it.
    shutil.copytree(MANIFESTS / "overlays" / "namespace", tmp_path / "namespace")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: shop\nresources:\n- ../namespace\n"
    )
    docs = kustomize_build(tmp_path / "mine")
    assert [d["metadata"]["name"] for d in docs] == ["shop"]
    assert docs[0]["metadata"]["labels"]["envlane.io/enabled"] == "true"


def test_host_mode_overlay():
    docs = kustomize_build(MANIFESTS / "overlays" / "host-mode")
    assert not [d for d in docs if d["kind"] == "EnvoyFilter"], "host mode needs no EnvoyFilter"
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    settings = json.loads(cm["data"]["settings.json"])
    assert settings["mode"] == "host"
    plugin_validator().validate(settings)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
    assert any("services" in r["resources"] and "create" in r["verbs"] for r in rules)


# ---------------------------------------------------------------- what the objects say


def test_wasmplugin_settings():
    pins = gen_manifests.load_pins()
    spec = one("WasmPlugin", "envlane")["spec"]
    assert spec["url"] == "oci://" + pins["filter"]["image"]
    assert spec["sha256"] == pins["filter"]["digest"].removeprefix("sha256:")
    assert spec["match"] == [{"mode": "CLIENT"}]
    assert spec["failStrategy"] == "FAIL_OPEN"
    assert spec["type"] == "HTTP"
    assert spec["phase"] == "AUTHN" and spec["priority"] == 1000
    plugin_validator().validate(spec["pluginConfig"])


def test_trafficextension_is_the_same_plugin():
    wp = one("WasmPlugin", "envlane")["spec"]
    te = one("TrafficExtension")["spec"]
    for key in ("phase", "priority", "match"):
        assert te[key] == wp[key], key
    for key in ("url", "sha256", "imagePullPolicy", "type", "failStrategy", "pluginConfig"):
        assert te["wasm"][key] == wp[key], key
    plugin_validator().validate(te["wasm"]["pluginConfig"])


def test_sync_deployment_is_hardened_and_pinned():
    dep = one("Deployment", "envlane-sync")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    pins = gen_manifests.load_pins()
    if pins["sync"].get("digest"):
        assert c["image"] == f"{pins['sync']['image']}@{pins['sync']['digest']}"
    else:
        assert c["image"] == pins["sync"]["image"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 9090, "protocol": "TCP"}]
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["namespace-selector"] == "envlane.io/enabled=true"
    assert args["listen"] == "0.0.0.0:9090"
    assert args["wasm-url"] == one("WasmPlugin", "envlane")["spec"]["url"]
    assert args["wasm-sha256"] == one("WasmPlugin", "envlane")["spec"]["sha256"]
    assert args["settings"].startswith(c["volumeMounts"][0]["mountPath"] + "/")
    assert pod["volumes"][0]["name"] == c["volumeMounts"][0]["name"]
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    svc = one("Service", "envlane-sync-metrics")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == 9090
    for key, value in dep["spec"]["selector"]["matchLabels"].items():
        assert dep["spec"]["template"]["metadata"]["labels"][key] == value


def _verbs(role: dict) -> dict:
    """(group, resource, resourceNames) -> verbs."""
    out: dict = {}
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                key = (g, r, tuple(rule.get("resourceNames", ())))
                out.setdefault(key, set()).update(rule["verbs"])
    return out


def test_rbac_is_least_privilege():
    read = {"get", "list", "watch"}
    write = {"create", "patch", "delete"}
    assert _verbs(one("ClusterRole", "envlane-sync")) == {
        ("", "namespaces", ()): read,
        ("", "pods", ()): read,
        ("", "services", ()): read,
        ("extensions.istio.io", "wasmplugins", ()): {"list", "watch"},
        # The namespaces' plugin and gateway mode's two (envlane-sync names).
        ("extensions.istio.io", "wasmplugins", ("envlane", "envlane-gateway", "envlane-waypoint")): {"get"} | write,
        ("networking.istio.io", "destinationrules", ()): read | write,
        ("networking.istio.io", "envoyfilters", ()): read | write,
        ("networking.istio.io", "virtualservices", ()): read,
        ("events.k8s.io", "events", ()): {"create"},
    }
    lease = one("Role", "envlane-sync-leader-election")
    assert lease["metadata"]["namespace"] == "envlane-system"
    assert _verbs(lease) == {
        ("coordination.k8s.io", "leases", ()): {"create"},
        ("coordination.k8s.io", "leases", ("envlane-sync",)): {"get", "update"},
    }
    policy = one("ValidatingAdmissionPolicy", "envlane-sync-writes")
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConditions"][0]["expression"] == \
        "request.userInfo.username == 'system:serviceaccount:envlane-system:envlane-sync'"
    assert one("ValidatingAdmissionPolicyBinding", "envlane-sync-writes")["spec"] == {
        "policyName": "envlane-sync-writes", "validationActions": ["Deny"]}
    host = one("ClusterRole", "envlane-sync-host-mode")
    assert host["rules"] == [{"apiGroups": [""], "resources": ["services"], "verbs": ["create", "patch", "delete"]}]
    for binding in objects_of("ClusterRoleBinding"):
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "envlane-sync", "namespace": "envlane-system"}]
    assert one("ServiceAccount")["metadata"]["name"] == "envlane-sync"


# ---------------------------------------------------------------- plugin config schema


def envlane_sync(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run([str(gen_manifests.sync_binary()), *args], input=stdin, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_schema_file_is_envlane_sync_schema():
    """The committed schema is the one made from the Rust types, byte for byte."""
    assert SCHEMA.read_text() == envlane_sync("schema")
    schema = plugin_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] and schema["$id"].endswith("/plugin-config.schema.json")
    assert schema["additionalProperties"] is False
    for name, d in schema["$defs"].items():
        if d.get("type") == "object":
            assert d["additionalProperties"] is False, name


def test_settings_files_are_envlane_sync_settings():
    base = (MANIFESTS / "base" / "settings.json").read_text()
    assert base == envlane_sync("settings", "--settings", "-", stdin=json.dumps(gen_manifests.BASE_SETTINGS))
    # Issue 15: the install names its default env (without one, requests
    # without an env reach every env's pods).
    assert json.loads(base)["defaultEnv"] == "dev"
    host = (MANIFESTS / "overlays" / "host-mode" / "settings.json").read_text()
    assert host == envlane_sync("settings", "--settings", "-", stdin=json.dumps(gen_manifests.HOST_MODE_SETTINGS))
    assert json.loads(host) == {**json.loads(base), **gen_manifests.HOST_MODE_SETTINGS}
    # The reference objects carry the install's settings and no table.
    assert one("WasmPlugin", "envlane")["spec"]["pluginConfig"] == json.loads(base)


def test_sync_deployment_flags_exist():
    """Every flag the Deployment passes is one `envlane-sync run` takes; the
    filter settings (env label included) come from the settings file only."""
    (c,) = one("Deployment", "envlane-sync")["spec"]["template"]["spec"]["containers"]
    flags = {a.split("=", 1)[0] for a in c["args"]}
    assert flags <= gen_manifests.sync_flags(), flags - gen_manifests.sync_flags()
    assert "--env-label" not in flags


SHIPPED_CONFIGS = sorted((ROOT / "integration" / "configs").glob("*.json")) + sorted((ROOT / "sync" / "testdata").glob("*.settings.json"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_schema_accepts_shipped_configs(path):
    plugin_validator().validate(json.loads(path.read_text()))


GOOD = [
    {},
    {"mode": "host", "hostTemplate": "{name}-{subset}.{namespace}.svc.{clusterDomain}"},
    {"envAliases": [{"header": "x-lane"}, {"cookie": "lane"}, {"header": "x-b", "cookie": None}]},
    {"defaultEnv": "a.b.c.d.e.f.g.h", "envs": [{"name": "A_b-1.c"}]},
    {"splitter": "-", "envs": [{"name": "dev-proj1"}]},
    {"baggageKey": None, "defaultEnv": None, "revision": None, "envs": [{"name": "dev", "subset": None}]},
    {"services": [{"host": "go.demo.svc.cluster.local", "ports": [1, 65535], "envs": []}]},
    {"debug": True, "edge": True, "debugHeader": "x-why"},
]

BAD = {
    "unknown field": {"envheader": "x"},
    "snake_case": {"env_header": "x"},
    "bad mode": {"mode": "header"},
    "header with space": {"envHeader": "x env"},
    "pseudo header": {"debugHeader": ":authority"},
    "removed routeHeader": {"routeHeader": "x-envlane-cluster"},
    "ports over the limit": {"services": [{"host": "a.b.svc.cluster.local", "ports": list(range(1, 66)), "envs": [0]}]},
    "debug as a string": {"debug": "yes"},
    "letter splitter": {"splitter": "a"},
    "two-char splitter": {"splitter": "::"},
    "env with slash": {"envs": [{"name": "dev/proj"}]},
    "empty level": {"envs": [{"name": "dev..x"}]},
    "nine levels": {"defaultEnv": "a.b.c.d.e.f.g.h.i"},
    "env too long": {"envs": [{"name": "a" * 129}]},
    "subset not DNS": {"envs": [{"name": "dev", "subset": "Dev_1"}]},
    "env entry extra": {"envs": [{"name": "dev", "color": "red"}]},
    "port 0": {"services": [{"host": "a.b.svc.cluster.local", "ports": [0], "envs": [0]}]},
    "port 65536": {"services": [{"host": "a.b.svc.cluster.local", "ports": [65536], "envs": [0]}]},
    "no ports": {"services": [{"host": "a.b.svc.cluster.local", "ports": [], "envs": [0]}]},
    "ports missing": {"services": [{"host": "a.b.svc.cluster.local", "envs": [0]}]},
    "negative env index": {"services": [{"host": "a.b.svc.cluster.local", "ports": [80], "envs": [-1]}]},
    "upper-case host": {"services": [{"host": "Go.demo.svc.cluster.local", "ports": [80], "envs": []}]},
    "alias with both": {"envAliases": [{"header": "x-a", "cookie": "a"}]},
    "alias with none": {"envAliases": [{}]},
    "template without subset": {"hostTemplate": "{name}.{namespace}.svc"},
    "unknown placeholder": {"hostTemplate": "{name}-{subset}.{ns}"},
    "autoInject as string": {"autoInject": "true"},
    "bad cluster domain": {"clusterDomain": "Cluster.Local"},
}


@pytest.mark.parametrize("doc", GOOD, ids=[json.dumps(g)[:40] for g in GOOD])
def test_schema_accepts(doc):
    plugin_validator().validate(doc)


@pytest.mark.parametrize("what", sorted(BAD))
def test_schema_rejects(what):
    assert list(plugin_validator().iter_errors(BAD[what])), what


# ---------------------------------------------------------------- generated == committed


def test_committed_files_match_generation_from_pins():
    """No hand edits: the files are exactly what the script makes from pins.json."""
    pins = gen_manifests.load_pins()
    assert pins, "wasm-plugin-manifests/pins.json is missing"
    files = gen_manifests.render(pins)
    assert gen_manifests.differences(files) == [], "run ./build.sh manifests"
    generated = {(MANIFESTS / rel).resolve() for rel in files}
    for path in MANIFESTS.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.resolve() in generated, f"{path} is not generated by scripts/gen_manifests.py"


def test_filter_pin_matches_dist():
    """The pinned filter image is the one made from dist/envlane.wasm."""
    if not WASM.is_file():
        pytest.skip("dist/envlane.wasm is missing: run ./build.sh")
    pins = gen_manifests.load_pins()
    fresh = gen_manifests.resolve_pins(None, None, None, quiet=True)
    assert fresh["filter"] == pins["filter"], "dist/envlane.wasm changed: run ./build.sh manifests and commit wasm-plugin-manifests/"


def test_sync_pin_matches_dist():
    """The pinned envlane-sync image is the one ./build.sh images built (when built after the last change)."""
    if not gen_manifests.SYNC_INDEX.is_file():
        pytest.skip("dist/oci/envlane-sync is missing: run ./build.sh images (needs sync/)")
    if not gen_manifests.sync_image_is_fresh():
        pytest.skip("dist/oci/envlane-sync is older than its sources: run ./build.sh images")
    pins = gen_manifests.load_pins()
    fresh = gen_manifests.resolve_pins(None, None, None, quiet=True)
    assert fresh["sync"] == pins["sync"], "envlane-sync changed: run ./build.sh images && ./build.sh manifests and commit"


def test_committed_files_match_fresh_generation_from_dist():
    if not WASM.is_file():
        pytest.skip("dist/envlane.wasm is missing: run ./build.sh")
    pins = gen_manifests.resolve_pins(None, None, None, quiet=True)
    stale = gen_manifests.differences(gen_manifests.render(pins))
    assert stale == [], f"stale against dist/: {stale}; run ./build.sh images && ./build.sh manifests and commit"


# ---------------------------------------------------------------- OCI images


def module() -> bytes:
    if not WASM.is_file():
        pytest.skip("dist/envlane.wasm is missing: run ./build.sh")
    return WASM.read_bytes()


def blobs_of(image: oci.Image) -> dict[str, bytes]:
    return {b.digest: b.data for b in image.blobs()}


def istio_extract(manifest: dict, blobs: dict[str, bytes]) -> bytes:
    """What Istio's image fetcher does with an OCI manifest (compat first, then artifact)."""
    layers = manifest["layers"]
    assert layers, "an image needs at least one layer"
    last = layers[-1]
    if last["mediaType"] == oci.OCI_LAYER_GZIP:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blobs[last["digest"]]))) as tar:
            for member in tar:
                if os.path.basename(member.name) == "plugin.wasm":
                    return tar.extractfile(member).read()
        raise AssertionError("plugin.wasm not found in the last layer")
    assert len(layers) == 2, "the Wasm artifact form needs exactly two layers"
    (wasm,) = [layer for layer in layers if layer["mediaType"] == oci.WASM_LAYER]
    return blobs[wasm["digest"]]


@pytest.mark.parametrize("variant", ["compat", "artifact"])
def test_filter_image_is_what_istio_fetches(variant):
    mod = module()
    image = oci.filter_image(mod, variant)
    manifest = json.loads(image.manifest.data)
    assert manifest["mediaType"] == oci.OCI_MANIFEST
    got = istio_extract(manifest, blobs_of(image))
    assert got == mod and got[:4] == b"\0asm"
    if variant == "compat":
        assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
        config = json.loads(image.config.data)
        raw = gzip.decompress(image.layers[-1].data)
        assert config["rootfs"]["diff_ids"] == ["sha256:" + oci.sha256_hex(raw)]
    else:
        assert manifest["config"]["mediaType"] == oci.WASM_CONFIG


def test_filter_image_is_reproducible(tmp_path):
    mod = module()
    a, b = oci.filter_image(mod), oci.filter_image(bytes(mod))
    assert a.digest == b.digest
    a.write(tmp_path / "a", tmp_path / "a.tar")
    b.write(tmp_path / "b", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert oci.filter_image(mod + b"\0").digest != a.digest


def check_layout(layout: Path) -> str:
    """Checks every blob and what each manifest names, following an image
    index to its per-platform manifests; returns the top digest."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert oci.sha256_hex(blob.read_bytes()) == blob.name, f"corrupt blob {blob}"

    def blob(d: dict) -> bytes:
        data = (layout / "blobs" / "sha256" / d["digest"].split(":")[1]).read_bytes()
        assert len(data) == d["size"], d
        return data

    def check(d: dict) -> None:
        manifest = json.loads(blob(d))
        if "manifests" in manifest:  # an image index: one manifest per platform
            for child in manifest["manifests"]:
                check(child)
            return
        for part in [manifest["config"], *manifest["layers"]]:
            blob(part)

    check(desc)
    return desc["digest"]


def platforms(layout: Path) -> set[str]:
    """`os/arch` of each manifest under the layout's image index."""
    (desc,) = json.loads((layout / "index.json").read_text())["manifests"]
    top = json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes())
    return {f"{m['platform']['os']}/{m['platform']['architecture']}" for m in top.get("manifests", [])}


def test_built_filter_layout_matches_the_pin():
    layout = ROOT / "dist" / "oci" / "envlane-filter"
    if not layout.is_dir():
        pytest.skip("dist/oci/envlane-filter is missing: run ./build.sh images")
    digest = check_layout(layout)
    if digest != oci.filter_image(module()).digest:
        pytest.skip("dist/oci/envlane-filter is older than dist/envlane.wasm: run ./build.sh images")
    with tarfile.open(ROOT / "dist" / "envlane-filter.oci.tar") as tar:
        names = set(tar.getnames())
    assert {"oci-layout", "index.json", "manifest.json", "blobs/sha256/" + digest.split(":")[1]} <= names


def test_built_sync_layout():
    layout = ROOT / "dist" / "oci" / "envlane-sync"
    if not layout.is_dir():
        pytest.skip("dist/oci/envlane-sync is missing: run ./build.sh images (needs sync/)")
    check_layout(layout)
    # Issue 15: one index over both platforms; the Deployment pins no arch.
    assert platforms(layout) == {"linux/amd64", "linux/arm64"}
    node = one("Deployment", "envlane-sync")["spec"]["template"]["spec"].get("nodeSelector", {})
    assert "kubernetes.io/arch" not in node, node


def fake_elf(interp: bool) -> bytes:
    """A minimal x86-64 ELF header with one program header (PT_INTERP or PT_LOAD)."""
    import struct

    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, 62)  # EM_X86_64
    struct.pack_into("<Q", header, 32, 64)  # e_phoff
    struct.pack_into("<HH", header, 54, 56, 1)  # e_phentsize, e_phnum
    ph = bytearray(56)
    struct.pack_into("<I", ph, 0, 3 if interp else 1)
    return bytes(header + ph)


def test_sync_image_is_scratch_nonroot_static():
    image = oci.sync_image(fake_elf(interp=False), version="0.0.0")
    config = json.loads(image.config.data)
    assert config["config"]["User"] == "65532:65532"
    assert config["config"]["Entrypoint"] == ["/envlane-sync"]
    assert "Cmd" not in config["config"]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    (layer,) = image.layers
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.data))) as tar:
        members = {m.name: m for m in tar}
    assert sorted(members) == ["envlane-sync", "etc", "etc/group", "etc/passwd"], "no shell, nothing else"
    assert members["envlane-sync"].mode == 0o755
    assert all(m.uid == 0 and m.mtime == 0 for m in members.values())
    with pytest.raises(SystemExit):
        oci.sync_image(fake_elf(interp=True))
    with pytest.raises(SystemExit):
        oci.sync_image(b"#!/bin/sh\n")
