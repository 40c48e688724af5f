"""Sidecar-less gateway mode in real Envoy 1.40 (V8): ONE gateway Envoy carries
every hop (integration/gateway.py), the filter runs with `"proxy": "gateway"`
and finds a request's env in the request, else in the caller table by the
TCP peer address.

Scenarios: alibaba's e2e and the swimlane demo with no sidecar at all (the
same answers as test_envoy.py), callers without any header whose env comes
from the caller table (with apps that forward the env, and with apps that
forward nothing, so every hop decides from the calling pod's own env), a
request's own header beats the table, unknown callers get the default env,
spoofed X-Forwarded-For and routing headers change nothing, the debug header
says `source=caller`, a push relabels a caller, and there is exactly one
Envoy.
"""

from __future__ import annotations

import copy
import re

import pytest

from gateway import CLIENT, STRANGER, GatewayMesh, envoy_processes_under
from harness import ROUTE_HEADER, fqdn
from topologies import ALIBABA, ALIBABA_CASES, SWIMLANE, SWIMLANE_CASES, load_config

# Test callers (not app pods) and their env labels: each gets its own
# loopback IP in the gateway's caller table.
ALIBABA_CALLERS = {"proj1": "dev.proj1", "feature1": "dev.proj1.feature1", "proj2": "dev.proj2"}


def answer(mesh: GatewayMesh, env: str | None, host: str = "node:8080", caller: str | None = CLIENT, **extra: str) -> str:
    headers = dict(extra)
    if env is not None:
        headers["x-virtual-env"] = env
    status, _, body = mesh.call(host, headers, caller=caller)
    assert status == 200, body
    return body.strip()


def alibaba_config() -> dict:
    config = load_config("alibaba")
    config["debug"] = True
    return config


@pytest.fixture(scope="module")
def alibaba():
    with GatewayMesh(ALIBABA, alibaba_config(), callers=ALIBABA_CALLERS) as mesh:
        yield mesh


def test_the_gateway_is_the_only_proxy(alibaba):
    assert alibaba.envoys == [alibaba.gateway]
    # What the OS runs, not what the harness believes it started.
    assert envoy_processes_under(alibaba.workdir) == [alibaba.gateway.process.proc.pid]
    # Every hop of a request (client -> node -> go -> java) is decided in
    # the gateway: its decision counters grow by one per hop.
    before = decisions(alibaba)
    assert answer(alibaba, "dev.proj1") == ALIBABA_CASES["dev.proj1"]
    assert decisions(alibaba) - before == 3


def decisions(mesh: GatewayMesh) -> int:
    stats = mesh.gateway.stats("wasmcustom.envlane.decision")
    return sum(v for k, v in stats.items() if k.rsplit(".", 1)[-1] in ("exact", "fallback", "default", "passthrough"))


def test_gateway_plugin_config_has_proxy_and_every_labelled_caller(alibaba):
    config = alibaba.gateway_config()
    assert config["proxy"] == "gateway"
    envs = [e["name"] for e in config["envs"]]
    listed = {ip: envs[entry["env"]] for entry in config["callers"] for ip in entry["ips"]}
    want = {pod.ip: pod.env for pod in alibaba.pods.values() if pod.env}
    assert listed == want
    # Every pod has its own IP; the unlabelled client and the stranger are in no table.
    assert len({pod.ip for pod in alibaba.pods.values()}) == len(alibaba.pods)
    assert alibaba.pods[CLIENT].ip not in listed and alibaba.pods[STRANGER].ip not in listed


@pytest.mark.parametrize("env", list(ALIBABA_CASES), ids=lambda e: e or "no-header")
def test_alibaba_e2e_through_one_gateway(alibaba, env):
    """The unlabelled client: the same answers as each pod with a sidecar."""
    assert answer(alibaba, env) == ALIBABA_CASES[env]


# A caller without any header: its env comes from the caller table, the
# gateway injects it and the apps forward it, so the whole chain is routed
# as if the caller had sent that header.
@pytest.mark.parametrize("caller", list(ALIBABA_CALLERS))
def test_caller_without_header_gets_its_env_from_the_caller_table(alibaba, caller):
    assert answer(alibaba, None, caller=caller) == ALIBABA_CASES[ALIBABA_CALLERS[caller]]


@pytest.mark.parametrize("caller,env", [("proj1", "dev.proj2"), ("proj2", "dev.proj1.feature1"), ("feature1", "dev")])
def test_request_header_beats_the_caller_table(alibaba, caller, env):
    assert answer(alibaba, env, caller=caller) == ALIBABA_CASES[env]


@pytest.mark.parametrize("caller", [STRANGER, None], ids=["ip-not-in-table", "127.0.0.1"])
def test_unknown_caller_gets_the_default_env(alibaba, caller):
    assert answer(alibaba, None, caller=caller) == ALIBABA_CASES[None]


def test_every_name_of_a_service_routes_by_caller(alibaba):
    want = "[springboot @ dev.proj1.feature1] <-dev.proj1.feature1"
    for host in ["java:8080", "java.demo:8080", "java.demo.svc:8080", f"{fqdn('java')}:8080"]:
        assert answer(alibaba, None, host=host, caller="feature1") == want, host


def test_debug_header_says_source_caller(alibaba):
    status, headers, _ = alibaba.call("node:8080", {"x-envlane-debug": "1"}, caller="proj1")
    assert status == 200
    why = headers["x-envlane-decision"]
    assert why.startswith("env=dev.proj1; source=caller; service=node.demo.svc.cluster.local; "), why
    assert "outcome=exact; target=outbound|8080|dev-proj1|node.demo.svc.cluster.local" in why, why
    # A header the request carries is still `source=header`, whoever sends it.
    _, headers, _ = alibaba.call("node:8080", {"x-envlane-debug": "1", "x-virtual-env": "dev.proj1.user9"}, caller="proj2")
    assert headers["x-envlane-decision"].startswith("env=dev.proj1.user9; source=header; "), headers


def test_spoofed_forwarded_for_does_not_pick_the_caller(alibaba):
    """The caller is the TCP peer. A client naming a labelled pod in
    X-Forwarded-For stays an unknown caller (default env). This holds because
    the gateway's HTTP connection manager sets use_remote_address: with
    Envoy's default (false), `source.address` is the last X-Forwarded-For
    entry and this spoof picks the caller (checked by hand with the filter
    of the "Gateway mode:" commit)."""
    spoof = alibaba.pods["feature1"].ip
    for xff in [spoof, f"10.1.2.3, {spoof}"]:
        assert answer(alibaba, None, caller=STRANGER, **{"x-forwarded-for": xff}) == ALIBABA_CASES[None], xff
    # And a labelled caller's own env is not replaced by the one it names.
    assert answer(alibaba, None, caller="proj2", **{"x-forwarded-for": spoof}) == ALIBABA_CASES["dev.proj2"]


def test_spoofed_routing_header_is_ignored(alibaba):
    spoof = f"outbound|8080|dev-proj1-feature1|{fqdn('java')}"
    # To a known service: routed by the caller's env, never by the spoofed value.
    assert answer(alibaba, None, host="java:8080", caller="proj1", **{ROUTE_HEADER: spoof}) == (
        "[springboot @ dev.proj1] <-dev.proj1")
    assert answer(alibaba, None, host="java:8080", caller=STRANGER, **{ROUTE_HEADER: spoof}) == (
        "[springboot @ dev] <-empty")
    # To an unknown host: the catch-all answers.
    status, _, body = alibaba.call("evil.example:8080", {ROUTE_HEADER: spoof}, caller="proj1")
    assert (status, body.strip()) == (404, "passthrough")


# Apps that forward nothing: no hop after the first sees the client's
# header, so at every hop the gateway decides from the calling pod's own
# env (what each pod's sidecar would do with its label) and injects it.
# (caller, env header, host) -> answer (innermost call first)
SILENT_CASES = {
    (CLIENT, "dev.proj1", "node:8080"): "[springboot @ dev] <-dev, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-dev.proj1",
    (CLIENT, "dev.proj1.feature1", "node:8080"):
        "[springboot @ dev] <-dev, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-dev.proj1.feature1",
    (CLIENT, "dev.proj2", "node:8080"): "[springboot @ dev] <-dev, [go @ dev] <-dev, [node @ dev] <-dev.proj2",
    (CLIENT, None, "node:8080"): "[springboot @ dev] <-dev, [go @ dev] <-dev, [node @ dev] <-empty",
    ("proj1", None, "node:8080"): "[springboot @ dev] <-dev, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-dev.proj1",
    ("feature1", None, "node:8080"):
        "[springboot @ dev] <-dev, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-dev.proj1.feature1",
    ("proj2", None, "go:8080"): "[springboot @ dev] <-dev.proj2, [go @ dev.proj2] <-dev.proj2",
    ("proj1", "dev.proj2", "go:8080"): "[springboot @ dev] <-dev.proj2, [go @ dev.proj2] <-dev.proj2",
    ("feature1", None, "java:8080"): "[springboot @ dev.proj1.feature1] <-dev.proj1.feature1",
}


@pytest.fixture(scope="module")
def silent_alibaba():
    with GatewayMesh(ALIBABA, alibaba_config(), callers=ALIBABA_CALLERS, propagate=False) as mesh:
        yield mesh


@pytest.mark.parametrize("case", list(SILENT_CASES), ids=lambda c: f"{c[0]}-{c[1] or 'no-header'}-{c[2].split(':')[0]}")
def test_apps_forwarding_nothing_each_hop_uses_the_calling_pods_env(silent_alibaba, case):
    caller, env, host = case
    assert answer(silent_alibaba, env, host=host, caller=caller) == SILENT_CASES[case]


def test_a_push_relabels_a_caller():
    """A pod's env label changes (or the pod is replaced at the same IP): the
    next table the gateway gets routes its calls by the new env."""
    with GatewayMesh(ALIBABA, alibaba_config(), callers={"mover": "dev.proj1"}) as mesh:
        assert answer(mesh, None, caller="mover") == ALIBABA_CASES["dev.proj1"]
        mesh.relabel("mover", "dev.proj2")
        mesh.push_and_wait(alibaba_config())
        assert answer(mesh, None, caller="mover") == ALIBABA_CASES["dev.proj2"]
        mesh.relabel("mover", None)  # unlabelled: out of the table, default env
        mesh.push_and_wait(alibaba_config())
        assert answer(mesh, None, caller="mover") == ALIBABA_CASES[None]


def test_the_gateways_own_env_label_is_never_used():
    """Misconfigured: the gateway's node carries an env label. A shared proxy
    has no env of its own, so unknown callers still get the default env."""
    with GatewayMesh(ALIBABA, alibaba_config(),
                     gateway_labels={"app": "envlane-gateway", "virtual-env": "dev.proj1.feature1"}) as mesh:
        assert answer(mesh, None, caller=STRANGER) == ALIBABA_CASES[None]
        assert answer(mesh, "dev.proj2", caller=STRANGER) == ALIBABA_CASES["dev.proj2"]


def test_labelled_client_pod_is_a_caller():
    """topology.client_label, as for a sidecar's client pod: the client's IP
    is in the caller table with that env."""
    topo = copy.deepcopy(ALIBABA)
    topo.client_label = "dev.proj1.feature1"
    with GatewayMesh(topo, alibaba_config()) as mesh:
        assert answer(mesh, None) == ALIBABA_CASES["dev.proj1.feature1"]
        assert answer(mesh, "dev.proj2") == ALIBABA_CASES["dev.proj2"]


# The swimlane demo over h2c, lane in baggage, no sidecar.
SWIMLANE_CALLERS = {"feature1": "dev-feature1", "feature2": "dev-feature2"}


@pytest.fixture(scope="module")
def swimlane():
    with GatewayMesh(SWIMLANE, load_config("swimlane"), callers=SWIMLANE_CALLERS) as mesh:
        yield mesh


def lanes(body: str) -> list[tuple[str, str]]:
    return re.findall(r"\[(\w+) @ ([\w-]+)\]", body)


@pytest.mark.parametrize("lane", list(SWIMLANE_CASES), ids=lambda lane: lane or "no-lane")
def test_swimlane_over_h2c_with_baggage(swimlane, lane):
    goods, pricing = SWIMLANE_CASES[lane]
    headers = {"baggage": f"userid=7, lane={lane};ttl=60"} if lane else {}
    status, body = swimlane.call_h2("goods:8080", headers)
    assert status == 200, body
    assert lanes(body) == [("pricing", pricing), ("goods", goods)], body


@pytest.mark.parametrize("caller", list(SWIMLANE_CALLERS))
def test_swimlane_caller_without_baggage_gets_its_lane(swimlane, caller):
    """No baggage: the caller's lane from the table, injected as the env
    header, which the goods app forwards to pricing's hop."""
    lane = SWIMLANE_CALLERS[caller]
    goods, pricing = SWIMLANE_CASES[lane]
    status, body = swimlane.call_h2("goods:8080", caller=caller)
    assert status == 200, body
    assert lanes(body) == [("pricing", pricing), ("goods", goods)], body
    # Baggage the request carries beats the caller's lane.
    status, body = swimlane.call_h2("goods:8080", {"baggage": "lane=main"}, caller=caller)
    assert lanes(body) == [("pricing", "main"), ("goods", "main")], body


def test_no_processes_left_behind():
    mesh = GatewayMesh(ALIBABA, alibaba_config(), callers=ALIBABA_CALLERS).start()
    procs = [p.process.proc for p in mesh.envoys + list(mesh.apps.values())]
    assert len(procs) == 1 + sum(len(s.envs) for s in ALIBABA.services)
    mesh.close()
    assert all(p.poll() is not None for p in procs)
    assert not mesh.workdir.exists()
    assert envoy_processes_under(mesh.workdir) == []
