#!/usr/bin/env bash
# Build envlane's OCI images without a container daemon (called by `./build.sh images`).
#
#   scripts/images.sh            filter image (+ the artifact variant) and, when sync/ exists, the envlane-sync image
#   scripts/images.sh filter     filter images only
#   scripts/images.sh sync       envlane-sync image only
#
# Needs dist/envlane.wasm (`./build.sh` makes it). Installs nothing: what the
# envlane-sync image needs is set up once by `scripts/tools.sh image-deps`
# (the musl Rust targets, Debian's musl-tools; for linux/arm64 also zig and
# cargo-zigbuild). Without musl-gcc the envlane-sync image is skipped, saying
# so: a build without it would not be the pinned image.
#
# Platforms of the envlane-sync image: ENVLANE_SYNC_PLATFORMS, default
# "linux/amd64,linux/arm64": both static binaries (x86_64 with musl-gcc,
# aarch64 with cargo-zigbuild) and an OCI image index over the two images
# (scripts/oci.py), the digest the Deployment pins so that each node pulls
# its own platform. "linux/amd64" alone gives one image (not the pinned one).
#
# Output (see scripts/oci.py): dist/oci/<name>/ (OCI image layout) and
# dist/<name>.oci.tar for envlane-filter, envlane-filter-artifact, envlane-sync.
# Environment: ENVLANE_REGISTRY (default ghcr.io/envlane) sets the repository
# prefix written into the layouts' tags; digests do not depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."

MUSL=x86_64-unknown-linux-musl
ARM=aarch64-unknown-linux-musl
PLATFORMS="${ENVLANE_SYNC_PLATFORMS:-linux/amd64,linux/arm64}"
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

# Prints what is missing for the requested platforms (nothing when all is there).
missing_deps() {
  local installed
  installed="$(rustup target list --installed 2>/dev/null || true)"
  grep -qx "$MUSL" <<<"$installed" || echo "Rust target $MUSL"
  command -v musl-gcc >/dev/null 2>&1 || echo "musl-gcc (Debian musl-tools)"
  if [[ ",$PLATFORMS," == *",linux/arm64,"* ]]; then
    grep -qx "$ARM" <<<"$installed" || echo "Rust target $ARM"
    python3 -m ziglang version >/dev/null 2>&1 || echo "zig (pip ziglang)"
    cargo-zigbuild --version >/dev/null 2>&1 || echo "cargo-zigbuild"
  fi
}

build_sync() {
  if [ ! -f sync/Cargo.toml ]; then
    echo "skipping the envlane-sync image: sync/ is absent (the companion is not in this tree yet)" >&2
    return 0
  fi
  local platform
  for platform in ${PLATFORMS//,/ }; do
    case "$platform" in
      linux/amd64|linux/arm64) ;;
      *) echo "ENVLANE_SYNC_PLATFORMS: $platform is not linux/amd64 or linux/arm64" >&2; exit 2 ;;
    esac
  done
  local missing
  missing="$(missing_deps)"
  if [ -n "$missing" ]; then
    {
      printf '\033[1m==> SKIPPING the envlane-sync image (%s): missing\033[0m\n' "$PLATFORMS"
      sed 's/^/      /' <<<"$missing"
      echo "    set them up once with: scripts/tools.sh image-deps"
    } >&2
    return 0
  fi
  # Reproducible: no absolute paths of this checkout or of the cargo home end
  # up in the binaries, so another clone (CI) gives the same image digest.
  local here cargo_home remap prefix_map
  here="$(pwd -P)"
  cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  remap="--remap-path-prefix=$here=/envlane --remap-path-prefix=$cargo_home=/cargo"
  prefix_map="-ffile-prefix-map=$here=/envlane -ffile-prefix-map=$cargo_home=/cargo"
  local -a binaries=()
  log "building envlane-sync, static ($MUSL, release)"
  env CC_x86_64_unknown_linux_musl=musl-gcc \
    CFLAGS_x86_64_unknown_linux_musl="$prefix_map" \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static $remap" \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" \
    cargo build --quiet --release -p envlane-sync --target "$MUSL"
  if [[ ",$PLATFORMS," == *",linux/arm64,"* ]]; then
    log "building envlane-sync, static ($ARM, release, cargo-zigbuild)"
    env CFLAGS_aarch64_unknown_linux_musl="$prefix_map" \
      CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static $remap" \
      CARGO_PROFILE_RELEASE_STRIP=symbols \
      CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" \
      cargo zigbuild --quiet --release -p envlane-sync --target "$ARM"
    binaries=(--binary "amd64=target/$MUSL/release/envlane-sync" --binary "arm64=target/$ARM/release/envlane-sync")
    log "OCI image index of envlane-sync (linux/amd64 + linux/arm64; scratch: one static binary each, uid 65532, no shell)"
  else
    binaries=(--binary "target/$MUSL/release/envlane-sync")
    log "OCI image of envlane-sync (linux/amd64; scratch: one static binary, uid 65532, no shell)"
  fi
  python3 scripts/oci.py sync "${binaries[@]}"
}

case "$what" in
  all) build_filter; build_sync ;;
  filter) build_filter ;;
  sync) build_sync ;;
  *) echo "usage: $0 [all|filter|sync]" >&2; exit 2 ;;
esac
