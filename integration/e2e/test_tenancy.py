"""envlane-sync in a shared cluster, on the real kube-apiserver (issue 11):
two replicas under leader election (only the Lease holder writes; the
standby takes over when the leader dies or stops), Events on the objects
concerned, and the object-size guard checked against the real server's limit.

Every wait is a poll with a deadline on state read back from the API server
or from envlane-sync's own /metrics.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import FIGURES, shipped_settings
from controlplane import ControlPlaneError
from install import SYSTEM_NS, EnvlaneSync, install

NS = "lanes"
OPT_IN = {"envlane.io/enabled": "true"}
ENV_LABEL = "virtual-env"
WASM_API = "extensions.istio.io/v1alpha1"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/envlane-sync"
# Shipped timings (envlane-sync run --help): lease 15 s, retry 2 s; debounce 1 s.
LEASE_SECONDS, RETRY_SECONDS = 15, 2


def envs_in_table(cluster) -> set[str]:
    wp = cluster.get(WASM_API, "WasmPlugin", NS, "envlane")
    if wp is None:
        return set()
    return {e["name"] for e in wp["spec"]["pluginConfig"].get("envs", [])}


def holder(cp) -> str | None:
    try:
        lease = cp.api("GET", LEASE)
    except Exception:  # not created yet
        return None
    return (lease.get("spec") or {}).get("holderIdentity") or None


def leader_of(replicas: list[EnvlaneSync]) -> list[EnvlaneSync]:
    return [r for r in replicas if r.alive() and r.metric("envlane_sync_leader") == 1.0]


@pytest.fixture(scope="module")
def replicas(cp, cluster, workdir):
    """Two envlane-sync replicas of the shipped install (as a rollout with
    maxSurge 1 runs them), each with its own pod name."""
    cluster.namespace(NS, OPT_IN)
    cluster.service(NS, "api", port=8080, target_port=8080)
    cluster.pod(NS, "api-dev", {"app": "api", ENV_LABEL: "dev"}, port=8080, ready=True)
    install(cp, shipped_settings())
    started = []
    for name in ("replica-a", "replica-b"):
        d = workdir / name
        d.mkdir(exist_ok=True)
        started.append(EnvlaneSync(cp, d).start())
    yield started
    for r in started:
        r.stop()
    # Opt out again (same field manager: the label goes), so later modules'
    # tables do not hold this module's Services.
    cluster.namespace(NS)


def test_one_replica_writes_the_other_stands_by_ready(cp, cluster, replicas):
    a, b = replicas
    (leader,) = a.wait(lambda: leader_of(replicas) if len(leader_of(replicas)) == 1 else None,
                       "exactly one leader", 40)
    standby = b if leader is a else a
    assert holder(cp) == leader.dir.name, "the Lease names the writing replica"
    assert standby.http("/readyz")[0] == 200, "a standby with a complete view is ready (rollouts wait for it)"
    leader.wait(lambda: "dev" in envs_in_table(cluster), "table written", 20)
    cluster.pod(NS, "api-dev-one", {"app": "api", ENV_LABEL: "dev.one"}, port=8080, ready=True)
    leader.wait(lambda: "dev.one" in envs_in_table(cluster), "dev.one in the table", 20)
    assert (standby.metric('envlane_sync_writes_total{op="apply"}') or 0) == 0, "the standby never wrote"
    assert standby.metric("envlane_sync_leader") == 0.0


def _takeover(cp, cluster, replicas, stop, env: str) -> tuple[float, float, EnvlaneSync]:
    """Stops the leader with `stop`, then adds a pod of `env`: seconds until
    the standby leads and until the change is in the table."""
    (leader,) = leader_of(replicas)
    (standby,) = [r for r in replicas if r is not leader and r.alive()]
    t0 = time.monotonic()
    stop(leader)
    cluster.pod(NS, f"api-{env.replace('.', '-')}", {"app": "api", ENV_LABEL: env}, port=8080, ready=True)
    standby.wait(lambda: standby.metric("envlane_sync_leader") == 1.0, "standby leads", 40)
    leads = time.monotonic() - t0
    standby.wait(lambda: env in envs_in_table(cluster), f"{env} in the table", 40)
    written = time.monotonic() - t0
    assert holder(cp) == standby.dir.name
    return leads, written, standby


def test_the_standby_takes_over_when_the_leader_dies(cp, cluster, replicas):
    """SIGKILL: the Lease is not released, so the standby waits until it has
    not been renewed for a lease duration (by its own clock)."""
    def kill(r: EnvlaneSync):
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait(10)

    leads, written, _ = _takeover(cp, cluster, replicas, kill, "dev.two")
    FIGURES["leader election, SIGKILL"] = (f"standby leading after {leads:.1f} s, "
                   f"a change made at the kill in the table after {written:.1f} s "
                   f"(bound: lease {LEASE_SECONDS} s + retry {RETRY_SECONDS} s + debounce 1 s)")
    assert leads <= LEASE_SECONDS + 2 * RETRY_SECONDS + 1, leads
    assert written <= LEASE_SECONDS + 2 * RETRY_SECONDS + 3, written


def test_a_stopping_leader_hands_over_at_once(cp, cluster, workdir, replicas):
    """SIGTERM (a rollout, a drain): the leader releases the Lease on its way
    out, so the standby takes over at its next read."""
    d = workdir / "replica-c"
    d.mkdir(exist_ok=True)
    replicas.append(EnvlaneSync(cp, d).start())

    def term(r: EnvlaneSync):
        r.proc.send_signal(signal.SIGTERM)
        r.proc.wait(10)

    leads, written, _ = _takeover(cp, cluster, replicas, term, "dev.three")
    FIGURES["leader election, SIGTERM"] = (f"standby leading after {leads:.1f} s, "
                                           f"the change in the table after {written:.1f} s")
    assert leads <= 2 * RETRY_SECONDS + 1, leads


# -- Events ------------------------------------------------------------------


def events(cp, ns: str) -> list[dict]:
    return cp.api("GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events")["items"]


def test_warnings_are_events_on_the_objects_concerned(cp, cluster, replicas):
    """A pod whose env label is not an env, and a user's object holding the
    name of the DestinationRule envlane needs: each an Event the real API
    server accepted, on the object concerned, from envlane-sync."""
    cluster.pod(NS, "api-bad", {"app": "api", ENV_LABEL: "dev..bad"}, port=8080, ready=True)
    cluster.service(NS, "web", port=8080, target_port=8080)
    cluster.apply({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                   "metadata": {"name": "envlane-web", "namespace": NS},
                   "spec": {"host": "web"}}, manager="a-user")
    cluster.pod(NS, "web-dev", {"app": "web", ENV_LABEL: "dev"}, port=8080, ready=True)
    (leader,) = leader_of(replicas)
    want = {("InvalidEnvLabel", "Pod", "api-bad"), ("ForeignObject", "DestinationRule", "envlane-web"),
            ("ServiceBlocked", "Service", "web"), ("TableWritten", "WasmPlugin", "envlane")}

    def found():
        got = {(e.get("reason"), e["regarding"]["kind"], e["regarding"]["name"]) for e in events(cp, NS)
               if e.get("reportingController") == "envlane.io/envlane-sync"}
        return got if want <= got else None

    leader.wait(found, f"Events {sorted(want)}", 30)
    for e in events(cp, NS):
        if e.get("reportingController") == "envlane.io/envlane-sync":
            assert e["type"] == ("Normal" if e["reason"] == "TableWritten" else "Warning") and e["note"], e
            if e["reason"] in ("InvalidEnvLabel", "ForeignObject", "ServiceBlocked"):
                assert e["reportingInstance"] == leader.dir.name, e  # earlier leaders wrote tables too
            print(f"event {e['reason']} on {e['regarding']['kind']}/{e['regarding']['name']}: {e['note']}")
    bad = [e for e in events(cp, NS) if e.get("reason") == "InvalidEnvLabel"]
    assert "dev..bad" in bad[0]["note"], bad
    assert cluster.get("networking.istio.io/v1", "DestinationRule", NS, "envlane-web")["spec"] == {"host": "web"}
    assert "web" not in {h.split(".")[0] for h in services_in_table(cluster)}


def services_in_table(cluster) -> set[str]:
    wp = cluster.get(WASM_API, "WasmPlugin", NS, "envlane")
    return {s["host"] for s in wp["spec"]["pluginConfig"].get("services", [])} if wp else set()


# -- the object-size guard against the real limit ----------------------------


def _plugin(name: str, table_bytes: int) -> dict:
    """A WasmPlugin whose pluginConfig is a table-shaped object of about
    `table_bytes` of JSON (envs and services, as envlane writes them)."""
    envs, services = [], []
    size = 0
    i = 0
    while True:
        env = {"name": f"dev.proj{i}", "subset": f"dev-proj{i}"}
        svc = {"host": f"svc{i}.{NS}.svc.cluster.local", "ports": [8080], "envs": [i]}
        size += len(json.dumps(env)) + len(json.dumps(svc)) + 4
        if size > table_bytes:
            break
        envs.append(env)
        services.append(svc)
        i += 1
    return {"apiVersion": WASM_API, "kind": "WasmPlugin",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"url": "file:///dev/null", "pluginConfig": {"envs": envs, "services": services}}}


def test_the_size_guard_sits_below_what_the_api_server_stores(cp, cluster, replicas):
    """envlane-sync refuses objects over 1 MiB (--max-object-bytes): one of
    that size is stored by the real server with server-side apply (managed
    fields included), one of 2 MiB is refused by it (etcd's 1.5 MiB request
    limit), which is what the guard keeps envlane-sync from hitting."""
    limit = 1024 * 1024
    ok = _plugin("size-probe-ok", limit - 2048)
    assert len(json.dumps(ok)) <= limit
    stored = cluster.apply(ok, manager="envlane-sync-size-probe")
    assert stored["metadata"]["name"] == "size-probe-ok"
    big = _plugin("size-probe-big", 2 * limit)
    with pytest.raises(ControlPlaneError) as refused:
        cluster.apply(big, manager="envlane-sync-size-probe")
    print("2 MiB object refused:", str(refused.value)[:300])
    FIGURES["object-size guard"] = (f"{len(json.dumps(ok))} bytes stored by the real API server, "
                                    f"{len(json.dumps(big))} bytes refused")


# -- explain and table, live -------------------------------------------------


def test_explain_and_table_read_the_live_table(cp, cluster, replicas):
    """`envlane-sync table -n NS` and `explain -n NS` read the WasmPlugin from
    the real API server (the admin's kubeconfig, as an operator runs them)."""
    import subprocess

    from install import SYNC_BIN

    env = {"KUBECONFIG": str(cp.kubeconfig), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> str:
        out = subprocess.run([str(SYNC_BIN), *args], capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    table = run("table", "-n", NS)
    api_line = [line for line in table.splitlines() if line.startswith(f"api.{NS}.")]
    assert api_line and "dev.one" in api_line[0] and "8080" in api_line[0], table
    answer = run("explain", "-n", NS, "--authority", f"api.{NS}.svc.cluster.local:8080", "--env", "dev.one.x")
    assert "dev.one.x: not deployed for this service" in answer, answer
    assert "dev.one: deployed" in answer, answer
    assert "outcome: fallback -> outbound|8080|dev-one-" in answer, answer  # subset: sanitised + hash
    print(table, answer, sep="\n")
    # The WasmPlugin says what it holds (issue 15: status where kubectl looks).
    wp = cluster.get(WASM_API, "WasmPlugin", NS, "envlane")
    notes = wp["metadata"]["annotations"]
    cfg = wp["spec"]["pluginConfig"]
    assert notes["envlane.io/table-revision"] == cfg["revision"], notes
    assert int(notes["envlane.io/table-pairs"]) == sum(len(s["envs"]) for s in cfg["services"]), notes
    assert int(notes["envlane.io/table-services"]) == len(cfg["services"]), notes
