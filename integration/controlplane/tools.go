//go:build tools

// Package controlplane pins the Go main packages that scripts/controlplane.sh
// builds: a real kube-apiserver, kubectl and etcd. The build tag keeps this
// file out of every normal build; `go mod tidy` still sees the imports, so
// go.mod and go.sum pin the whole dependency graph.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
