"""integration/demo.py (./build.sh demo): `--help` prints help and starts
nothing, the demo routes every case, `--serve` keeps a mesh up that answers
the curl commands it prints and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "integration" / "demo.py"
GATEWAY_DEMO = ROOT / "integration" / "demo_gateway.py"  # ./build.sh demo gateway


def test_help_prints_help_and_runs_nothing():
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(DEMO), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 10
    assert "--serve" in out.stdout and "How to read the output" in out.stdout and "first `./build.sh demo`" in out.stdout
    assert "starting 7 app pods" not in out.stdout and "mesh up in" not in out.stdout, "--help must not start the demo"
    bad = subprocess.run([sys.executable, str(DEMO), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_demo_routes_every_case():
    out = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=180, env=os.environ)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6/6 requests routed as expected" in out.stdout
    assert "BAD" not in out.stdout
    assert re.search(r"starting 7 app pods and 5 Envoy sidecars", out.stdout)


def lines_until_serving(p: subprocess.Popen) -> list[str]:
    """A `--serve` demo's output up to its "Ctrl-C to stop" line (asserted)."""
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C to stop" in line:
            break
    text = "".join(lines)
    assert "Ctrl-C to stop" in text, text
    return lines


def test_serve_keeps_the_mesh_up_until_ctrl_c():
    p = subprocess.Popen([sys.executable, str(DEMO), "--serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=os.environ)
    try:
        lines = lines_until_serving(p)
        text = "".join(lines)
        curl = next(line.strip() for line in lines if "x-virtual-env: dev.proj1.user9" in line and line.strip().startswith("curl"))
        body = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
        assert body.startswith("[springboot @ dev.proj1]"), body
        prom_url = re.search(r"client\s+(http://\S+/stats/prometheus)", text).group(1)
        metrics = subprocess.run(["curl", "-s", prom_url], capture_output=True, text=True, timeout=20).stdout
        assert re.search(r"^envlane_decision_fallback\{\} [1-9]", metrics, re.M), metrics[-2000:]
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=60)[0]
        assert p.returncode == 0, rest
        assert "requests routed as expected" in rest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_preflight_says_whether_a_build_is_due(tmp_path, monkeypatch):
    sys.path.insert(0, str(DEMO.parent))
    import demo

    out = subprocess.run([sys.executable, str(DEMO), "--preflight"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("envlane demo: "), out
    # Against a tree where nothing is built: a first build, with its time.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.rs").write_text("")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    line = demo.preflight()
    assert "building first" in line and "dist/envlane.wasm (missing)" in line and demo.first_build_time() in line
    # Built after its sources: nothing to do for that one.
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "envlane.wasm").write_bytes(b"\0asm")
    assert not [s for s in demo.stale_artifacts() if s.startswith("dist/envlane.wasm")]
    os.utime(tmp_path / "src" / "lib.rs", (time.time() + 60, time.time() + 60))
    assert "dist/envlane.wasm (older than its sources)" in demo.stale_artifacts()


def test_gateway_demo_help_prints_help_and_runs_nothing():
    out = subprocess.run([sys.executable, str(GATEWAY_DEMO), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "./build.sh demo gateway" in out.stdout and "How to read the output" in out.stdout
    assert "source=caller" in out.stdout
    assert "mesh up in" not in out.stdout, "--help must not start the demo"


def test_gateway_demo_routes_every_case_through_one_envoy():
    out = subprocess.run([sys.executable, str(GATEWAY_DEMO)], capture_output=True, text=True, timeout=180, env=os.environ)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "starting 7 app pods (each on its own loopback IP) and 1 gateway Envoy" in out.stdout
    assert "BAD" not in out.stdout
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "9/9 requests routed as expected", lines[-1]
    # The caller-table cases: no header, the env from the caller's source IP.
    caller_cases = [line for line in lines if re.match(r"ok  \(no header\) from 127\.0\.0\.\d+, labelled ", line)]
    assert len(caller_cases) == 3, out.stdout
    assert re.search(r"first hop decision: +env=dev\.proj1; source=caller; ", out.stdout), out.stdout


def test_gateway_demo_serve_prints_curl_commands_that_work():
    p = subprocess.Popen([sys.executable, str(GATEWAY_DEMO), "--serve"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=os.environ)
    try:
        lines = lines_until_serving(p)
        text = "".join(lines)
        # No header, from the dev.proj2 caller's IP: its env from the caller table.
        curl = next(line.split("#")[0].strip() for line in lines if line.strip().startswith("curl")
                    and "--interface" in line and "caller dev.proj2" in line)
        body = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
        assert body == "[springboot @ dev] <-dev.proj2, [go @ dev.proj2] <-dev.proj2, [node @ dev] <-dev.proj2", body
        prom_url = re.search(r"gateway\s+(http://\S+/stats/prometheus)", text).group(1)
        metrics = subprocess.run(["curl", "-s", prom_url], capture_output=True, text=True, timeout=20).stdout
        assert re.search(r"^envlane_decision_exact\{\} [1-9]", metrics, re.M), metrics[-2000:]
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=60)[0]
        assert p.returncode == 0, rest
        assert "requests routed as expected" in rest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
