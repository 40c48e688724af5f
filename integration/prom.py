"""A real Prometheus (Debian's `prometheus` package, scripts/tools.sh
prometheus) for the monitoring checks: scrapes given targets every second on
loopback, answers PromQL over its HTTP API, and draws the dashboard's panels
from query results (matplotlib, only for the recorded picture).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(HERE))

from harness import Process, free_port, wait_for  # noqa: E402

TOOLS = ROOT / "scripts" / "tools.sh"
# What Grafana puts for $__rate_interval here (4 scrapes of 1 s would do; a
# few more keep rate() stable while the tests wait).
RATE_INTERVAL = "20s"


def binary(name: str) -> str:
    """prometheus or promtool: on PATH, else installed by scripts/tools.sh."""
    found = shutil.which(name)
    if found:
        return found
    out = subprocess.run([str(TOOLS), name], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/tools.sh {name} failed:\n{out.stderr}")
    return out.stdout.strip()


class Prometheus:
    """targets: job -> [(host:port, metrics path, extra labels)]."""

    def __init__(self, workdir: Path, targets: dict[str, list[tuple[str, str, dict]]], rule_files: list[Path] | None = None,
                 honor_labels: set[str] = frozenset()):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        scrape = []
        for job, items in targets.items():
            by_path: dict[str, list] = {}
            for addr, path, labels in items:
                by_path.setdefault(path, []).append({"targets": [addr], "labels": labels})
            for i, (path, statics) in enumerate(sorted(by_path.items())):
                scrape.append({"job_name": job if i == 0 else f"{job}-{i}", "metrics_path": path,
                               "scrape_interval": "1s", "scrape_timeout": "900ms", "static_configs": statics,
                               # As the ServiceMonitor's honorLabels: the target's own labels win.
                               "honor_labels": job in honor_labels})
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": scrape}
        if rule_files:
            config["rule_files"] = [str(p) for p in rule_files]
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        argv = [binary("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn"]
        self.process = Process("prometheus", argv, self.dir)
        wait_for(lambda: self._get("/-/ready")[0] == 200, "prometheus ready", 60, self.process)

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def api(self, path: str, **params) -> dict:
        status, body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        answer = json.loads(body) if body else {}
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: HTTP {status} {body[:500]}")
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=grafana(expr))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=grafana(expr), start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_up(self, expected: int, timeout: float = 60) -> None:
        """Every target answered a scrape (up == 1), `expected` of them."""
        def ready():
            up = self.query("up")
            return len(up) == expected and all(r["value"][1] == "1" for r in up)
        wait_for(ready, f"prometheus scraped {expected} targets", timeout, self.process)

    def wait_value(self, expr: str, check, what: str, timeout: float = 30) -> float:
        def ok():
            v = self.value(expr)
            return v is not None and check(v) and (v if v else True)
        wait_for(ok, f"{what} ({expr})", timeout, self.process)
        return self.value(expr) or 0.0

    def wait_next_scrape(self, timeout: float = 30) -> None:
        """Every target has been scraped again since now: traffic sent before
        shows up, and a rate() over the window gets another sample."""
        def last() -> list[float]:
            return [float(r["value"][1]) for r in self.query("timestamp(up)")]
        before = max(last() or [0.0])
        wait_for(lambda: (t := last()) and min(t) > before, "the next scrape of every target",
                 timeout, self.process)

    def close(self) -> None:
        self.process.close()


def grafana(expr: str) -> str:
    """The query as Grafana sends it to Prometheus (its one macro replaced)."""
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def draw_dashboard(dashboard: dict, prom: Prometheus, start: float, end: float, out: Path, title: str) -> dict[str, int]:
    """A picture of the dashboard's panels, each drawn from the query results
    Prometheus gives for its targets over [start, end]. Returns the number
    of series per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.1 * rows), squeeze=False)
    counts: dict[str, int] = {}
    for ax, panel in zip([a for row in axes for a in row], panels):
        n = 0
        for target in panel["targets"]:
            for series in prom.query_range(target["expr"], start, end):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                legend = target["legendFormat"]
                for k, v in series["metric"].items():
                    legend = legend.replace("{{" + k + "}}", v)
                ax.plot(xs, ys, label=legend, linewidth=1.4)
                n += 1
        counts[panel["title"]] = n
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if n:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="red")
    for ax in [a for row in axes for a in row][len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return counts


