"""Envoy instructions per request under callgrind: deterministic, so the
figure to trust on a shared or busy machine (req/s is not)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from .common import App, harness, log
from .variants import Variant


def wrapper_script(workdir: Path) -> Path:
    """An `envoy` that runs the real one under callgrind (ENVOY_BIN)."""
    wrapper = workdir / "envoy-callgrind.sh"
    wrapper.write_text("#!/bin/sh\nexec valgrind --tool=callgrind --smc-check=all-non-file --dump-instr=no "
                       f"--callgrind-out-file={workdir}/callgrind.envoy.%p {harness.envoy_bin()} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def envoy_instructions(variants: list[Variant], workdir: Path, upstream: App, requests: int = 1000, warmup: int = 300,
                       keep: Path | None = None) -> dict[str, dict]:
    """Instructions Envoy executes per request (all its threads). Each
    variant's Envoy runs under `valgrind --tool=callgrind`; after `warmup`
    requests the counters are zeroed, then `requests` sequential requests
    (the same mix as the wrk runs, one keep-alive connection) are counted,
    then 3 s idle, whose rate is subtracted. `keep`: a directory to copy each
    variant's counted profile to (`callgrind_annotate` reads it)."""
    out: dict[str, dict] = {}
    if not shutil.which("valgrind"):
        log("instructions: valgrind not found (./build.sh bench installs it); skipped")
        return out
    wrapper = wrapper_script(workdir)
    with harness_envoy(wrapper):
        for v in variants:
            log(f"instructions: {v.name} (Envoy under callgrind)")
            started = time.monotonic()
            proxy = v.proxy(upstream.port, workdir, quiet_stats=True)
            try:
                reqs = proxy.requests()
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)

                def go(k: int) -> None:
                    for i in range(k):
                        host, env, _ = reqs[i % len(reqs)]
                        conn.request("GET", "/", headers={"host": host, "x-virtual-env": env})
                        resp = conn.getresponse()
                        resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{v.name}: HTTP {resp.status}")

                def counted(action) -> tuple[int, float, Path | None]:
                    """Instructions and wall seconds of `action`, from zeroed counters."""
                    subprocess.run(["callgrind_control", "-z", str(proxy.pid)], capture_output=True, timeout=300, check=True)
                    t0 = time.monotonic()
                    action()
                    secs = time.monotonic() - t0
                    before = set(workdir.glob(f"callgrind.envoy.{proxy.pid}.*"))
                    subprocess.run(["callgrind_control", "-d", str(proxy.pid)], capture_output=True, timeout=300, check=True)
                    new = sorted(set(workdir.glob(f"callgrind.envoy.{proxy.pid}.*")) - before, key=lambda f: int(f.name.rsplit(".", 1)[1]))
                    m = re.search(r"^(?:summary|totals): (\d+)", new[-1].read_text(errors="replace"), re.M) if new else None
                    return (int(m.group(1)) if m else 0), secs, (new[-1] if new else None)

                go(warmup)
                before = proxy.cluster_counts()
                busy, busy_s, profile = counted(lambda: go(requests))
                after = proxy.cluster_counts()
                # What Envoy does by itself per second (timers), subtracted.
                idle, idle_s, _ = counted(lambda: time.sleep(3))
                conn.close()
                if busy:
                    per = (busy - idle / idle_s * busy_s) / requests
                    expected = {c for _, _, c in reqs}
                    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    total = sum(delta.values())
                    routed = sum(n for k, n in delta.items() if k in expected) / total if total else 0.0
                    if v.kind == "A" or v.expect_default:
                        routed = None  # routes to the route's own cluster by design
                    out[v.name] = {"instr_per_req": round(per), "instr_raw_per_req": round(busy / requests),
                                   "idle_instr_per_s": round(idle / idle_s), "instr_requests": requests, "instr_warmup": warmup,
                                   "routed_to_env_cluster": None if routed is None else round(routed, 4), "seconds": round(time.monotonic() - started, 1)}
                    log(f"instructions: {v.name}: {per:,.0f} per request ({busy / requests:,.0f} before subtracting "
                        f"{idle / idle_s:,.0f}/s idle over {busy_s:.1f} s)" + ("" if routed is None else f"; {routed:.0%} to the env's cluster"))
                    if keep and profile:
                        keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(profile, keep / f"callgrind.{re.sub(r'[^A-Za-z0-9]+', '-', v.name)}.out")
            finally:
                proxy.close()
    return out


@contextlib.contextmanager
def harness_envoy(path: Path):
    """ENVOY_BIN (read by the harness) pointed at `path` while inside."""
    old = os.environ.get("ENVOY_BIN")
    os.environ["ENVOY_BIN"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ENVOY_BIN", None)
        else:
            os.environ["ENVOY_BIN"] = old
