"""The local demo: alibaba/virtual-environment's topology on loopback.

Starts 7 app pods (node, go, springboot in several envs) and 5 real Envoy
sidecars running the envlane filter, sends a few requests from an
unlabelled client pod, and prints which pod answered at each hop.

    ./build.sh demo            # run the requests and stop
    ./build.sh demo --serve    # keep the mesh up and print curl commands
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Mesh  # noqa: E402
from topologies import ALIBABA, ALIBABA_CASES, load_config  # noqa: E402


def main() -> int:
    serve = "--serve" in sys.argv[1:]
    config = load_config("alibaba")
    config["debug"] = True  # the demo shows each first hop's decision
    print("envlane demo: node -> go -> springboot, each pod with its own Envoy 1.40 sidecar")
    for svc in ALIBABA.services:
        print(f"  {svc.name:<5} pods in envs: {', '.join(svc.envs)}")
    print(f"  default env: {config['defaultEnv']}; the client pod has no env label\n")
    started = time.monotonic()
    failures = 0
    with Mesh(ALIBABA, config) as mesh:
        print(f"mesh up in {time.monotonic() - started:.1f}s (workdir {mesh.workdir})\n")
        for env, want in ALIBABA_CASES.items():
            headers = {"x-envlane-debug": "1"}
            if env:
                headers["x-virtual-env"] = env
            status, resp_headers, body = mesh.call("node:8080", headers)
            body = body.strip()
            ok = status == 200 and body == want
            failures += not ok
            label = f"x-virtual-env: {env}" if env else "(no header)"
            print(f"{'ok ' if ok else 'BAD'} {label}")
            print(f"    hops (innermost first): {body}")
            print(f"    first hop decision:     {resp_headers.get('x-envlane-decision', '-')}")
        counters = mesh.client.stats("wasmcustom.envlane")
        print("\nclient sidecar counters: " + ", ".join(f"{k.split('.', 2)[2]}={v}" for k, v in sorted(counters.items())))
        if serve:
            print(f"\nTry:  curl -s -H 'host: node:8080' -H 'x-virtual-env: dev.proj1' http://127.0.0.1:{mesh.client_port}/")
            print("Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    print(f"\n{len(ALIBABA_CASES) - failures}/{len(ALIBABA_CASES)} requests routed as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
