"""The Envoy variants compared, and one Envoy per variant.

  A   no filter: a plain route to the upstream
  B   envlane (Wasm, ECDS-delivered), routes patched as envlane-sync renders
      them (a matcher cluster specifier on filter state `wasm.envlane_route`)
  C   the same routing as native Envoy routes: one exact `x-virtual-env`
      header match per (service, env), as alibaba/virtual-environment and the
      swimlane demo generate them
  D   the same fallback as an inline Lua filter (KtEnv-style)
  noop  B's Envoy with the empty filter (`--features bench-noop`)
  B endpoint  envlane in endpoint mode (issue 13): the table with
      `mode: endpoint`, `targetPorts` and per-env `endpoints` (the upstream's
      address for every env), per hot service port ONE ORIGINAL_DST cluster
      `outbound|PORT|envlane-endpoints|FQDN` plus the service's own cluster,
      no cluster per (service, env); routes patched as `envlane-sync
      route-patches` renders them for that table

plus diagnostics of B (passthrough, other table sizes, another build of the
module)."""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .common import ENVOY_CPU, HOT, PORT, USER_SUFFIX, harness, on_cpu
from harness import (
    Envoy,
    apply_route_patches,
    ecds_resource,
    fqdn,
    free_port,
    h2_options,
    service_domains,
    sidecar_bootstrap,
    static_cluster,
    wasm_filter_ecds,
    write_atomically,
)


def svc_name(i: int) -> str:
    return f"svc{i}"

def subset_of(env: str) -> str:
    return env.replace(".", "-")

@dataclass(frozen=True)
class Table:
    """`services` services, each with the same `envs` envs: `dev` (the default)
    and `dev.team0 .. dev.team{envs-2}`. Pairs = services × envs."""

    services: int
    envs: int

    @property
    def pairs(self) -> int:
        return self.services * self.envs

    @property
    def label(self) -> str:
        return f"{self.services}x{self.envs}"

    def env_names(self) -> list[str]:
        return ["dev"] + [f"dev.team{t}" for t in range(self.envs - 1)]

    def config(self, revision: str = "bench", subset_override: dict[str, str] | None = None) -> dict:
        envs = []
        for name in self.env_names():
            sub = (subset_override or {}).get(name, subset_of(name))
            envs.append({"name": name, "subset": sub})
        ids = list(range(self.envs))
        return {
            "revision": revision,
            "defaultEnv": "dev",
            "envs": envs,
            "services": [{"host": fqdn(svc_name(i)), "ports": [PORT], "envs": ids} for i in range(self.services)],
        }

    def hot(self) -> list[int]:
        n = min(HOT, self.services)
        return [k * self.services // n for k in range(n)]

    def requests(self) -> list[tuple[str, str, str]]:
        """(authority, x-virtual-env, expected cluster): every hot service ×
        every team env, with two extra levels so exactly two levels fall back."""
        out = []
        for t in range(self.envs - 1):
            for i in self.hot():
                env = f"dev.team{t}"
                out.append((f"{svc_name(i)}:{PORT}", env + USER_SUFFIX, cluster(i, subset_of(env))))
        return out

def cluster(i: int, subset: str = "") -> str:
    return f"outbound|{PORT}|{subset}|{fqdn(svc_name(i))}"

# Endpoint mode: the one cluster per service port the filter names (the
# `targets` of `envlane-sync route-patches`).
ENDPOINT_SUBSET = "envlane-endpoints"
UPSTREAM_IP = "127.0.0.1"  # where the bench upstream listens (harness.App)

def endpoint_config(table: Table, target_port: int, revision: str = "bench-endpoint") -> dict:
    """`table` in endpoint mode: every env's one pod is the bench upstream
    (its IP; `targetPorts` its port), so the ORIGINAL_DST cluster the filter
    steers connects to it."""
    cfg = table.config(revision)
    cfg["mode"] = "endpoint"
    for svc in cfg["services"]:
        svc["targetPorts"] = [target_port for _ in svc["ports"]]
        svc["endpoints"] = [[UPSTREAM_IP] for _ in svc["envs"]]
    return cfg

def original_dst_cluster(name: str, h2: bool) -> dict:
    """envlane-sync's CLUSTER ADD value without its transport socket (as
    integration/endpoint_mesh.py builds it)."""
    c = {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "10s", "cleanup_interval": "60s"}
    if h2:
        c["typed_extension_protocol_options"] = h2_options()
    return c

def endpoint_cluster_set(table: Table, upstream: int, h2: bool) -> list[dict]:
    """Endpoint mode's clusters for the hot services: the service's own
    (subset-less) cluster and its ORIGINAL_DST cluster; no subset clusters."""
    own = [static_cluster(cluster(i), upstream, h2) for i in table.hot()]
    return own + [original_dst_cluster(cluster(i, ENDPOINT_SUBSET), h2) for i in table.hot()]

def cluster_set(table: Table, upstream: int, h2: bool, extra: dict[str, int] | None = None) -> list[dict]:
    """The same clusters for every variant: hot services × every env subset,
    plus the subset-less one; all point at the one upstream. `extra`: more
    clusters, name → port."""
    names = []
    for i in table.hot():
        names.append(cluster(i))
        names += [cluster(i, subset_of(e)) for e in table.env_names()]
    return [static_cluster(n, upstream, h2) for n in names] + [static_cluster(n, port, h2) for n, port in (extra or {}).items()]

ISTIO_DEFAULT_RETRY = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2,
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": "5",
    "retriable_status_codes": [503],
}

LUA_ROUTE_HEADER = "x-envlane-cluster"

def istio_route(target: str) -> dict:
    """A plain route as Istio writes it: the same policy in every variant, so
    A, B, C and D differ only in routing."""
    return {"cluster": target, "timeout": "0s", "retry_policy": ISTIO_DEFAULT_RETRY}

def default_route(i: int) -> dict:
    return {"name": "default", "match": {"prefix": "/"}, "route": istio_route(cluster(i, "dev"))}

def lua_route() -> dict:
    """D: the route a Lua-based solution needs: the cluster its filter named."""
    return {"match": {"prefix": "/", "headers": [{"name": LUA_ROUTE_HEADER, "present_match": True}]},
            "request_headers_to_remove": [LUA_ROUTE_HEADER],
            "route": {k: v for k, v in istio_route("unused").items() if k != "cluster"} | {"cluster_header": LUA_ROUTE_HEADER}}

def vhosts_a(table: Table) -> list[dict]:
    first = table.hot()[0]
    return [{"name": "all", "domains": ["*"], "routes": [default_route(first)]}]

def vhosts_envlane(table: Table, route_table: dict) -> list[dict]:
    """B: Istio's shape, a virtual host per service with its default route,
    patched as envlane-sync's route EnvoyFilters patch it (for route_table)."""
    vh = [
        {"name": f"{fqdn(svc_name(i))}:{PORT}", "domains": service_domains(svc_name(i), PORT), "routes": [default_route(i)]}
        for i in range(table.services)
    ]
    apply_route_patches(vh, harness.route_patches(route_table))
    vh.append({"name": "allow_any", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}]})
    return vh

def vhosts_lua(table: Table) -> list[dict]:
    """D: Istio's shape with the Lua filter's cluster_header route first."""
    vh = [
        {"name": f"{fqdn(svc_name(i))}:{PORT}", "domains": service_domains(svc_name(i), PORT), "routes": [lua_route(), default_route(i)]}
        for i in range(table.services)
    ]
    vh.append({"name": "allow_any", "domains": ["*"], "routes": [lua_route(), {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]})
    return vh

def vhosts_native(table: Table) -> list[dict]:
    """C: alibaba/virtual-environment style. Envoy routes cannot fall back by
    prefix level, so the fallback is expanded: for every (service, env) one
    route matching exactly the header value requests of that env use
    (`dev.teamN.user7.x`) to the subset envlane would pick, in table order,
    and a last route to the default env's subset."""
    vh = []
    for i in range(table.services):
        routes = []
        for env in table.env_names()[1:]:
            routes.append({
                "match": {"prefix": "/", "headers": [{"name": "x-virtual-env", "string_match": {"exact": env + USER_SUFFIX}}]},
                "route": istio_route(cluster(i, subset_of(env))),
            })
        routes.append(default_route(i))
        vh.append({"name": f"{svc_name(i)}:{PORT}", "domains": service_domains(svc_name(i), PORT), "routes": routes})
    return vh

LUA_CODE = r"""
-- KtEnv-style hierarchical env routing, generated from the envlane table.
local ENVS = {%(envs)s}
local SUBSETS = {%(subsets)s}
local SERVICES = {%(services)s}
local PORT = "%(port)d"
local DEFAULT_ENV = "dev"
local ROUTE_HEADER = "%(route_header)s"

-- host (every name a request may use) -> { env name -> cluster }
local ROUTES = {}
for _, svc in ipairs(SERVICES) do
  local name, ns, envs = svc[1], svc[2], svc[3]
  local full = name .. "." .. ns .. ".svc.cluster.local"
  local by_env = {}
  for _, id in ipairs(envs) do
    by_env[ENVS[id]] = "outbound|" .. PORT .. "|" .. SUBSETS[id] .. "|" .. full
  end
  ROUTES[full] = by_env
  ROUTES[name .. "." .. ns .. ".svc"] = by_env
  ROUTES[name .. "." .. ns] = by_env
  ROUTES[name] = by_env
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(ROUTE_HEADER) ~= nil then
    headers:remove(ROUTE_HEADER)
  end
  local authority = headers:get(":authority")
  if authority == nil then return end
  local host = string.match(authority, "^([^:]+)")
  local by_env = ROUTES[host]
  if by_env == nil then return end
  local env = headers:get("x-virtual-env")
  local target = nil
  while env ~= nil do
    target = by_env[env]
    if target ~= nil then break end
    env = string.match(env, "^(.+)%%.[^.]+$")
  end
  if target == nil then target = by_env[DEFAULT_ENV] end
  if target ~= nil then
    headers:replace(ROUTE_HEADER, target)
    handle:clearRouteCache()
  end
end
"""

def lua_filter(table: Table) -> dict:
    names = table.env_names()
    ids = ",".join(str(k + 1) for k in range(len(names)))
    code = LUA_CODE % {
        "envs": ",".join(json.dumps(n) for n in names),
        "subsets": ",".join(json.dumps(subset_of(n)) for n in names),
        "services": ",".join(f'{{"{svc_name(i)}","{harness.NAMESPACE}",{{{ids}}}}}' for i in range(table.services)),
        "port": PORT,
        "route_header": LUA_ROUTE_HEADER,
    }
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    }

_SEQ = itertools.count()

class Proxy:
    """One Envoy for one variant."""

    def __init__(self, variant: str, table: Table, upstream: int, workdir: Path, *, h2_upstream: bool = False,
                 extra_clusters: dict[str, int] | None = None, plugin_config: dict | None = None, name: str | None = None,
                 wasm: Path | None = None, quiet_stats: bool = False, route_table: dict | None = None, mode: str = "cluster"):
        self.variant = variant
        self.table = table
        self.mode = mode
        if mode == "endpoint":
            if variant != "B":
                raise ValueError(f"endpoint mode is a B variant, not {variant}")
            plugin_config = endpoint_config(table, upstream)
        self.expect_default = False  # routed by the plain default route (passthrough)
        self.port = free_port()
        # Unique per Envoy: the ECDS file and the log must not be shared.
        self.name = re.sub(r"[^A-Za-z0-9]+", "-", name or variant) + f"-{table.label}-{next(_SEQ)}"
        self.ecds_path = workdir / f"{self.name}-ecds.json"
        filters: list[dict] = []
        if variant == "A":
            vhosts = vhosts_a(table)
        elif variant == "B":
            vhosts = vhosts_envlane(table, route_table or plugin_config or table.config())
            write_atomically(self.ecds_path, ecds_resource(plugin_config or table.config(), wasm=wasm or harness.WASM))
            filters = [wasm_filter_ecds(self.ecds_path)]
        elif variant == "C":
            vhosts = vhosts_native(table)
        elif variant == "D":
            vhosts = vhosts_lua(table)
            filters = [lua_filter(table)]
        else:
            raise ValueError(variant)
        boot = sidecar_bootstrap(
            pod=f"bench-{variant.lower()}", labels={"app": "client"}, listen_port=self.port, admin_port=free_port(),
            virtual_hosts=vhosts, http_filters=filters,
            clusters=(endpoint_cluster_set(table, upstream, h2_upstream) if mode == "endpoint"
                      else cluster_set(table, upstream, h2_upstream, extra_clusters)),
        )
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        # Routes to the subsets of services no request uses name clusters this
        # Envoy does not have (to keep 10,000s of clusters out of the picture).
        hcm["route_config"]["validate_clusters"] = False
        if quiet_stats:
            # No periodic stats flush (it walks every cluster's stats): under
            # callgrind a request takes milliseconds and the flush would be
            # counted against the variants that are slower there.
            boot["stats_flush_on_admin"] = True
        started = time.monotonic()
        with on_cpu(ENVOY_CPU):
            self.envoy = Envoy(f"envoy-{self.name}", boot, workdir, concurrency=1)
        try:
            self.envoy.wait_ready(timeout=300)
            if variant == "B":
                harness.wait_for(lambda: "envlane: loaded table" in self.envoy.process.log(), "envlane table loaded", 120, self.envoy.process)
        except BaseException:
            self.envoy.close()
            raise
        self.startup_s = time.monotonic() - started

    def requests(self) -> list[tuple[str, str, str]]:
        """The table's requests with the cluster this Envoy should send each
        to (endpoint mode: the service's ORIGINAL_DST cluster)."""
        reqs = self.table.requests()
        if self.mode != "endpoint":
            return reqs
        by_host = {f"{svc_name(i)}:{PORT}": cluster(i, ENDPOINT_SUBSET) for i in self.table.hot()}
        return [(host, env, by_host[host]) for host, env, _ in reqs]

    @property
    def pid(self) -> int:
        return self.envoy.process.proc.pid

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def cluster_counts(self) -> dict[str, int]:
        out = {}
        # Under callgrind, listing the stats of a 10,000-cluster Envoy takes
        # longer than the harness's usual 2 s (a full run died there).
        for k, v in self.envoy.stats("upstream_rq_total", timeout=60).items():
            m = re.fullmatch(r"cluster\.(.+)\.upstream_rq_total", k)
            if m:
                out[m.group(1)] = v
        return out

    def close(self) -> None:
        self.envoy.close()

def smoke(proxy: Proxy) -> None:
    """One request per distinct kind must answer 200 before measuring."""
    for host, env, _ in proxy.requests()[:3]:
        status, _, body = harness.http_get(proxy.url(), {"host": host, "x-virtual-env": env})
        if status != 200:
            raise RuntimeError(f"{proxy.variant} {host} {env}: HTTP {status} {body[:200]}")


def passthrough_config(table: Table) -> dict:
    """B's table with every host renamed out of it: the filter reads the
    headers, finds no service and changes nothing."""
    cfg = table.config("passthrough")
    for svc in cfg["services"]:
        svc["host"] = "not-" + svc["host"]
    return cfg


@dataclass
class Variant:
    """One measured Envoy: `kind` is A/B/C/D (how it is built), `name` the
    result key."""

    name: str
    kind: str
    table: Table
    plugin_config: dict | None = None
    wasm: Path | None = None  # B: the module (default: the filter under test)
    expect_default: bool = False  # routed by the route's own cluster (passthrough, noop)
    mode: str = "cluster"  # B: "endpoint" builds the endpoint-mode table and clusters

    def proxy(self, upstream: int, workdir: Path, **kw) -> Proxy:
        p = Proxy(self.kind, self.table, upstream, workdir, plugin_config=self.plugin_config, name=self.name, wasm=self.wasm,
                  mode=self.mode, **kw)
        p.expect_default = self.expect_default
        return p


def standard(services: int, services_100: int, wasm: Path, noop: Path | None, extra_wasm: dict[str, Path] | None = None,
             sizes: bool = False, envs_100: bool = True) -> list[Variant]:
    """The variants in the order they are measured. `extra_wasm`: more
    builds of the filter measured as B (`B <name>`), e.g. the build before a
    change, next to the current one in the same run."""
    main = Table(services, 10)
    out = [Variant("A", "A", main), Variant("B", "B", main, wasm=wasm), Variant("B endpoint", "B", main, wasm=wasm, mode="endpoint"),
           Variant("C", "C", main), Variant("D", "D", main)]
    if noop:
        out.append(Variant("noop", "B", main, wasm=noop, expect_default=True))
    out.append(Variant("B passthrough", "B", main, passthrough_config(main), wasm=wasm, expect_default=True))
    for label, path in (extra_wasm or {}).items():
        out.append(Variant(f"B {label}", "B", main, wasm=path))
    if sizes:
        out.append(Variant("B 10 pairs", "B", Table(1, 10), wasm=wasm))
        out.append(Variant("B 100k pairs", "B", Table(10 * services, 10), wasm=wasm))
    if envs_100:
        out.append(Variant("B 100 envs", "B", Table(services_100, 100), wasm=wasm))
        out.append(Variant("C 100 envs", "C", Table(services_100, 100)))
    return out
