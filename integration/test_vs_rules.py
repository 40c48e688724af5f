"""envlane changes only WHERE a request goes, never HOW: a VirtualService's
rules for a service (timeout, retries, fault injection, mirroring, header
changes) apply to envlane-routed requests exactly as to the others.

One sidecar Envoy 1.40 with the filter, routes shaped as istiod builds them
from a VirtualService, patched with envlane-sync's route patches for that
VirtualService; echo servers stand in for the pods."""

import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import (Envoy, apply_route_patches, ecds_resource, fqdn, free_port, http_get, route_patches,
                     service_domains, sidecar_bootstrap, static_cluster, wait_for, wasm_filter_ecds,
                     write_atomically)

JAVA = fqdn("java")
BASE = f"outbound|8080||{JAVA}"
FEATURE = f"outbound|8080|dev-proj1|{JAVA}"
OTHER = f"outbound|8080||{fqdn('other')}"
MIRROR = f"outbound|8080||{fqdn('mirror')}"

TABLE = {
    "defaultEnv": "dev",
    "envs": [{"name": "dev", "subset": "dev"}, {"name": "dev.proj1", "subset": "dev-proj1"}],
    "services": [{"host": JAVA, "ports": [8080], "envs": [0, 1]}],
}

# The user's VirtualService for java: a rule with every policy that goes to
# java itself (envlane may re-target it), and one that goes elsewhere (it
# must not).
VIRTUAL_SERVICE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: java, namespace: demo}
spec:
  hosts: [java]
  http:
  - name: to-other
    match: [{uri: {prefix: /other}}]
    route: [{destination: {host: other}}]
  - name: java-rules
    timeout: 0.5s
    retries: {attempts: 2, retryOn: 5xx}
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    mirror: {host: mirror}
    headers: {request: {set: {x-vs-added: "yes"}, remove: [x-drop-me]}}
    route: [{destination: {host: java}}]
"""


class Pod(BaseHTTPRequestHandler):
    """An echo pod: answers its name and the headers it got. `x-sleep`
    delays the answer (a slow upstream, for the route timeout);
    `x-fail-once: ID` fails the first attempt of ID."""

    name = "?"
    seen: list = []
    failed: set = set()
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 - http.server's name
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.lock:
            self.seen.append(headers)
        if "x-sleep" in headers:
            time.sleep(float(headers["x-sleep"]))
        fail = headers.get("x-fail-once")
        with self.lock:
            first = fail is not None and fail not in self.failed
            if first:
                self.failed.add(fail)
        body = json.dumps({"pod": self.name, "headers": headers}).encode()
        self.send_response(503 if first else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def pod(name: str) -> tuple[ThreadingHTTPServer, type]:
    handler = type(f"Pod_{name}", (Pod,), {"name": name, "seen": [], "failed": set(), "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def istiod_routes() -> list[dict]:
    """The routes istiod builds for VIRTUAL_SERVICE (names, policies)."""
    return [
        {"name": "to-other", "match": {"prefix": "/other"}, "route": {"cluster": OTHER, "timeout": "0s"}},
        {
            "name": "java-rules",
            "match": {"prefix": "/"},
            "request_headers_to_add": [{"header": {"key": "x-vs-added", "value": "yes"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            "request_headers_to_remove": ["x-drop-me"],
            "typed_per_filter_config": {"envoy.filters.http.fault": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "abort": {"http_status": 418, "percentage": {"numerator": 100}},
                # Only requests that ask for the fault get it, so one route tests all rules.
                "headers": [{"name": "x-want-fault", "present_match": True}],
            }},
            "route": {
                "cluster": BASE,
                "timeout": "0.5s",
                "retry_policy": {"retry_on": "5xx", "num_retries": 2},
                "request_mirror_policies": [{"cluster": MIRROR}],
            },
        },
    ]


@pytest.fixture(scope="module")
def sidecar():
    servers = {n: pod(n) for n in ["java-dev", "java-proj1", "other", "mirror"]}
    port = lambda n: servers[n][0].server_address[1]  # noqa: E731
    clusters = [static_cluster(BASE, port("java-dev"), False), static_cluster(FEATURE, port("java-proj1"), False),
                static_cluster(f"outbound|8080|dev|{JAVA}", port("java-dev"), False),
                static_cluster(OTHER, port("other"), False), static_cluster(MIRROR, port("mirror"), False)]
    vhosts = [{"name": f"{JAVA}:8080", "domains": service_domains("java", 8080), "routes": istiod_routes()}]
    patches = route_patches(TABLE, VIRTUAL_SERVICE)
    assert apply_route_patches(vhosts, patches) == 1, patches  # java-rules only
    workdir = Path(tempfile.mkdtemp(prefix="envlane-vs-"))
    ecds = workdir / "ecds.json"
    write_atomically(ecds, ecds_resource(TABLE))
    fault = {"name": "envoy.filters.http.fault",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}}
    listen = free_port()
    envoy = Envoy("vs-sidecar", sidecar_bootstrap(pod="client", labels={"app": "client"}, listen_port=listen,
                                                  admin_port=free_port(), virtual_hosts=vhosts, clusters=clusters,
                                                  http_filters=[wasm_filter_ecds(ecds), fault]), workdir)
    envoy.wait_ready()

    def call(path="/", **headers):
        h = {"host": "java:8080"}
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        status, _, body = http_get(f"http://127.0.0.1:{listen}{path}", h)
        return status, (json.loads(body) if body.startswith("{") else body)

    yield call, {n: h for n, (_, h) in servers.items()}
    envoy.close()
    for server, _ in servers.values():
        server.shutdown()


@pytest.mark.parametrize("env,pod_name", [("dev.proj1", "java-proj1"), (None, "java-dev")])
def test_envlane_picks_the_pod_and_the_rules_still_apply(sidecar, env, pod_name):
    call, pods = sidecar
    headers = {"x_virtual_env": env} if env else {}
    # Where: the env's pod.
    status, body = call(**headers, x_drop_me="1")
    assert (status, body["pod"]) == (200, pod_name), body
    # Header changes.
    assert body["headers"]["x-vs-added"] == "yes" and "x-drop-me" not in body["headers"], body
    # Mirroring: the mirror got a copy.
    marker = f"mirror-{env}"
    call(**headers, x_mark=marker)
    wait_for(lambda: any(h.get("x-mark") == marker for h in pods["mirror"].seen), "the mirrored copy", 5)
    # Retries: the first attempt fails, the route's retry policy tries again, on the same env.
    status, body = call(**headers, x_fail_once=f"retry-{env}")
    assert (status, body["pod"]) == (200, pod_name), body
    attempts = [h for h in pods[pod_name].seen if h.get("x-fail-once") == f"retry-{env}"]
    assert len(attempts) == 2
    # Timeout: 0.5 s.
    status, _ = call(**headers, x_sleep="1.5")
    assert status == 504
    # Fault injection.
    status, _ = call(**headers, x_want_fault="1")
    assert status == 418


def test_a_rule_to_another_service_is_left_alone(sidecar):
    call, _ = sidecar
    status, body = call("/other/x", x_virtual_env="dev.proj1")
    assert (status, body["pod"]) == (200, "other"), body
