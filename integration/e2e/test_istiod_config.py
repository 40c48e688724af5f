"""What the real istiod generates for a sidecar in an opted-in namespace and
for one in a namespace that did not opt in, read back from the real Envoy
that took it (config_dump) and from istiod itself (its debug config dump)."""

import json
import subprocess

import pytest

import sidecar as sc
from conftest import shipped_settings
from harness import wait_for
from install import SYNC_BIN, WASM
from topologies import ALIBABA

NS = "shop"
PLAIN = "shop-plain"
NO_ENV_SERVICE = "catalog"  # a Service whose pods have no env label
HEADLESS = "ledger"  # a headless Service with env pods
MATCHER = "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier"


@pytest.fixture(scope="module")
def shop(cp, cluster, start_sync, deploy):
    sync = start_sync(shipped_settings(), "sync-istiod-config")
    mesh = deploy(NS, ALIBABA)
    plain = deploy(PLAIN, ALIBABA, opted_in=False)
    cluster.service(NS, NO_ENV_SERVICE, port=8080, target_port=9080)
    cluster.pod(NS, "catalog-0", {"app": NO_ENV_SERVICE}, port=9080)
    cluster.sync_endpoints(NS, NO_ENV_SERVICE)
    cluster.service(NS, HEADLESS, port=8080, target_port=9080, headless=True)
    for env in ("dev", "dev.proj1"):
        cluster.pod(NS, f"ledger-{env.replace('.', '-')}", {"app": HEADLESS, "virtual-env": env}, port=9080)
    cluster.sync_endpoints(NS, HEADLESS)
    # The user's own subsets for it: what istiod makes of subsets there.
    cluster.apply({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "ledger-by-env", "namespace": NS},
        "spec": {"host": f"{HEADLESS}.{NS}.svc.cluster.local", "subsets": [
            {"name": "dev", "labels": {"virtual-env": "dev"}},
            {"name": "dev-proj1", "labels": {"virtual-env": "dev.proj1"}},
        ]},
    })
    table = mesh.wait_table()
    fqdns = {mesh.fqdn(s.name) for s in ALIBABA.services}
    targets = set(filter_targets(table))

    def pushed() -> bool:
        """istiod pushed all envlane wrote: every sidecar has its egress
        listener, the client has every env cluster and every route patch."""
        for m in (mesh, plain):
            for sidecar in m.sidecars.values():
                if f"{sidecar.ip}_8080" not in sc.listeners(sidecar.config_dump()):
                    return False
        dump = mesh.client.config_dump()
        return targets <= set(sc.clusters(dump)) and fqdns <= patched_hosts(route(dump))

    wait_for(pushed, "istiod's push of what envlane-sync wrote", 60)
    return mesh, plain, sync, table


def egress_listener(mesh, sidecar) -> dict:
    return sc.listeners(sidecar.config_dump())[f"{sidecar.ip}_8080"]


def route(dump: dict) -> dict:
    return sc.route_configs(dump)["8080"]


def vhosts(rc: dict) -> dict[str, dict]:
    return {v["name"]: v for v in rc["virtual_hosts"]}


def patched_hosts(rc: dict) -> set[str]:
    return {name.rsplit(":", 1)[0] for name, v in vhosts(rc).items()
            if all("inline_cluster_specifier_plugin" in r.get("route", {}) for r in v["routes"])}


def filter_targets(table: dict) -> list[str]:
    """Every cluster the filter can choose for `table`, from the filter's own
    table code (`envlane-sync route-patches`)."""
    out = subprocess.run([str(SYNC_BIN), "route-patches", "-"], input=json.dumps(table),
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out)["targets"]


def test_the_module_arrives_by_ecds_with_the_current_table(shop):
    mesh, _, _, table = shop
    entry = sc.envlane_ecds(mesh.client.config_dump())
    wasm = entry["ecds_filter"]["typed_config"]
    assert wasm["@type"] == "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    assert wasm["config"]["vm_config"]["code"]["local"]["filename"] == str(WASM)
    assert wasm["config"]["failure_policy"] == "FAIL_OPEN"
    assert json.loads(wasm["config"]["configuration"]["value"]) == table
    assert {env for s in ALIBABA.services for env in s.envs} <= {e["name"] for e in table["envs"]}


def test_the_filter_is_first_in_the_outbound_http_chain(shop):
    mesh, _, _, _ = shop
    for sidecar in mesh.sidecars.values():
        names = [f["name"] for f in sc.http_filters(egress_listener(mesh, sidecar))]
        assert "envlane" in names[0] and names[-1] == "envoy.filters.http.router", names
        assert sum("envlane" in n for n in names) == 1, names
        first = sc.http_filters(egress_listener(mesh, sidecar))[0]
        assert "ads" in first["config_discovery"]["config_source"], first


def test_no_filter_where_the_namespace_did_not_opt_in(shop):
    _, plain, _, _ = shop
    for sidecar in plain.sidecars.values():
        dump = sidecar.config_dump()
        names = [f["name"] for f in sc.http_filters(egress_listener(plain, sidecar))]
        assert not any("envlane" in n for n in names), names
        assert sc.envlane_ecds(dump) is None


def test_the_route_patch_maps_each_env_cluster_to_itself_and_the_rest_to_the_route(shop):
    mesh, plain, _, table = shop
    targets = filter_targets(table)
    # The route EnvoyFilters live in Istio's root namespace, so the patch is
    # in every sidecar, opted in or not: without the filter nothing writes
    # the filter state and every request takes the route's own cluster
    # (test_alibaba.py checks that from the namespace that did not opt in).
    for m in (mesh, plain):
        hosts = vhosts(route(m.client.config_dump()))
        for svc in ALIBABA.services:
            fqdn = mesh.fqdn(svc.name)
            vhost = hosts[f"{fqdn}:8080"]
            want = sorted(t for t in targets if t.endswith(f"|{fqdn}"))
            assert len(want) == len(svc.envs)
            for r in vhost["routes"]:
                plugin = r["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
                assert plugin["@type"] == MATCHER
                tree = plugin["cluster_matcher"]["matcher_tree"]
                assert tree["input"]["typed_config"]["key"] == "wasm.envlane_route"
                exact = tree["exact_match_map"]["map"]
                assert sorted(exact) == want
                for key, action in exact.items():
                    assert action["action"]["typed_config"]["cluster"] == key
                default = plugin["cluster_matcher"]["on_no_match"]["action"]["typed_config"]["cluster"]
                assert default == f"outbound|8080||{fqdn}"
                assert "cluster" not in r["route"]


def test_no_patch_on_a_service_without_envs(shop):
    mesh, _, _, _ = shop
    fqdn = mesh.fqdn(NO_ENV_SERVICE)
    vhost = wait_for(lambda: vhosts(route(mesh.client.config_dump())).get(f"{fqdn}:8080"), "catalog's vhost", 30)
    assert [r["route"].get("cluster") for r in vhost["routes"]] == [f"outbound|8080||{fqdn}"]
    assert not any("inline_cluster_specifier_plugin" in r["route"] for r in vhost["routes"])


def test_every_target_the_filter_can_choose_is_a_cluster_istiod_generated(shop, cp):
    mesh, _, _, table = shop
    targets = filter_targets(table)
    ours = [t for t in targets if t.endswith(f".{NS}.svc.cluster.local")]
    assert len(ours) == sum(len(s.envs) for s in ALIBABA.services), targets
    in_envoy = sc.clusters(mesh.client.config_dump())
    assert set(targets) <= set(in_envoy), set(targets) - set(in_envoy)
    istiod = cp.istiod_get(f"/debug/config_dump?proxyID=client.{NS}")
    section = sc.sections(istiod)["ClustersConfigDump"]
    active = section.get("dynamic_active_clusters") or section.get("dynamicActiveClusters")
    assert active, sorted(section)
    generated = {c["cluster"]["name"] for c in active}
    assert set(targets) <= generated, set(targets) - generated


def test_envoy_took_everything_istiod_sent(shop):
    mesh, plain, _, _ = shop
    for m in (mesh, plain):
        for sidecar in m.sidecars.values():
            stats = sidecar.stats()
            assert sc.rejected_updates(stats) == {}, sidecar.pod
            assert stats.get("listener_manager.lds.update_success", 0) > 0
            assert stats.get("cluster_manager.cds.update_success", 0) > 0


def test_nothing_is_stripped_and_the_istiod_settings_are_the_pinned_ones():
    # Growing any of these needs a reason per entry (sidecar.py) and the
    # docs (docs/install.md, "Proven versions") updated with it.
    assert sc.STRIPPED == {}
    assert set(sc.ISTIOD_ENV) == {"PILOT_ENABLE_METADATA_EXCHANGE", "PILOT_ENABLE_ALPN_FILTER"}
    assert [line for line, _ in sc.MESH_CONFIG] == ["enableAutoMtls: false"]


def test_istiod_drops_a_route_patch_whose_type_it_does_not_know(shop, cluster):
    """The check above is meaningful: istiod decodes a patch with its own
    Envoy API; a type it does not know is dropped there (and never reaches
    Envoy), while the valid patch next to it lands."""
    mesh, _, _, _ = shop
    fqdn = mesh.fqdn(NO_ENV_SERVICE)
    vhost_match = {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {"vhost": {"name": f"{fqdn}:8080"}}}
    cluster.apply({
        "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
        "metadata": {"name": "e2e-unknown-type", "namespace": "istio-system"},
        "spec": {"configPatches": [
            {"applyTo": "HTTP_ROUTE", "match": vhost_match, "patch": {"operation": "MERGE", "value": {
                "route": {"inline_cluster_specifier_plugin": {"extension": {
                    "name": "e2e", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.e2e.v3.NoSuchType"},
                }}},
            }}},
            {"applyTo": "VIRTUAL_HOST", "match": vhost_match, "patch": {"operation": "MERGE", "value": {
                "response_headers_to_add": [{"header": {"key": "x-e2e-marker", "value": "landed"}}],
            }}},
        ]},
    })
    try:
        vhost = wait_for(lambda: (v := vhosts(route(mesh.client.config_dump()))[f"{fqdn}:8080"])
                         .get("response_headers_to_add") and v, "the valid patch next to it", 30)
        assert not any("inline_cluster_specifier_plugin" in r["route"] for r in vhost["routes"])
        assert sc.rejected_updates(mesh.client.stats()) == {}
    finally:
        cluster.api("DELETE", "/apis/networking.istio.io/v1alpha3/namespaces/istio-system/envoyfilters/e2e-unknown-type")


def test_a_headless_service_is_left_out_because_istiod_routes_it_by_original_destination(shop, cluster):
    """envlane-sync leaves headless Services out (README, "How it maps to
    Istio"): istiod gives them ORIGINAL_DST clusters, subsets included, so
    the address the client resolved decides, whatever cluster is chosen."""
    mesh, _, _, table = shop
    fqdn = mesh.fqdn(HEADLESS)
    assert fqdn not in {s["host"] for s in table["services"]}
    assert cluster.get("networking.istio.io/v1", "DestinationRule", NS, f"envlane-{HEADLESS}") is None
    names = [f"outbound|8080||{fqdn}", f"outbound|8080|dev|{fqdn}", f"outbound|8080|dev-proj1|{fqdn}"]
    found = wait_for(lambda: (c := sc.clusters(mesh.client.config_dump())) and all(n in c for n in names) and c,
                     "the headless Service's clusters", 30)
    assert {n: found[n].get("type") for n in names} == {n: "ORIGINAL_DST" for n in names}
