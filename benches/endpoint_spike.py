#!/usr/bin/env python3
"""Endpoint-mode spike (issue 13): can a Wasm filter in Envoy 1.40 send a
request to one pod address it chose, over an ORIGINAL_DST cluster with mTLS
and a SAN check, without a client being able to steer it?

One client Envoy, several listeners (one case each), every route with the
shape envlane's route patch gives it (matcher cluster specifier on filter
state `wasm.envlane_route`, on no match the route's own cluster, a retry
policy and a timeout); the spike module (benches/endpoint_spike) writes
`envoy.network.transport_socket.original_dst_address` via the foreign
function `set_envoy_filter_state`. One backend Envoy plays the pods: TLS
listeners that require a client certificate, each with a SPIFFE identity.

    python3 benches/endpoint_spike.py        # builds the module, prints a verdict per check
Exit status 0 when every check holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))

from harness import Envoy, free_port, http_get, wait_for  # noqa: E402

SPIKE = ROOT / "benches" / "endpoint_spike"
TARGET = ROOT / "target"
OD = "outbound|8080|envlane-od|cart.shop.svc.cluster.local"
GOOD_SA = "spiffe://cluster.local/ns/shop/sa/cart"
EVIL_SA = "spiffe://cluster.local/ns/shop/sa/evil"
CLIENT_SA = "spiffe://cluster.local/ns/shop/sa/client"
# Backend "pods": name -> (IP, identity, behaviour)
PODS = {
    "pod-a": ("127.0.0.2", GOOD_SA, "ok"),
    "pod-b": ("127.0.0.3", GOOD_SA, "ok"),
    "evil": ("127.0.0.4", EVIL_SA, "ok"),
    "fail": ("127.0.0.5", GOOD_SA, "503"),
    "slow": ("127.0.0.6", GOOD_SA, "slow"),
}
GONE = "127.0.0.9"  # nothing listens there


def build() -> Path:
    subprocess.run(["cargo", "build", "--release", "--target", "wasm32-wasip1"], cwd=SPIKE, check=True,
                   env={**__import__("os").environ, "CARGO_TARGET_DIR": str(TARGET)})
    return TARGET / "wasm32-wasip1" / "release" / "endpoint_spike.wasm"


def certs(d: Path) -> dict[str, tuple[Path, Path]]:
    """A CA and one leaf per identity (URI SAN), as Istio's CA issues them."""
    def run(*a):
        subprocess.run(a, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", "2", "-subj", "/O=cluster.local")
    out = {}
    for name, sa in (("client", CLIENT_SA), ("good", GOOD_SA), ("evil", EVIL_SA)):
        key, csr, crt, ext = (d / f"{name}.{x}" for x in ("key", "csr", "crt", "ext"))
        ext.write_text(f"subjectAltName=URI:{sa}\nextendedKeyUsage=serverAuth,clientAuth\n")
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/")
        run("openssl", "x509", "-req", "-in", csr, "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext)
        out[name] = (crt, key)
    return out


def tls_common(crt: Path, key: Path, ca: Path, san: str | None = None) -> dict:
    vc: dict = {"trusted_ca": {"filename": str(ca)}}
    if san:
        vc["match_typed_subject_alt_names"] = [{"san_type": "URI", "matcher": {"exact": san}}]
    return {"tls_certificates": [{"certificate_chain": {"filename": str(crt)},
                                  "private_key": {"filename": str(key)}}],
            "validation_context": vc}


def backend_bootstrap(port: int, ca: Path, c: dict) -> dict:
    listeners = []
    for name, (ip, sa, how) in PODS.items():
        crt, key = c["evil" if sa == EVIL_SA else "good"]
        route: dict = {"match": {"prefix": "/"}}
        if how == "503":
            route["direct_response"] = {"status": 503, "body": {"inline_string": name}}
        else:
            route["direct_response"] = {"status": 200, "body": {"inline_string": name}}
        filters = []
        if how == "slow":
            filters.append({"name": "envoy.filters.http.fault", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "delay": {"fixed_delay": "3s", "percentage": {"numerator": 100}}}})
        filters.append({"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
        listeners.append({
            "name": name,
            "address": {"socket_address": {"address": ip, "port_value": port}},
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": tls_common(crt, key, ca)}},
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "route_config": {"virtual_hosts": [{
                        "name": "all", "domains": ["*"], "routes": [route],
                        "response_headers_to_add": [
                            {"header": {"key": "x-peer", "value": "%DOWNSTREAM_PEER_URI_SAN%"}},
                            {"header": {"key": "x-pod", "value": name}}]}]},
                    "http_filters": filters}}],
            }],
        })
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
            "static_resources": {"listeners": listeners}}


def route_config(timeout: str) -> dict:
    """A route as envlane's route patch leaves it: the service's policy
    (timeout, retries) and a matcher cluster specifier on wasm.envlane_route."""
    def action(c):
        return {"action": {"name": "cluster", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction",
            "cluster": c}}}
    return {"virtual_hosts": [{"name": "cart.shop.svc.cluster.local:8080", "domains": ["*"], "routes": [{
        "match": {"prefix": "/"},
        "route": {
            "timeout": timeout,
            "retry_policy": {"retry_on": "connect-failure,refused-stream,5xx", "num_retries": 2},
            "inline_cluster_specifier_plugin": {"extension": {"name": "envlane", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier",
                "cluster_matcher": {
                    "matcher_tree": {
                        "input": {"name": "envlane_route", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
                            "key": "wasm.envlane_route"}},
                        "exact_match_map": {"map": {OD: action(OD)}}},
                    "on_no_match": action("default")}}}},
        }}]}]}


def client_bootstrap(wasm: Path, cases: dict[str, str | None], ports: dict[str, int], backend_port: int,
                     default_port: int, ca: Path, c: dict) -> dict:
    listeners = []
    for case, cfg in cases.items():
        filters = []
        if cfg is not None:
            filters.append({"name": "envlane", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {"name": case, "root_id": "", "vm_config": {
                    "vm_id": case, "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}}},
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": cfg}}}})
        filters.append({"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
        listeners.append({
            "name": case,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports[case]}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": case,
                "route_config": route_config("1s" if case != "slow" else "0.5s"),
                "http_filters": filters}}]}],
        })
    crt, key = c["client"]
    clusters = [
        {   # what envlane-sync would add per service port: ORIGINAL_DST with the service's mTLS
            "name": OD,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "0.25s",
            "cleanup_interval": "60s",
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "outbound_.8080_._.cart.shop.svc.cluster.local",
                "common_tls_context": tls_common(crt, key, ca, GOOD_SA)}},
        },
        {   # the route's own cluster (istiod's outbound|8080||FQDN)
            "name": "default",
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": "default", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": default_port}}}}]}]},
        },
    ]
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def default_backend(port: int) -> dict:
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
            "static_resources": {"listeners": [{
                "name": "default",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "default",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "default"}}}],
                        "response_headers_to_add": [{"header": {"key": "x-pod", "value": "default"}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]}}


def main() -> int:
    wasm = build()
    work = Path(tempfile.mkdtemp(prefix="envlane-endpoint-spike-"))
    c = certs(work)
    ca = work / "ca.crt"
    bport, dport = free_port(), free_port()
    a = f"{PODS['pod-a'][0]}:{bport}"
    b = f"{PODS['pod-b'][0]}:{bport}"
    cases: dict[str, str | None] = {
        "rr": f"cluster={OD};addr={a};addr={b}",
        "rr_request_span": f"cluster={OD};addr={a};addr={b};span=1",
        "evil": f"cluster={OD};addr={PODS['evil'][0]}:{bport}",
        "fail": f"cluster={OD};addr={PODS['fail'][0]}:{bport}",
        "slow": f"cluster={OD};addr={PODS['slow'][0]}:{bport}",
        "gone": f"cluster={OD};addr={GONE}:{bport}",
        "gone_then_good": f"cluster={OD};addr={GONE}:{bport};addr={a}",
        "bad_addr": f"cluster={OD};addr=not-an-address",
        "nofilter": None,
    }
    ports = {k: free_port() for k in cases}
    procs = [
        Envoy("backend", backend_bootstrap(bport, ca, c), work),
        Envoy("default", default_backend(dport), work),
        Envoy("client", client_bootstrap(wasm, cases, ports, bport, dport, ca, c), work,
              ),
    ]
    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, evidence: str) -> None:
        results.append((name, ok, evidence))
        print(f"{'HOLDS' if ok else 'FAILS'}  {name}\n       {evidence}", flush=True)

    def get(case: str, headers: dict | None = None):
        t = time.monotonic()
        code, h, body = http_get(f"http://127.0.0.1:{ports[case]}/", headers, timeout=10)
        return code, h, body.strip(), time.monotonic() - t

    def od_stat(name: str) -> int:
        return procs[2].stats(f"cluster.{OD}.").get(f"cluster.{OD}.{name}", 0)

    try:
        for p in procs:
            p.wait_ready()
        client = procs[2]
        # (a) the foreign function exists and the filter state is accepted
        code, h, body, _ = get("rr")
        check("(a) set_envoy_filter_state exists in Envoy 1.40 and accepts "
              "envoy.network.transport_socket.original_dst_address (status 0 = Ok)",
              "set_envoy_filter_state=0" in h.get("x-spike", ""), f"x-spike: {h.get('x-spike')}")
        # (b) exactly the chosen address, with mTLS and the SAN check
        seen = []
        for _ in range(6):
            code, h, body, _ = get("rr")
            seen.append((code, body, h.get("x-spike", "").split()[0]))
        ok = all(code == 200 and addr == f"addr={PODS[body][0]}:{bport}" for code, body, addr in seen)
        check("(b) the ORIGINAL_DST cluster connects to exactly the address the filter chose (round robin)",
              ok and {b for _, b, _ in seen} == {"pod-a", "pod-b"}, f"{seen}")
        code, h, body, _ = get("rr")
        check("(b) mTLS: the client presented its SPIFFE certificate (server saw its URI SAN)",
              h.get("x-peer") == CLIENT_SA, f"x-peer: {h.get('x-peer')}")
        code, h, body, _ = get("rr_request_span")
        check("(b) span DownstreamRequest works the same", code == 200 and body in ("pod-a", "pod-b"),
              f"{code} {body} {h.get('x-spike')}")
        before = od_stat("ssl.fail_verify_san")
        code, h, body, _ = get("evil")
        after = od_stat("ssl.fail_verify_san")
        check("(b) mTLS identity check: a pod whose certificate has another SPIFFE identity is refused",
              code != 200 and body != "evil" and after > before,
              f"{code} {body!r}; ssl.fail_verify_san {before} -> {after}")
        # (c) steering by a client
        steer = {"x-envoy-original-dst-host": f"{PODS['evil'][0]}:{bport}",
                 "x-envlane-cluster": OD, "x-envoy-upstream-alt-stat-name": "x"}
        code, h, body, _ = get("nofilter", steer)
        check("(c) without the filter the matcher falls back to the route's own cluster; "
              "x-envoy-original-dst-host is ignored", code == 200 and body == "default", f"{code} {body}")
        code, h, body, _ = get("rr", steer)
        check("(c) with the filter a client header cannot steer the address",
              code == 200 and body in ("pod-a", "pod-b"), f"{code} {body}")
        # (d) the route's retries and timeout
        r0 = od_stat("upstream_rq_retry")
        code, h, body, _ = get("fail")
        r1 = od_stat("upstream_rq_retry")
        check("(d) the route's retry policy applies (5xx: retried twice, on the same address)",
              code == 503 and r1 - r0 == 2, f"{code} {body}; upstream_rq_retry {r0} -> {r1}")
        code, h, body, took = get("slow")
        check("(d) the route's timeout applies (0.5s route timeout vs a 3s slow pod)",
              code == 504 and took < 2.0, f"{code} {body!r} in {took:.2f}s")
        # (e) the chosen pod is gone
        f0, r0 = od_stat("upstream_cx_connect_fail"), od_stat("upstream_rq_retry")
        code, h, body, took = get("gone")
        f1, r1 = od_stat("upstream_cx_connect_fail"), od_stat("upstream_rq_retry")
        check("(e) pod gone: connect failure, retried (connect-failure) on the SAME address, then 503",
              code == 503 and f1 - f0 == 3 and r1 - r0 == 2,
              f"{code} {body!r} in {took:.2f}s; connect_fail {f0} -> {f1}, retries {r0} -> {r1}")
        outcomes = [get("gone_then_good")[:3:2] for _ in range(4)]
        check("(e) a retry does not pick another address (the filter is not run again per attempt)",
              sorted(set(outcomes)) == [(200, "pod-a"), (503, "no healthy upstream")] or
              any(o[0] == 503 for o in outcomes), f"{outcomes}")
        # A failed set_envoy_filter_state must not route to the OD cluster.
        code, h, body, _ = get("bad_addr")
        check("bad address: the foreign function refuses it (status != 0) and the OD cluster has no "
              "address to use", "set_envoy_filter_state=0" not in h.get("x-spike", ""),
              f"{code} {body!r} x-spike: {h.get('x-spike')}")
        print(json.dumps({"od_cluster_stats": {k: v for k, v in client.stats(f"cluster.{OD}.").items() if v}},
                         indent=1))
        print("logs:", work)
    finally:
        for p in procs:
            p.close()
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
