#!/usr/bin/env bash
# Runs a command in a private network namespace (unprivileged: a user
# namespace maps the caller to root inside it) whose loopback also owns
# 10.244.0.0/16, the Pod IPs of the e2e suite: EndpointSlices refuse
# loopback addresses, so Pods get 10.244.x.y, and the test apps and Envoys
# listen there. Nothing outside the namespace can reach, or is touched by,
# what runs inside.
set -euo pipefail
if [ "${ENVLANE_IN_NETNS:-}" = 1 ]; then
  ip link set lo up
  ip route add local 10.244.0.0/16 dev lo
  exec "$@"
fi
ENVLANE_IN_NETNS=1 exec unshare --user --map-root-user --net -- "$0" "$@"
