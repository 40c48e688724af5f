"""envlane-sync's `render` output, fed to real Envoy, routes like the hand-written tables.

The render reads `kubectl get ns,pods,svc -o yaml` fixtures of the two
topologies; its WasmPlugin pluginConfig becomes the sidecars' table, and its
DestinationRules must define exactly the subsets (names and pod labels) that
the table's targets use, since Istio builds the `outbound|PORT|SUBSET|FQDN`
clusters from them.
"""

import copy
import json
import subprocess

import pytest
import yaml

from harness import ROOT, Mesh, fqdn
from topologies import ALIBABA, ALIBABA_CASES, SWIMLANE, SWIMLANE_CASES

SYNC = ROOT / "target" / "release" / "envlane-sync"
TESTDATA = ROOT / "sync" / "testdata"


def render(name: str, settings=None) -> list[dict]:
    settings = settings or TESTDATA / f"{name}.settings.json"
    out = subprocess.run(
        [str(SYNC), "render", "-f", str(TESTDATA / f"{name}.yaml"), "--settings", str(settings)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def plugin_config(docs: list[dict]) -> dict:
    (wasm,) = [d for d in docs if d["kind"] == "WasmPlugin" and d["metadata"]["namespace"] == "demo"]
    return wasm["spec"]["pluginConfig"]


def check_destination_rules(docs: list[dict], config: dict, topology) -> None:
    subsets = {e["name"]: e["subset"] for e in config["envs"]}
    rules = {d["spec"]["host"]: d for d in docs if d["kind"] == "DestinationRule"}
    for svc in topology.services:
        rule = rules[fqdn(svc.name)]
        got = {s["name"]: s["labels"] for s in rule["spec"]["subsets"]}
        assert got == {subsets[env]: {"virtual-env": env} for env in svc.envs}, svc.name


@pytest.fixture(scope="module")
def alibaba_rendered():
    docs = render("alibaba")
    config = plugin_config(docs)
    check_destination_rules(docs, config, ALIBABA)
    with Mesh(ALIBABA, config) as mesh:
        yield mesh


@pytest.mark.parametrize("env", list(ALIBABA_CASES), ids=lambda e: e or "no-header")
def test_rendered_alibaba_table_routes_like_the_hand_written_one(alibaba_rendered, env):
    headers = {"x-virtual-env": env} if env else {}
    status, _, body = alibaba_rendered.call("node:8080", headers)
    assert (status, body.strip()) == (200, ALIBABA_CASES[env])


def test_rendered_swimlane_table_routes_over_h2c():
    docs = render("swimlane")
    config = plugin_config(docs)
    check_destination_rules(docs, config, SWIMLANE)
    with Mesh(SWIMLANE, config) as mesh:
        for lane, (goods, pricing) in SWIMLANE_CASES.items():
            headers = {"baggage": f"lane={lane}"} if lane else {}
            status, body = mesh.call_h2("goods:8080", headers)
            assert status == 200, body
            assert f"[goods @ {goods}]" in body and f"[pricing @ {pricing}]" in body, (lane, body)


def test_rendered_host_mode_table_routes(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**json.loads((TESTDATA / "alibaba.settings.json").read_text()), "mode": "host"}))
    docs = render("alibaba", settings)
    config = plugin_config(docs)
    assert config["mode"] == "host"
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    subsets = {e["name"]: e["subset"] for e in config["envs"]}
    assert f"node-{subsets['dev.proj1']}" in services
    with Mesh(copy.deepcopy(ALIBABA), config, mode="host") as mesh:
        for env in ["dev.proj1.feature1", "dev.proj2", None]:
            status, _, body = mesh.call("node:8080", {"x-virtual-env": env} if env else {})
            assert (status, body.strip()) == (200, ALIBABA_CASES[env])
