"""The topologies the tests and the demo run, with their hand-written tables."""

import json
from pathlib import Path

from harness import Service, Topology

CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


# alibaba/virtual-environment's own e2e: node -> go -> java (the java app is "springboot").
ALIBABA = Topology(
    services=[
        Service("node", "node", ["dev", "dev.proj1"], next="go"),
        Service("go", "go", ["dev", "dev.proj2"], next="java"),
        Service("java", "springboot", ["dev", "dev.proj1", "dev.proj1.feature1"]),
    ],
    default_env="dev",
)

# env header -> expected answer (innermost call first); None = no header.
ALIBABA_CASES = {
    "dev.proj1": "[springboot @ dev.proj1] <-dev.proj1, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-dev.proj1",
    "dev.proj1.feature1": "[springboot @ dev.proj1.feature1] <-dev.proj1.feature1, [go @ dev] <-dev.proj1.feature1, "
    "[node @ dev.proj1] <-dev.proj1.feature1",
    "dev.proj2": "[springboot @ dev] <-dev.proj2, [go @ dev.proj2] <-dev.proj2, [node @ dev] <-dev.proj2",
    "dev": "[springboot @ dev] <-dev, [go @ dev] <-dev, [node @ dev] <-dev",
    None: "[springboot @ dev] <-dev, [go @ dev] <-dev, [node @ dev] <-empty",
    "dev.proj1.user9": "[springboot @ dev.proj1] <-dev.proj1.user9, [go @ dev] <-dev.proj1.user9, [node @ dev.proj1] <-dev.proj1.user9",
}

# blue86321/swimlane-k8s-istio-otel-demo: gateway -> goods -> pricing, lane only in baggage, over h2c.
SWIMLANE = Topology(
    services=[
        Service("goods", "goods", ["main", "dev-feature1", "dev-feature2"], next="pricing"),
        Service("pricing", "pricing", ["main", "dev-feature1"]),
    ],
    default_env="main",
    h2=True,
    show="baggage",
)

# lane in baggage -> (goods env, pricing env)
SWIMLANE_CASES = {
    "main": ("main", "main"),
    None: ("main", "main"),
    "dev-feature1": ("dev-feature1", "dev-feature1"),
    "dev-feature2": ("dev-feature2", "main"),
    "not_exist": ("main", "main"),
}
