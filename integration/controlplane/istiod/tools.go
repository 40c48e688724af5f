//go:build tools

// Package istiod pins istiod (pilot-discovery). It is a separate module
// because Istio's dependency graph (k8s.io/* v0.36) differs from the one
// kube-apiserver v1.37 needs (k8s.io/* v0.37).
package istiod

import (
	_ "istio.io/istio/pilot/cmd/pilot-discovery"
)
