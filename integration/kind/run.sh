#!/usr/bin/env bash
# envlane end to end on kind: local registry, Istio, envlane (kustomize), a
# demo namespace with two envs of one service, curl with and without the env
# header, the debug header, the counters, then (unless KEEP=1) tear down.
#
#   integration/kind/run.sh            # build images, create everything, test, delete the cluster
#   KEEP=1 integration/kind/run.sh     # keep the cluster to play with (kind delete cluster --name envlane)
#
# Needs Docker, kind, kubectl, curl, internet access (Istio, container images),
# and one of skopeo / crane / oras to push the OCI layouts. istioctl is
# downloaded when missing (ISTIO_VERSION, default below).
#
# CI does not run this: the build machine has neither Docker nor internet.
# The same steps, by hand, are in docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-envlane}
ISTIO_VERSION=${ISTIO_VERSION:-1.28.0}
REG_NAME=${REG_NAME:-kind-registry}
REG_PORT=${REG_PORT:-5001}
NS=${NS:-envlane-demo}
WORK=$(mktemp -d)
KEEP=${KEEP:-0}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required"; }

cleanup() {
  rm -rf "$WORK"
  if [ "$KEEP" != 1 ]; then
    log "deleting kind cluster $CLUSTER and registry $REG_NAME (KEEP=1 keeps them)"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    docker rm -f "$REG_NAME" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

for tool in docker kind kubectl curl python3; do need "$tool"; done

# ---------------------------------------------------------------- build
log "building the filter, envlane-sync and their OCI images"
./build.sh
scripts/images.sh
[ -f dist/oci/envlane-sync/index.json ] || die "no envlane-sync image (is sync/ in this tree?)"

# ---------------------------------------------------------------- registry + cluster
if [ "$(docker inspect -f '{{.State.Running}}' "$REG_NAME" 2>/dev/null || true)" != true ]; then
  log "starting local registry $REG_NAME on localhost:$REG_PORT"
  docker run -d --restart=always -p "127.0.0.1:$REG_PORT:5000" --name "$REG_NAME" registry:2 >/dev/null
fi
if ! kind get clusters | grep -qx "$CLUSTER"; then
  log "creating kind cluster $CLUSTER"
  cat >"$WORK/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
containerdConfigPatches:
- |-
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
EOF
  kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --wait 120s
  # Nodes pull localhost:$REG_PORT/... from the registry container over the kind network.
  for node in $(kind get nodes --name "$CLUSTER"); do
    docker exec "$node" mkdir -p "/etc/containerd/certs.d/localhost:$REG_PORT"
    printf '[host."http://%s:5000"]\n' "$REG_NAME" | docker exec -i "$node" cp /dev/stdin "/etc/containerd/certs.d/localhost:$REG_PORT/hosts.toml"
  done
fi
docker network connect kind "$REG_NAME" 2>/dev/null || true
kubectl config use-context "kind-$CLUSTER" >/dev/null

# ---------------------------------------------------------------- push (digests preserved)
push() { # push LAYOUT_DIR TAG DEST_REPO
  local layout=$1 tag=$2 dest=$3
  if command -v skopeo >/dev/null; then
    skopeo copy -q --preserve-digests --dest-tls-verify=false "oci:$layout:$tag" "docker://$dest:$tag"
  elif command -v crane >/dev/null; then
    crane push --insecure "$layout" "$dest:$tag"
  elif command -v oras >/dev/null; then
    oras cp --to-plain-http --from-oci-layout "$layout:$tag" "$dest:$tag"
  else
    die "need skopeo, crane or oras to push OCI layouts"
  fi
}
VERSION=$(python3 -c 'import json; print(json.load(open("wasm-plugin-manifests/pins.json"))["version"])')
log "pushing images to localhost:$REG_PORT"
push dist/oci/envlane-filter "$VERSION" "localhost:$REG_PORT/envlane-filter"
push dist/oci/envlane-sync "$VERSION" "localhost:$REG_PORT/envlane-sync"

# ---------------------------------------------------------------- Istio
if ! command -v istioctl >/dev/null; then
  log "downloading istioctl $ISTIO_VERSION"
  (cd "$WORK" && curl -sSL https://istio.io/downloadIstio | ISTIO_VERSION="$ISTIO_VERSION" sh - >/dev/null)
  export PATH="$WORK/istio-$ISTIO_VERSION/bin:$PATH"
fi
log "installing Istio (minimal profile)"
istioctl install -y --set profile=minimal >/dev/null
kubectl -n istio-system rollout status deploy/istiod --timeout=180s

# ---------------------------------------------------------------- envlane
# The committed base, with the images from the local registry: digests are
# unchanged (pushed with preserved digests), only the repository differs.
# Pods pull the filter from inside the cluster: the registry container's name.
log "installing envlane (kubectl apply -k, images from the local registry)"
mkdir -p "$WORK/overlay"
cp -r wasm-plugin-manifests "$WORK/manifests"
FILTER_SHA=$(python3 -c 'import json; print(json.load(open("wasm-plugin-manifests/pins.json"))["filter"]["digest"].split(":")[1])')
cat >"$WORK/overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- ../manifests/base
images:
- name: ghcr.io/envlane/envlane-sync
  newName: localhost:$REG_PORT/envlane-sync
patches:
- target: {kind: Deployment, name: envlane-sync}
  patch: |-
    - op: replace
      path: /spec/template/spec/containers/0/args/3
      value: --wasm-url=oci://$REG_NAME:5000/envlane-filter:$VERSION
EOF
rendered=$(kubectl kustomize "$WORK/overlay")
grep -q -- "--wasm-sha256=$FILTER_SHA" <<<"$rendered" || die "overlay lost the pinned sha256"
grep -q -- "--wasm-url=oci://$REG_NAME:5000/envlane-filter:$VERSION" <<<"$rendered" || die "overlay did not set --wasm-url"
kubectl apply -k "$WORK/overlay"
kubectl -n envlane-system rollout status deploy/envlane-sync --timeout=180s

log "opting namespace $NS in"
cp -r wasm-plugin-manifests/overlays/namespace "$WORK/ns"
(cd "$WORK/ns" && sed -i "s/^namespace: .*/namespace: $NS/" kustomization.yaml)
kubectl apply -k "$WORK/ns"

# ---------------------------------------------------------------- demo apps
log "deploying the demo: service go with envs dev and dev.proj1, and a client in env dev"
kubectl apply -n "$NS" -f - <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: go, labels: {app: go}}
spec:
  selector: {app: go}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: go-dev}
spec:
  selector: {matchLabels: {app: go, virtual-env: dev}}
  template:
    metadata: {labels: {app: go, virtual-env: dev}}
    spec:
      containers:
      - {name: echo, image: hashicorp/http-echo:1.0, args: ["-listen=:8080", "-text=go dev"], ports: [{containerPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: go-dev-proj1}
spec:
  selector: {matchLabels: {app: go, virtual-env: dev.proj1}}
  template:
    metadata: {labels: {app: go, virtual-env: dev.proj1}}
    spec:
      containers:
      - {name: echo, image: hashicorp/http-echo:1.0, args: ["-listen=:8080", "-text=go dev.proj1"], ports: [{containerPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client, virtual-env: dev}}
    spec:
      containers:
      - {name: curl, image: curlimages/curl:8.10.1, command: ["sleep", "infinity"]}
EOF
for d in go-dev go-dev-proj1 client; do kubectl -n "$NS" rollout status "deploy/$d" --timeout=180s; done

log "waiting for envlane-sync to publish the table"
for _ in $(seq 60); do
  if kubectl -n "$NS" get wasmplugin envlane -o jsonpath='{.spec.pluginConfig.services}' 2>/dev/null | grep -q go.; then break; fi
  sleep 2
done
kubectl -n "$NS" get wasmplugin envlane >/dev/null || die "envlane-sync did not create the WasmPlugin"
kubectl -n "$NS" get destinationrule envlane-go >/dev/null || die "envlane-sync did not create DestinationRule envlane-go"

call() { kubectl -n "$NS" exec deploy/client -c curl -- curl -sS --max-time 5 "$@" http://go:8080/; }
expect() { # expect WANT CURL_ARGS...
  local want=$1 got
  shift
  for _ in $(seq 30); do # the filter loads asynchronously (image pull): retry a while
    got=$(call "$@" || true)
    [ "$got" = "$want" ] && { echo "ok   $* -> $got"; return 0; }
    sleep 2
  done
  die "curl $* gave '$got', want '$want'"
}

# ---------------------------------------------------------------- checks
log "routing"
expect "go dev.proj1" -H "x-virtual-env: dev.proj1"
expect "go dev.proj1" -H "x-virtual-env: dev.proj1.user1"   # falls back one level
expect "go dev"       -H "x-virtual-env: dev.proj2"         # falls back to dev
expect "go dev"                                             # no header: the client's own env (label)

log "debug header"
kubectl -n "$NS" exec deploy/client -c curl -- curl -sS -o /dev/null -D - \
  -H "x-envlane-debug: 1" -H "x-virtual-env: dev.proj1.user1" http://go:8080/ | grep -i '^x-envlane-decision:' \
  || die "no x-envlane-decision header"

log "counters (client sidecar)"
kubectl -n "$NS" exec deploy/client -c istio-proxy -- pilot-agent request GET stats | grep 'wasmcustom.envlane' \
  || die "no wasmcustom.envlane counters"

log "envlane-sync metrics"
kubectl -n envlane-system port-forward svc/envlane-sync-metrics 19090:9090 >/dev/null 2>&1 &
pf=$!
sleep 2
curl -sf http://127.0.0.1:19090/metrics | head -20 || die "no /metrics"
kill "$pf" 2>/dev/null || true

log "all checks passed"
