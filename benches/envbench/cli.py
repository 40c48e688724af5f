"""`python3 benches/run.py [quick|full|report] ...` (`./build.sh bench` builds
what it needs, installs the tools, then runs this).

  quick   Envoy instructions/request under callgrind of A, B, B endpoint
          (envlane in endpoint mode), C, D and noop (+ every --extra-wasm
          build); ~7-9 minutes
  full    everything: wrk/h2load per request, callgrind of every variant,
          config pushes, the native criterion bench and the envlane-sync
          render; ~30 minutes
  gateway one gateway Envoy vs one sidecar per calling pod (the alibaba demo
          topology), CPU per request of all Envoys, req/s, latency, RSS;
          merged into the results file under "gateway"; ~2-4 minutes
  report  print the markdown of a results file (--write-benchmarks: replace
          BENCHMARKS.md's generated section)

Every run writes dist/bench/results.json (and a timestamped copy)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import callgrind, gateway, load, native, push, report, variants
from .common import DIST_BENCH, NOOP_WASM, RESULTS, check_built, harness, log, missing_tools, start_upstream


class only_names(list):
    """One --only argument: a variant name, or several separated by commas."""

    def __init__(self, text: str):
        super().__init__(n.strip() for n in text.split(",") if n.strip())


def picked_by_name(name: str, only: list[str]) -> bool:
    """`name` is asked for in --only; '-' matches a space ('B-endpoint' is
    'B endpoint')."""
    norm = lambda n: n.replace("-", " ")  # noqa: E731
    return norm(name) in {norm(n) for n in only}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benches/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="full", choices=["quick", "full", "gateway", "report"])
    ap.add_argument("--results", type=Path, default=RESULTS, help="results file (written by quick/full, read by report)")
    ap.add_argument("--write-benchmarks", action="store_true", help="report: replace the generated section of BENCHMARKS.md")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's figures to the existing results file (per variant and section) instead of replacing it")
    ap.add_argument("--wasm", type=Path, default=harness.WASM, help="the filter module for B (default dist/envlane.wasm)")
    ap.add_argument("--noop-wasm", type=Path, default=NOOP_WASM, help="the empty filter (cargo feature bench-noop; ./build.sh bench builds it)")
    ap.add_argument("--extra-wasm", action="append", default=[], metavar="NAME=PATH",
                    help="another build of the filter, measured as variant 'B NAME' in the same run (e.g. before=old.wasm)")
    ap.add_argument("--only", nargs="*", type=only_names,
                    help="only these variants (e.g. A B 'C 100 envs', or comma-separated with '-' for spaces: B,B-endpoint; "
                         "'B 10 pairs' and 'B 100k pairs' only by name)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["http1", "h2", "reload", "criterion", "callgrind", "render", "instructions", "gateway"])
    ap.add_argument("--duration", type=float, default=10.0, help="wrk: measured seconds per run (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="wrk: warm-up seconds per run (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="wrk: interleaved rounds per run (default 5)")
    ap.add_argument("--services", type=int, default=1000, help="services of the main table (x 10 envs; default 1000)")
    ap.add_argument("--services-100", type=int, default=100, help="services of the 100-envs-per-service table (default 100)")
    ap.add_argument("--instructions-requests", type=int, default=1000, help="callgrind: requests counted per variant")
    ap.add_argument("--instructions-warmup", type=int, default=300, help="callgrind: requests before counting")
    ap.add_argument("--keep-profiles", type=Path, help="callgrind: copy each variant's profile here")
    ap.add_argument("--crit-time", type=float, default=2.0, help="criterion measurement seconds per bench")
    ap.add_argument("--crit-warmup", type=float, default=1.0)
    ap.add_argument("--gw-requests", type=int, default=2000,
                    help="gateway: requests per round, layout and concurrency (default 2000; see gateway.time_wait_by_ip before raising it)")
    ap.add_argument("--gw-rounds", type=int, default=3, help="gateway: interleaved rounds (default 3)")
    ap.add_argument("--gw-concurrency", type=int, nargs="+", default=[1, 4], help="gateway: client workers per run (default 1 4)")
    ap.add_argument("--gw-warmup", type=int, default=300, help="gateway: requests per layout before measuring (default 300)")
    ap.add_argument("--gw-idle", type=float, default=5.0, help="gateway: seconds of idle Envoy CPU measured (default 5)")
    return ap.parse_args(argv)


def chosen(args, all_variants: list[variants.Variant]) -> list[variants.Variant]:
    if args.only:
        return [v for v in all_variants if picked_by_name(v.name, args.only)]
    return [v for v in all_variants if v.name not in ("B 10 pairs", "B 100k pairs")]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.only is not None:
        args.only = [name for names in args.only for name in names]
    if args.mode == "report":
        res = report.load(args.results)
        print(report.markdown(res))
        if args.write_benchmarks:
            report.write_benchmarks(res)
            log("BENCHMARKS.md: generated section replaced")
        return 0
    if args.mode == "gateway":
        check_built(harness.WASM)
        figures = gateway.run(args)
        gateway.write(figures, args.results)
        print("\n".join(report.gateway_table({"gateway": figures})))
        log(f"wrote {args.results} (key gateway)")
        return 0
    args.wasm = args.wasm.resolve()
    extra = {}
    for spec in args.extra_wasm:
        name, _, path = spec.partition("=")
        if not path or not Path(path).exists():
            sys.exit(f"--extra-wasm {spec}: expected NAME=PATH of an existing module")
        extra[name] = Path(path).resolve()
    check_built(args.wasm)
    noop = args.noop_wasm.resolve() if args.noop_wasm.exists() else None
    if noop is None:
        log(f"{args.noop_wasm} missing (./build.sh bench builds it with --features bench-noop): no noop variant")
    quick = args.mode == "quick"
    needed = ["valgrind", "callgrind_control"] + ([] if quick else ["wrk", "h2load"])
    if missing := missing_tools(needed):
        sys.exit(f"missing tools: install the Debian packages {' '.join(missing)} (./build.sh bench does)")
    started = time.monotonic()
    res: dict = {"schema": 1, "mode": args.mode, "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": report.machine(), "wasm": str(args.wasm), "extra_wasm": {k: str(v) for k, v in extra.items()},
                 "loadavg_before": os.getloadavg(), "variants": {}}
    all_variants = variants.standard(args.services, args.services_100, args.wasm, noop, extra, sizes=bool(args.only))
    if quick:
        picked = [v for v in all_variants if v.name in ("A", "B", "B endpoint", "C", "D", "noop") or v.name.removeprefix("B ") in extra]
        if args.only:
            picked = [v for v in picked if picked_by_name(v.name, args.only)]
    else:
        picked = chosen(args, all_variants)
    workdir = Path(tempfile.mkdtemp(prefix="envlane-bench-"))
    per_run: dict[str, dict] = {}
    try:
        if not quick and "http1" not in args.skip:
            upstream = start_upstream(workdir, "upstream", "x-bench-none")
            try:
                results: dict[str, load.Result] = {}
                load.per_request(args, workdir, upstream, picked, results)
                during = " ".join(f"{x:.2f}" for x in os.getloadavg())
                for name, r in results.items():
                    per_run[name] = {"rps": round(r.rps, 1), "p50_us": r.p50, "p99_us": r.p99, "p999_us": r.p999, "errors": r.errors,
                                     "requests": r.requests, "envoy_cpu": round(r.envoy_cpu, 3), "cpu_us_per_req": round(r.cpu_us_per_req, 2),
                                     "routed_ok": r.routed_ok, "rss_mib": round(r.rss_mib, 1), "note": r.note, "loadavg": during}
            finally:
                upstream.close()
        if "instructions" not in args.skip:
            upstream = start_upstream(workdir, "upstream-cg", "x-bench-none")
            try:
                counted = callgrind.envoy_instructions(picked, workdir, upstream, args.instructions_requests, args.instructions_warmup,
                                                       keep=args.keep_profiles)
            finally:
                upstream.close()
            for name, figures in counted.items():
                per_run.setdefault(name, {}).update(figures)
        if not quick and "h2" not in args.skip:
            results = {}
            load.per_request_h2(args, workdir, results)
            for name, r in results.items():
                per_run[name] = {"rps": round(r.rps, 1), "p50_us": r.p50, "p99_us": r.p99, "p999_us": r.p999, "errors": r.errors,
                                 "cpu_us_per_req": round(r.cpu_us_per_req, 2), "routed_ok": r.routed_ok}
        if not quick and "reload" not in args.skip:
            res["config_push"] = [vars(r) for r in push.config_changes(args.wasm, workdir)]
        if not quick and "criterion" not in args.skip:
            res["native"] = vars(native.criterion(args))
        if not quick and "render" not in args.skip:
            res["render"], res["render_note"] = native.sync_render(workdir)
        if not quick and "gateway" not in args.skip:
            res["gateway"] = gateway.run(args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["variants"] = per_run
    res["elapsed_s"] = round(time.monotonic() - started)
    res["loadavg"] = " ".join(f"{x:.2f}" for x in res["loadavg_before"]) + " / " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["runs"] = [{k: res[k] for k in ("mode", "started", "elapsed_s", "loadavg", "wasm")} | {"argv": sys.argv[1:]}]
    if args.merge and args.results.exists():
        old = report.load(args.results)
        for name, figures in per_run.items():
            old.setdefault("variants", {}).setdefault(name, {}).update(figures)
        for key in ("config_push", "native", "render", "render_note", "gateway"):
            if key in res:
                old[key] = res[key]
        old["runs"] = old.get("runs", []) + res["runs"]
        old["mode"] = "+".join(dict.fromkeys(old.get("mode", "").split("+") + [args.mode]))
        res = old
    for key in report.MAIN:
        if key in res["variants"]:
            res[key] = res["variants"][key]
    DIST_BENCH.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1, default=str)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    (args.results.parent / f"results-{args.mode}-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(text)
    print(report.markdown(res))
    log(f"wrote {args.results}")
    return 0
