"""The local demo in sidecar-less gateway mode: alibaba/virtual-environment's
topology behind ONE gateway Envoy.

Starts 7 app pods (node, go, springboot in several envs), each on its own
loopback IP, and one real Envoy gateway running the envlane filter with
`"proxy": "gateway"`: every app's next hop and the client go through it. It
sends the demo's cases from an unlabelled client, then requests without any
header from callers whose env is in the gateway's caller table, and prints
which pod answered at each hop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

USAGE = """\
./build.sh demo gateway [--serve]   (or: python3 integration/demo_gateway.py [--serve], after ./build.sh)

Builds as `./build.sh demo` does (the same filter, test app and envlane-sync;
`python3 integration/demo.py --help` says how long a first build takes).
"""

NOTATION = """\
How to read the output (as in ./build.sh demo):

  ok  x-virtual-env: dev.proj1            ok = the hops are the expected ones (BAD otherwise);
                                          then the env header the client sent, or (no header)
  ok  (no header) from 127.0.0.21, labelled dev.proj1
                                          a caller that sends no header: the gateway finds its
                                          env in its caller table by the TCP peer address
      hops (innermost first): [springboot @ dev.proj1] <-dev.proj1, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-dev.proj1
                                          one [APP @ ENV] per pod that answered, the last
                                          service called first: APP is the app, ENV the env
                                          label of the pod that served the request; <-VALUE is
                                          the x-virtual-env header that pod received (<-empty:
                                          none; the gateway adds the calling pod's env, from
                                          the caller table, when a request has none)
      first hop decision: env=dev.proj1; source=caller; ...; outcome=exact; target=outbound|8080|dev-proj1|node...
                                          the gateway's x-envlane-decision header for the first
                                          hop (the demo turns debug on): the env and where it
                                          came from (header, caller, ...), the levels tried, the
                                          outcome (exact, fallback, default, passthrough) and
                                          the Istio cluster chosen (outbound|PORT|SUBSET|FQDN)

  gateway counters: decision.exact=2, ...   the filter's counters in the gateway (every hop
                                          of every request; wasmcustom.envlane.*)

--serve keeps the mesh up after the cases and prints curl commands (from a
caller's IP with curl --interface) and the gateway's Prometheus endpoint,
until Ctrl-C.
"""

# Callers that are not app pods, with the env label the gateway's caller
# table gives their IP; the demo sends them no header.
CALLERS = {"proj1-client": "dev.proj1", "feature1-client": "dev.proj1.feature1", "proj2-client": "dev.proj2"}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="demo gateway",
        usage=USAGE,
        description=__doc__.split("\n\n", 1)[1],
        epilog=NOTATION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--serve", action="store_true",
                    help="after the cases, keep the mesh running and print curl commands (Ctrl-C stops it)")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)  # --help prints the help and exits here, before anything starts

    from gateway import CLIENT, GatewayMesh  # noqa: E402
    from topologies import ALIBABA, ALIBABA_CASES, load_config  # noqa: E402

    config = load_config("alibaba")
    config["debug"] = True  # the demo shows each first hop's decision
    print("envlane demo, gateway mode: node -> go -> springboot, no sidecars: one Envoy 1.40 gateway routes every hop")
    for svc in ALIBABA.services:
        print(f"  {svc.name:<5} pods in envs: {', '.join(svc.envs)}")
    print(f"  default env: {config['defaultEnv']}; the client pod has no env label")
    print("  callers labelled in the gateway's caller table (besides the app pods): "
          + ", ".join(f"{name}={env}" for name, env in CALLERS.items()))
    print("  (output notation: python3 integration/demo_gateway.py --help)\n")
    pods = sum(len(s.envs) for s in ALIBABA.services)
    print(f"starting {pods} app pods (each on its own loopback IP) and 1 gateway Envoy ...", flush=True)
    started = time.monotonic()
    # (caller, env header) -> expected hops: the sidecar demo's cases from the
    # unlabelled client, then callers sending no header, whose env the
    # gateway finds by their source IP (routed as if they had sent it).
    cases = [(CLIENT, env, want) for env, want in ALIBABA_CASES.items()]
    cases += [(name, None, ALIBABA_CASES[env]) for name, env in CALLERS.items()]
    failures = 0
    with GatewayMesh(ALIBABA, config, callers=CALLERS) as mesh:
        print(f"mesh up in {time.monotonic() - started:.1f}s (workdir {mesh.workdir}; "
              f"gateway 127.0.0.1:{mesh.gateway_port})\n")
        for i, (caller, env, want) in enumerate(cases, 1):
            headers = {"x-envlane-debug": "1"}
            if env:
                headers["x-virtual-env"] = env
            status, resp_headers, body = mesh.call("node:8080", headers, caller=caller)
            body = body.strip()
            ok = status == 200 and body == want
            failures += not ok
            if caller == CLIENT:
                label = f"x-virtual-env: {env}" if env else "(no header)"
            else:
                pod = mesh.pods[caller]
                label = f"(no header) from {pod.ip}, labelled {pod.env}"
            print(f"{'ok ' if ok else 'BAD'} {label}   [{i}/{len(cases)}]")
            print(f"    hops (innermost first): {body}")
            if not ok:
                print(f"    expected:               {want} (HTTP {status})")
            print(f"    first hop decision:     {resp_headers.get('x-envlane-decision', '-')}")
        counters = mesh.gateway.stats("wasmcustom.envlane")
        print("\ngateway counters: " + ", ".join(f"{k.split('.', 2)[2]}={v}" for k, v in sorted(counters.items())))
        if args.serve:
            url = f"http://127.0.0.1:{mesh.gateway_port}/"
            print("\nThe mesh stays up. Try:")
            for env in ("dev.proj1", "dev.proj1.user9", "dev.proj2"):
                print(f"  curl -s -H 'host: node:8080' -H 'x-virtual-env: {env}' {url}")
            for name in CALLERS:
                pod = mesh.pods[name]
                print(f"  curl -s --interface {pod.ip} -H 'host: node:8080' {url}   # no header, caller {pod.env}")
            print(f"  curl -s -D - -o /dev/null --interface {mesh.pods['proj1-client'].ip} -H 'host: node:8080' "
                  f"-H 'x-envlane-debug: 1' {url}   # the decision header")
            print(f"Prometheus endpoint of the gateway (the filter's counters are envlane_*):\n"
                  f"  gateway          http://127.0.0.1:{mesh.gateway.admin_port}/stats/prometheus")
            print("Ctrl-C to stop.", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    print(f"\n{len(cases) - failures}/{len(cases)} requests routed as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
