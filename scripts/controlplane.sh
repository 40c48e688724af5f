#!/usr/bin/env bash
# Build (and cache) a real Kubernetes control plane and istiod from their Go
# modules, pinned by integration/controlplane/{go.mod,go.sum} and
# integration/controlplane/istiod/{go.mod,go.sum}.
#
#   scripts/controlplane.sh build [NAME...]
#                                   build whatever is missing (all four, or
#                                   just NAME: etcd, kube-apiserver, kubectl,
#                                   pilot-discovery), print where
#   scripts/controlplane.sh env     print shell exports of the binary paths
#                                   (eval "$(scripts/controlplane.sh env)")
#   scripts/controlplane.sh paths   print "name path" for every binary
#
# Binaries go to ${XDG_CACHE_HOME:-$HOME/.cache}/envlane/controlplane/<key>/bin,
# one <key> per Go module: a hash of that module's go.mod and go.sum, the Go
# version, the target platform and this script's build flags. A warm rerun
# only checks that the files are there. Nothing is written inside the repo.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cp_dir="$here/integration/controlplane"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/envlane/controlplane"

# The release each module pins; used for the version strings the binaries
# report (kube-apiserver's /version, istiod's build info).
KUBE_VERSION="v1.37.2"
ISTIO_VERSION="1.31-dev"
ISTIO_REVISION="eed52ebb66ad"

# name|module dir|package|extra -ldflags
binaries=(
  "etcd|.|go.etcd.io/etcd/server/v3|"
  "kube-apiserver|.|k8s.io/kubernetes/cmd/kube-apiserver|kube"
  "kubectl|.|k8s.io/kubernetes/cmd/kubectl|kube"
  "pilot-discovery|istiod|istio.io/istio/pilot/cmd/pilot-discovery|istio"
)

ldflags_for() {
  case "$1" in
    kube)
      local major minor v
      v="${KUBE_VERSION#v}"
      major="${v%%.*}"
      minor="${v#*.}"
      minor="${minor%%.*}"
      local x
      for x in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        printf -- '-X %s.gitVersion=%s -X %s.gitMajor=%s -X %s.gitMinor=%s -X %s.gitTreeState=clean ' \
          "$x" "$KUBE_VERSION" "$x" "$major" "$x" "$minor" "$x"
      done
      ;;
    istio)
      local p=istio.io/istio/pkg/version
      printf -- '-X %s.buildVersion=%s -X %s.buildGitRevision=%s -X %s.buildStatus=Clean -X %s.buildTag=%s -X %s.buildOS=%s -X %s.buildArch=%s ' \
        "$p" "$ISTIO_VERSION" "$p" "$ISTIO_REVISION" "$p" "$p" "$ISTIO_VERSION" \
        "$p" "$(go env GOOS)" "$p" "$(go env GOARCH)"
      ;;
  esac
  printf -- '-s -w'
}

build_flags() {
  echo "-trimpath -mod=readonly -buildvcs=false"
}

# Cache key of one module dir: go.mod + go.sum + toolchain + platform + flags.
module_key() {
  local dir="$cp_dir/$1"
  {
    cat "$dir/go.mod" "$dir/go.sum"
    go env GOVERSION GOOS GOARCH
    build_flags
    echo "$KUBE_VERSION $ISTIO_VERSION $ISTIO_REVISION"
  } | sha256sum | cut -c1-16
}

bin_dir() {
  echo "$cache_root/$(module_key "$1")/bin"
}

require_go() {
  command -v go >/dev/null || { echo "controlplane.sh: go not found on PATH" >&2; exit 1; }
}

cmd_build() {
  require_go
  local entry name mod pkg ld dir out start end want=" $* "
  for entry in "${binaries[@]}"; do
    IFS='|' read -r name mod pkg ld <<<"$entry"
    [[ $# -eq 0 || "$want" == *" $name "* ]] || continue
    dir="$(bin_dir "$mod")"
    out="$dir/$name"
    if [[ -x "$out" ]]; then
      echo "controlplane.sh: $name cached: $out" >&2
      continue
    fi
    mkdir -p "$dir"
    echo "controlplane.sh: building $name ($pkg) ..." >&2
    start=$(date +%s)
    (
      cd "$cp_dir/$mod"
      # GOFLAGS from the caller (e.g. -buildvcs=false) are kept; ours follow.
      CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} $(build_flags)" \
        go build -ldflags "$(ldflags_for "$ld")" -o "$out.tmp" "$pkg"
    )
    mv -f "$out.tmp" "$out"
    end=$(date +%s)
    echo "$name $((end - start))s $(date -u +%Y-%m-%dT%H:%M:%SZ) $(go env GOVERSION)" >>"$dir/build-times.txt"
    echo "controlplane.sh: built $name in $((end - start))s" >&2
  done
  cmd_paths
}

cmd_paths() {
  local entry name mod pkg ld
  for entry in "${binaries[@]}"; do
    IFS='|' read -r name mod pkg ld <<<"$entry"
    echo "$name $(bin_dir "$mod")/$name"
  done
}

# ENVLANE_ETCD, ENVLANE_KUBE_APISERVER, ENVLANE_KUBECTL, ENVLANE_PILOT_DISCOVERY
cmd_env() {
  require_go
  local name path var missing=0
  while read -r name path; do
    var="ENVLANE_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    [[ -x "$path" ]] || { echo "controlplane.sh: $name not built yet (run: scripts/controlplane.sh build)" >&2; missing=1; }
    printf 'export %s=%q\n' "$var" "$path"
  done < <(cmd_paths)
  return "$missing"
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  env) cmd_env ;;
  paths) require_go; cmd_paths ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
    ;;
esac
