#!/usr/bin/env bash
# Build envlane's OCI images without a container daemon (called by `./build.sh images`).
#
#   scripts/images.sh            filter image (+ the artifact variant) and, when sync/ exists, the envlane-sync image
#   scripts/images.sh filter     filter images only
#   scripts/images.sh sync       envlane-sync image only
#
# Needs dist/envlane.wasm (`./build.sh` makes it). Installs what it needs itself:
# the Rust target x86_64-unknown-linux-musl (rustup) and, when missing, musl-gcc
# (Debian's musl-tools, for the C parts of dependencies such as ring).
#
# Output (see scripts/oci.py): dist/oci/<name>/ (OCI image layout) and
# dist/<name>.oci.tar for envlane-filter, envlane-filter-artifact, envlane-sync.
# Environment: ENVLANE_REGISTRY (default ghcr.io/envlane) sets the repository
# prefix written into the layouts' tags; digests do not depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."

MUSL=x86_64-unknown-linux-musl
what="${1:-all}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

build_filter() {
  if [ ! -f dist/envlane.wasm ]; then
    echo "dist/envlane.wasm is missing: run ./build.sh first" >&2
    exit 1
  fi
  log "OCI image of the filter (compat variant: tar+gzip layer with plugin.wasm; pinned by the manifests)"
  python3 scripts/oci.py filter --variant compat
  log "OCI image of the filter (Wasm OCI artifact variant)"
  python3 scripts/oci.py filter --variant artifact
}

ensure_musl() {
  if ! rustup target list --installed 2>/dev/null | grep -qx "$MUSL"; then
    log "installing Rust target $MUSL"
    rustup target add "$MUSL"
  fi
  if ! command -v musl-gcc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      log "installing musl-tools (musl-gcc, for C code in dependencies)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q musl-tools >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q musl-tools >/dev/null; }
    else
      echo "warning: musl-gcc not found; crates with C code may fail to build for $MUSL (install musl-tools)" >&2
    fi
  fi
}

build_sync() {
  if [ ! -f sync/Cargo.toml ]; then
    echo "skipping the envlane-sync image: sync/ is absent (the companion is not in this tree yet)" >&2
    return 0
  fi
  ensure_musl
  log "building envlane-sync, static ($MUSL, release)"
  # Reproducible: no absolute paths of this checkout or of the cargo home end
  # up in the binary, so another clone (CI) gives the same image digest.
  local here cargo_home remap
  here="$(pwd -P)"
  cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  remap="--remap-path-prefix=$here=/envlane --remap-path-prefix=$cargo_home=/cargo"
  local -a cc_env=()
  if command -v musl-gcc >/dev/null 2>&1; then
    cc_env=(CC_x86_64_unknown_linux_musl=musl-gcc)
  fi
  env "${cc_env[@]}" \
    CFLAGS_x86_64_unknown_linux_musl="-ffile-prefix-map=$here=/envlane -ffile-prefix-map=$cargo_home=/cargo" \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static $remap" \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" \
    cargo build --quiet --release -p envlane-sync --target "$MUSL"
  log "OCI image of envlane-sync (scratch: one static binary, uid $((65532)), no shell)"
  python3 scripts/oci.py sync --binary "target/$MUSL/release/envlane-sync"
}

case "$what" in
  all) build_filter; build_sync ;;
  filter) build_filter ;;
  sync) build_sync ;;
  *) echo "usage: $0 [all|filter|sync]" >&2; exit 2 ;;
esac
