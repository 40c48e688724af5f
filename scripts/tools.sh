#!/usr/bin/env bash
# Tools for the chart and monitoring checks and the image builds, pinned and
# cached: an explicit setup step (scripts/images.sh installs nothing itself).
#
#   scripts/tools.sh helm         build Helm once from its Go module
#                                 (go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION),
#                                 print its path
#   scripts/tools.sh prometheus   install Debian's prometheus package (pinned
#                                 $PROMETHEUS_DEB, promtool included) when it is
#                                 missing, print the path of prometheus
#   scripts/tools.sh promtool     the same, print the path of promtool
#   scripts/tools.sh image-deps   what scripts/images.sh needs for the linux/amd64
#                                 and linux/arm64 envlane-sync images: the Rust
#                                 targets x86_64- and aarch64-unknown-linux-musl
#                                 (rustup), Debian's musl-tools (musl-gcc, amd64 C
#                                 code), zig ($ZIG_VERSION, pip ziglang) and
#                                 cargo-zigbuild ($ZIGBUILD_VERSION, cargo install)
#                                 for arm64; images.sh itself installs nothing
#   scripts/tools.sh all          helm, prometheus and image-deps
#
# Helm goes to ${XDG_CACHE_HOME:-$HOME/.cache}/envlane/tools/helm-<version>-<go>-<os>-<arch>/helm;
# a warm rerun only checks the file is there. Prometheus needs apt-get and
# root; without them the tests that need it fail, naming what to install.
set -euo pipefail

HELM_VERSION=v3.21.4
PROMETHEUS_DEB=2.42.0+ds-5+deb12u1
MUSL_TOOLS_DEB=1.2.3-1
ZIG_VERSION=0.14.1
ZIGBUILD_VERSION=0.24.1
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/envlane/tools"

log() { printf 'tools.sh: %s\n' "$*" >&2; }

helm_path() {
  command -v go >/dev/null || { log "go not found on PATH (Helm is built from its Go module)"; exit 1; }
  echo "$cache_root/helm-$HELM_VERSION-$(go env GOVERSION GOOS GOARCH | tr '\n' '-' | sed 's/-$//')/helm"
}

cmd_helm() {
  local out dir start
  out="$(helm_path)"
  if [[ ! -x "$out" ]]; then
    dir="$(dirname "$out")"
    mkdir -p "$dir"
    log "building helm $HELM_VERSION (go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION; once, then cached)"
    start=$(date +%s)
    GOBIN="$dir/.tmp" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath" \
      go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
      "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv -f "$dir/.tmp/helm" "$out"
    rmdir "$dir/.tmp"
    log "built helm in $(( $(date +%s) - start ))s: $out"
  fi
  echo "$out"
}

cmd_prometheus() {
  local want="$1"
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
     || [[ "$(dpkg-query -W -f '${Version}' prometheus 2>/dev/null)" != "$PROMETHEUS_DEB" ]]; then
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
      log "prometheus $PROMETHEUS_DEB is not installed and this is not a root Debian shell: apt-get install prometheus=$PROMETHEUS_DEB"
      exit 1
    fi
    log "installing Debian's prometheus=$PROMETHEUS_DEB (apt-get, no recommends)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "prometheus=$PROMETHEUS_DEB" >&2 \
      || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "prometheus=$PROMETHEUS_DEB" >&2; }
    # The package starts a system-wide service where an init system runs; the
    # tests start their own server on a free port.
  fi
  command -v "$want"
}

apt_install() {
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    log "not a root Debian shell: install $* yourself"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "$@" >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "$@" >&2; }
}

cmd_image_deps() {
  local t
  for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    if ! rustup target list --installed 2>/dev/null | grep -qx "$t"; then
      log "installing Rust target $t"
      rustup target add "$t" >&2
    fi
  done
  if ! command -v musl-gcc >/dev/null; then
    log "installing Debian's musl-tools=$MUSL_TOOLS_DEB (musl-gcc: C code of dependencies, linux/amd64)"
    apt_install "musl-tools=$MUSL_TOOLS_DEB"
  fi
  if [[ "$(python3 -c 'import importlib.metadata as m; print(m.version("ziglang"))' 2>/dev/null)" != "$ZIG_VERSION" ]]; then
    log "installing zig $ZIG_VERSION (pip ziglang; the C compiler and linker for linux/arm64)"
    python3 -m pip install --quiet --disable-pip-version-check "ziglang==$ZIG_VERSION" >&2
  fi
  if [[ "$(cargo-zigbuild --version 2>/dev/null | awk '{print $2}')" != "$ZIGBUILD_VERSION" ]]; then
    log "installing cargo-zigbuild $ZIGBUILD_VERSION (cargo install --locked)"
    cargo install --locked --quiet "cargo-zigbuild@$ZIGBUILD_VERSION" >&2
  fi
  log "image deps ready: musl targets, musl-gcc, zig $ZIG_VERSION, cargo-zigbuild $ZIGBUILD_VERSION"
}

case "${1:-}" in
  helm) cmd_helm ;;
  prometheus) cmd_prometheus prometheus ;;
  promtool) cmd_prometheus promtool ;;
  image-deps) cmd_image_deps ;;
  all) cmd_helm; cmd_prometheus prometheus; cmd_image_deps ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
    ;;
esac
