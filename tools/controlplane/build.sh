#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd from the modules pinned in
# go.mod into a cache directory stamped with their versions and the Go version, and
# prints that directory. Only binaries missing from the cache are built, so a warm
# cache skips the build entirely.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

# Never let go fetch another toolchain; the pinned modules declare go 1.26.0.
export GOTOOLCHAIN=local
# The checksum database is sometimes unreachable from build machines; go.sum is
# committed, so the modules are verified against it either way.
if ! timeout 10 go mod download -json go.etcd.io/etcd/server/v3 >/dev/null 2>&1; then
  export GONOSUMDB='*' GOSUMDB=off
fi

k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
etcd_version=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
go_version=$(go env GOVERSION)
cache_root=${SANDCASTLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandcastle}
out="$cache_root/controlplane-k8s-$k8s_version-etcd-$etcd_version-$go_version"

mkdir -p "$out"
minor=${k8s_version#v1.}; minor=${minor%%.*}
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean"
# Each binary is built beside its final name and renamed into place, so an interrupted
# build never leaves a binary that looks complete.
build() {
  local name=$1 flags=$2 package=$3
  [[ -x "$out/$name" ]] && return
  echo "building $name with $go_version into $out" >&2
  go build -trimpath -ldflags "$flags" -o "$out/$name.partial" "$package" >&2
  mv "$out/$name.partial" "$out/$name"
}
build kube-apiserver "$ldflags" k8s.io/kubernetes/cmd/kube-apiserver
# Only the reliability suite runs it, for the namespace and garbage-collector controllers.
build kube-controller-manager "$ldflags" k8s.io/kubernetes/cmd/kube-controller-manager
build etcd "-s -w" go.etcd.io/etcd/server/v3
echo "$out"
