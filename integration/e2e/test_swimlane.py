"""The swimlane demo (goods -> pricing, lane in baggage, h2c) routed by real
Envoy sidecars configured by the real istiod, with envlane-sync's settings
changed the documented way (the settings file of the install)."""

import pytest

from conftest import shipped_settings
from topologies import SWIMLANE, SWIMLANE_CASES

NS = "swimlane"


@pytest.fixture(scope="module")
def mesh(start_sync, deploy):
    start_sync({**shipped_settings(), "defaultEnv": SWIMLANE.default_env, "baggageKey": "lane"}, "sync-swimlane")
    m = deploy(NS, SWIMLANE)
    m.wait_table()
    return m


def landed(mesh, lane):
    status, body = mesh.call_h2("goods", {"baggage": f"lane={lane}"} if lane else {})
    assert status == 200, body
    envs = [part.split(" @ ")[1].split("]")[0] for part in body.split("[")[1:]]
    names = [part.split(" @ ")[0] for part in body.split("[")[1:]]
    assert names == ["pricing", "goods"], body
    return envs[1], envs[0]


@pytest.mark.parametrize("lane", list(SWIMLANE_CASES), ids=lambda x: x or "no-baggage")
def test_swimlane_cases(mesh, lane):
    assert landed(mesh, lane) == SWIMLANE_CASES[lane]
