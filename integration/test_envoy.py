"""The filter in real Envoy 1.40 (V8), each pod with its own sidecar.

Scenarios: alibaba/virtual-environment's e2e (cluster and host mode), the
swimlane demo over h2c with the lane in baggage, table pushes (fallback when
an env goes away), and hostile input.
"""

import copy
import re

import pytest

from harness import Mesh, ROUTE_HEADER, fqdn, wait_for
from topologies import ALIBABA, ALIBABA_CASES, SWIMLANE, SWIMLANE_CASES, load_config


def answer(mesh: Mesh, env: str | None, host: str = "node:8080", **extra: str) -> str:
    headers = dict(extra)
    if env is not None:
        headers["x-virtual-env"] = env
    status, _, body = mesh.call(host, headers)
    assert status == 200, body
    return body.strip()


@pytest.fixture(scope="module", params=["cluster", "host"])
def alibaba(request):
    config = load_config("alibaba")
    config["mode"] = request.param
    config["debug"] = True
    with Mesh(ALIBABA, config, mode=request.param) as mesh:
        yield mesh


@pytest.mark.parametrize("env", list(ALIBABA_CASES), ids=lambda e: e or "no-header")
def test_alibaba_e2e(alibaba, env):
    assert answer(alibaba, env) == ALIBABA_CASES[env]


def counter_deltas(envoy, before: dict[str, int]) -> dict[str, int]:
    """The decision and invalid-env counters' growth since `before`, by last name part."""
    after = envoy.stats("wasmcustom.envlane")
    return {k.rsplit(".", 1)[-1]: after[k] - before.get(k, 0) for k in after
            if ".decision." in k or k.endswith(".env.invalid")}


def test_counters_count_each_outcome(alibaba):
    before = alibaba.client.stats("wasmcustom.envlane")
    answer(alibaba, "dev.proj1")  # node: exact
    answer(alibaba, "dev.proj1.user9")  # node: fallback
    answer(alibaba, None)  # node: default
    status, _, _ = alibaba.call("unknown.example:8080", {"x-virtual-env": "dev"})  # passthrough
    assert status == 404
    want = {"exact": 1, "fallback": 1, "default": 1, "passthrough": 1, "invalid": 0}
    assert counter_deltas(alibaba.client, before) == want


def test_debug_header_explains_the_decision(alibaba):
    status, headers, _ = alibaba.call("node:8080", {"x-virtual-env": "dev.proj1.user9", "x-envlane-debug": "1"})
    assert status == 200
    why = headers["x-envlane-decision"]
    assert why.startswith("env=dev.proj1.user9; source=header; service=node.demo.svc.cluster.local; "
                          "tried=dev.proj1.user9,dev.proj1; outcome=fallback; target=")
    _, headers, _ = alibaba.call("node:8080", {"x-virtual-env": "dev"})
    assert "x-envlane-decision" not in headers


def test_every_name_of_a_service_routes(alibaba):
    want = "[springboot @ dev.proj1.feature1] <-dev.proj1.feature1"
    for host in ["java:8080", "java.demo:8080", "java.demo.svc:8080", f"{fqdn('java')}:8080"]:
        assert answer(alibaba, "dev.proj1.feature1", host=host) == want, host


@pytest.fixture(scope="module")
def swimlane():
    with Mesh(SWIMLANE, load_config("swimlane")) as mesh:
        yield mesh


@pytest.mark.parametrize("lane", list(SWIMLANE_CASES), ids=lambda lane: lane or "no-lane")
def test_swimlane_over_h2c_with_baggage(swimlane, lane):
    goods, pricing = SWIMLANE_CASES[lane]
    headers = {"baggage": f"userid=7, lane={lane};ttl=60"} if lane else {}
    status, body = swimlane.call_h2("goods:8080", headers)
    assert status == 200, body
    got = re.findall(r"\[(\w+) @ ([\w-]+)\]", body)
    assert got == [("pricing", pricing), ("goods", goods)], body


def test_swimlane_percent_encoded_and_split_baggage(swimlane):
    status, body = swimlane.call_h2("goods:8080", {"baggage": "a=1", "Baggage": "lane = dev%2Dfeature1"})
    assert status == 200
    assert re.findall(r"\[(\w+) @ ([\w-]+)\]", body) == [("pricing", "dev-feature1"), ("goods", "dev-feature1")], body


@pytest.fixture()
def fresh_alibaba():
    """A mesh this test may push new tables to."""
    with Mesh(ALIBABA, load_config("alibaba")) as mesh:
        yield mesh


def push_and_wait(mesh: Mesh, config) -> None:
    before = mesh.config_events()
    mesh.push(config)
    mesh.wait_config(before)


def test_env_going_away_falls_back_instead_of_failing(fresh_alibaba):
    mesh = fresh_alibaba
    assert answer(mesh, "dev.proj1") == ALIBABA_CASES["dev.proj1"]
    config = load_config("alibaba")
    node = next(s for s in config["services"] if s["host"].startswith("node."))
    node["envs"] = [0]  # the last Ready dev.proj1 node pod went away
    push_and_wait(mesh, config)
    assert answer(mesh, "dev.proj1") == "[springboot @ dev.proj1] <-dev.proj1, [go @ dev] <-dev.proj1, [node @ dev] <-dev.proj1"


def test_bad_config_is_refused_with_the_field_named_and_old_table_kept(fresh_alibaba):
    mesh = fresh_alibaba
    bad = copy.deepcopy(load_config("alibaba"))
    bad["services"][1]["envs"] = [0, 9]
    push_and_wait(mesh, bad)
    for name, envoy in mesh.sidecars.items():
        assert envoy.process.alive(), name
        stats = envoy.stats("extension_config_discovery.http_filter.envlane")
        assert stats["extension_config_discovery.http_filter.envlane.config_fail"] >= 1, (name, stats)
    wait_for(lambda: "field `services[1].envs[1]`" in mesh.client.process.log(), "log line naming the field", 5)
    log = mesh.client.process.log()
    line = next(line for line in log.splitlines() if "invalid envlane config" in line)
    assert "9 is not an index into envs" in line
    # Still routing with the previous table.
    assert answer(mesh, "dev.proj1") == ALIBABA_CASES["dev.proj1"]
    # Malformed JSON is refused the same way (unknown fields are ignored: test_safety).
    for text, field in [("{not json", "(document)")]:
        push_and_wait(mesh, text)
        wait_for(lambda: f"field `{field}`" in mesh.client.process.log(), f"log line naming {field}", 5)
    assert answer(mesh, "dev.proj2") == ALIBABA_CASES["dev.proj2"]
    assert "panicked" not in mesh.client.process.log()


def test_spoofed_routing_header_is_ignored(fresh_alibaba):
    mesh = fresh_alibaba
    spoof = f"outbound|8080|dev-proj1-feature1|{fqdn('java')}"
    # To a known service: routed by env, never by the spoofed value.
    assert answer(mesh, "dev", host="java:8080", **{ROUTE_HEADER: spoof}) == "[springboot @ dev] <-dev"
    # To an unknown host: the spoof is removed, so the catch-all answers.
    status, _, body = mesh.call("evil.example:8080", {ROUTE_HEADER: spoof, "x-virtual-env": "dev"})
    assert (status, body.strip()) == (404, "passthrough")


@pytest.mark.parametrize(
    "value",
    ["dev..proj1", "dev proj1", "dev/proj1", ".dev", "dev.", "a" * 129, ".".join("abcdefghi"), "dév".encode(),
     b"dev\xff.proj1"],
    ids=["empty-level", "space", "slash", "leading-dot", "trailing-dot", "too-long", "nine-levels", "non-ascii",
         "not-utf8"],
)
def test_invalid_env_is_no_env_and_counted(fresh_alibaba, value):
    mesh = fresh_alibaba
    before = mesh.client.stats("wasmcustom.envlane")
    # The client pod has no label: no env at all -> default everywhere.
    # The bad header is not overwritten, so each hop refuses it again and
    # falls back to its own pod label.
    raw = value if isinstance(value, bytes) else value.encode()
    status, _, body = mesh.call("node:8080", {"x-virtual-env": raw.decode("latin-1")})  # bytes as sent
    assert status == 200, body
    assert re.findall(r"\[(\w+) @ ([\w.]+)\]", body) == [("springboot", "dev"), ("go", "dev"), ("node", "dev")], body
    want = {"exact": 0, "fallback": 0, "default": 1, "passthrough": 0, "invalid": 1}
    assert counter_deltas(mesh.client, before) == want
    assert "panicked" not in mesh.client.process.log()


def test_labelled_client_injects_its_env_and_keeps_a_sent_header():
    topo = copy.deepcopy(ALIBABA)
    topo.client_label = "dev.proj1.feature1"
    with Mesh(topo, load_config("alibaba")) as mesh:
        assert answer(mesh, None) == ALIBABA_CASES["dev.proj1.feature1"]
        assert answer(mesh, "dev.proj2") == ALIBABA_CASES["dev.proj2"]


def test_no_processes_left_behind():
    mesh = Mesh(ALIBABA, load_config("alibaba")).start()
    procs = [p.process.proc for p in list(mesh.sidecars.values()) + list(mesh.apps.values())]
    mesh.close()
    assert all(p.poll() is not None for p in procs)
    assert not mesh.workdir.exists()



def test_cookie_alias_and_auto_inject_carry_the_env_on(fresh_alibaba):
    """An OAuth callback can't carry a custom header: the env comes from a
    cookie. The apps don't forward cookies, so the next hops get the env
    from the first pod's own label, injected by its sidecar."""
    mesh = fresh_alibaba
    config = load_config("alibaba")
    config["envAliases"] = [{"header": "x-lane"}, {"cookie": "VirtualEnv"}]
    config["debug"] = True
    push_and_wait(mesh, config)
    assert answer(mesh, None, cookie="theme=dark; VirtualEnv=dev.proj1") == (
        "[springboot @ dev.proj1] <-dev.proj1, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-empty"
    )
    assert answer(mesh, None, **{"x-lane": "dev.proj2"}) == (
        "[springboot @ dev] <-dev, [go @ dev] <-dev, [node @ dev] <-empty"
    )
    status, headers, _ = mesh.call("node:8080", {"cookie": "VirtualEnv=dev.proj1.feature1", "x-envlane-debug": "1"})
    assert status == 200
    assert headers["x-envlane-decision"].startswith("env=dev.proj1.feature1; source=alias;")
