"""Data-plane safety in real Envoy 1.40: no client picks a cluster, with the
filter loaded, absent or skipped; a bad config never fails a request; the
edge strips what outsiders must not set."""

import copy
import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import (ROOT, Envoy, Mesh, ROUTE_HEADER, ecds_resource, fqdn, free_port, http_get, sidecar_bootstrap,
                     static_cluster, wait_for, wasm_filter_ecds, write_atomically)
from test_envoy import answer, push_and_wait
from topologies import ALIBABA, ALIBABA_CASES, load_config

SPOOF = f"outbound|8080|dev-proj1-feature1|{fqdn('java')}"
FEATURE = "[springboot @ dev.proj1.feature1]"


@pytest.mark.parametrize("filter_", ["wasm", "absent", "skipped"])
def test_a_client_header_never_selects_a_cluster(filter_):
    with Mesh(ALIBABA, load_config("alibaba"), filter=filter_) as mesh:
        # Any authority: the catch-all answers, not the spoofed cluster.
        for host in ["evil.example:8080", "java:8080", "java.demo.svc.cluster.local:8080"]:
            for name in [ROUTE_HEADER, ROUTE_HEADER.upper()]:
                status, _, body = mesh.call(host, {name: SPOOF})
                assert FEATURE not in body, (filter_, host, body)
                if host.startswith("evil"):
                    assert (status, body.strip()) == (404, "passthrough"), filter_
        # Where the filter runs, the env still routes as it should.
        if filter_ == "wasm":
            assert answer(mesh, "dev.proj1.feature1", host="java:8080", **{ROUTE_HEADER: "x"}) == f"{FEATURE} <-dev.proj1.feature1"


def bad_table() -> dict:
    bad = copy.deepcopy(load_config("alibaba"))
    bad["services"][1]["envs"] = [0, 9]  # not an index into envs
    return bad


def test_a_bad_first_config_passes_through():
    # The route EnvoyFilters of an earlier good table are in place.
    with Mesh(ALIBABA, bad_table(), route_table=load_config("alibaba")) as mesh:
        for env in ["dev.proj1", None]:
            status, _, body = mesh.call("node:8080", {"x-virtual-env": env} if env else {})
            assert status == 200, body
            assert "@ dev]" in body and "proj" not in body.split("<-")[0], body
        assert mesh.client.stats("wasmcustom.envlane.config.invalid")["wasmcustom.envlane.config.invalid"] >= 1
        wait_for(lambda: "pass-through" in mesh.client.process.log(), "pass-through logged", 5)
        # The first good table then routes.
        push_and_wait(mesh, load_config("alibaba"))
        assert answer(mesh, "dev.proj1") == ALIBABA_CASES["dev.proj1"]


def test_a_bad_update_keeps_the_last_good_table_and_unknown_fields_are_ignored():
    with Mesh(ALIBABA, load_config("alibaba")) as mesh:
        oversized = copy.deepcopy(load_config("alibaba"))
        oversized["services"][0]["ports"] = [8080] * 8000
        oversized["services"][0]["envs"] = [0] * 8000
        for bad in [bad_table(), "{not json", oversized]:
            before = mesh.client.stats("extension_config_discovery.http_filter.envlane.config_fail")
            push_and_wait(mesh, bad)
            after = mesh.client.stats("extension_config_discovery.http_filter.envlane.config_fail")
            assert sum(after.values()) > sum(before.values())
            assert answer(mesh, "dev.proj1") == ALIBABA_CASES["dev.proj1"]
        wait_for(lambda: "more than 64 ports (limit)" in mesh.client.process.log(), "limit named", 5)
        newer = load_config("alibaba")
        newer["trafficShaping"] = {"future": True}
        newer["services"][0]["weight"] = 3
        newer["services"][0]["envs"] = [0]  # and a real change: node loses dev.proj1
        push_and_wait(mesh, newer)
        assert answer(mesh, "dev.proj1").endswith("[node @ dev] <-dev.proj1")
        wait_for(lambda: "does not know: services[0].weight, trafficShaping" in mesh.client.process.log(),
                 "unknown fields named", 5)
        assert mesh.client.stats("wasmcustom.envlane.config.unknown_fields")["wasmcustom.envlane.config.unknown_fields"] >= 1
        for name, envoy in mesh.sidecars.items():
            assert envoy.process.alive(), name
            assert "panicked" not in envoy.process.log(), name


def test_debug_explanations_are_off_unless_configured():
    with Mesh(ALIBABA, load_config("alibaba")) as mesh:
        _, headers, _ = mesh.call("node:8080", {"x-virtual-env": "dev.proj1", "x-envlane-debug": "1"})
        assert "x-envlane-decision" not in headers


class Echo(BaseHTTPRequestHandler):
    """Answers with the request headers it received, as JSON."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_edge_strips_env_and_debug_headers():
    import yaml

    # The shipped edge WasmPlugin's config, with every env source turned on.
    shipped = yaml.safe_load((ROOT / "wasm-plugin-manifests" / "overlays" / "edge" / "wasmplugin.yaml").read_text())
    config = dict(shipped["spec"]["pluginConfig"])
    assert config["edge"] is True
    config.update(debug=True, baggageKey="lane", envAliases=[{"header": "x-lane"}, {"cookie": "VirtualEnv"}])
    echo = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="envlane-edge-"))
    ecds = workdir / "ecds.json"
    write_atomically(ecds, ecds_resource(config))
    port = free_port()
    vhosts = [{"name": "ingress", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}]
    gateway = Envoy("gateway", sidecar_bootstrap(pod="gateway", labels={"istio": "ingressgateway"}, listen_port=port,
                                                 admin_port=free_port(), virtual_hosts=vhosts,
                                                 clusters=[static_cluster("echo", echo.server_address[1], False)],
                                                 http_filters=[wasm_filter_ecds(ecds)], namespace="istio-system"),
                    workdir)
    try:
        gateway.wait_ready()
        status, headers, body = http_get(f"http://127.0.0.1:{port}/", {
            "host": "shop.example.com",
            "x-virtual-env": "dev.proj1",
            "x-envlane-debug": "1",
            "x-lane": "dev.proj1",
            "baggage": "user=7, lane=dev.proj1;ttl=3, other=2",
            "cookie": "session=abc; VirtualEnv=dev.proj1",
            "x-keep": "yes",
        })
        assert status == 200, body
        seen = dict(json.loads(body))
        for gone in ["x-virtual-env", "x-envlane-debug", "x-lane"]:
            assert gone not in seen, (gone, seen)
        assert seen["baggage"] == "user=7, other=2"
        assert seen["cookie"] == "session=abc"
        assert seen["x-keep"] == "yes"
        assert "x-envlane-decision" not in headers
    finally:
        gateway.close()
        echo.shutdown()
