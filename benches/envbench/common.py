"""Shared by every part of the benchmark: paths, CPU placement, the harness,
process figures (CPU time, RSS, Wasm linear memories) and the upstream."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration"))

import harness  # noqa: E402  (integration/harness.py)
from harness import App  # noqa: E402

PORT = 8080
ENVOY_CPU = 0
LOAD_CPU = 1
CONNS = 32  # in flight in the throughput runs (wrk -c32; h2load -c8 -m4)
HOT = 16  # services the requests spread over
USER_SUFFIX = ".user7.x"  # two levels below a team env: found at the 3rd level tried

# What `./build.sh bench` builds before running: the filter under test, the
# same module with the `bench-noop` cargo feature (the empty filter) and the
# upstream test app. The results go next to them.
DIST_BENCH = ROOT / "dist" / "bench"
NOOP_WASM = DIST_BENCH / "envlane-noop.wasm"
RESULTS = DIST_BENCH / "results.json"

# Tools the benchmark runs; `./build.sh bench` installs them (Debian package
# names), the benchmark itself installs nothing.
TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client", "valgrind": "valgrind", "callgrind_control": "valgrind"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

@contextlib.contextmanager
def on_cpu(cpu: int | None):
    """Children started inside inherit this CPU affinity."""
    old = os.sched_getaffinity(0)
    if cpu is not None and cpu in old and len(old) > 1:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)

def taskset(cpu: int) -> list[str]:
    if shutil.which("taskset") and cpu in os.sched_getaffinity(0) and len(os.sched_getaffinity(0)) > 1:
        return ["taskset", "-c", str(cpu)]
    return []

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0

def wasm_memories_kib(pid: int) -> list[int]:
    """Size in KiB of each V8 Wasm linear memory (one per VM: the base VM, the
    main thread's and the worker's). V8 reserves a memory with its guard
    region as one ~8 GiB anonymous mapping; the accessible part (the current
    `memory.size`) is the read-write mapping right before the PROT_NONE rest.
    A linear memory only grows, so this is the VM's peak."""
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        head = line.split()
        start, end = (int(x, 16) for x in head[0].split("-"))
        maps.append((start, end, head[1], len(head) < 6))
    out = []
    for prev, cur in zip(maps, maps[1:]):
        guard = cur[3] and cur[2] == "---p" and cur[1] - cur[0] >= 4 << 30
        if guard and prev[3] and prev[2] == "rw-p" and prev[1] == cur[0]:
            out.append((prev[1] - prev[0]) // 1024)
    return sorted(out, reverse=True)

def start_upstream(workdir: Path, name: str, show: str, h2: bool = False) -> App:
    with on_cpu(LOAD_CPU):
        return App(name, "upstream", "bench", workdir, show=show, h2=h2)


def missing_tools(needed: list[str]) -> list[str]:
    """Debian packages that provide the tools in `needed` that are not on PATH."""
    return sorted({TOOLS[t] for t in needed if not shutil.which(t)})


def check_built(wasm: Path) -> None:
    for p, how in ((wasm, "./build.sh wasm"), (harness.TESTAPP, "cargo build --release -p envlane-testapp")):
        if not p.exists():
            sys.exit(f"{p} is missing: run `{how}` first (./build.sh bench does)")
