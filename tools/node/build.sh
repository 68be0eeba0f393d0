#!/usr/bin/env bash
# Builds what a local test node runs besides the control plane, into a cache directory
# stamped with the versions, and prints that directory:
#   kubelet, kube-scheduler, kube-proxy  from k8s.io/kubernetes pinned in
#                                        tools/node/k8s/go.mod: the version of
#                                        tools/controlplane/go.mod (checked here), its
#                                        own go.sum (the control plane's lacks the
#                                        kubelet's modules), the same flags, so the
#                                        control plane's build cache is shared;
#   coredns                              from github.com/coredns/coredns pinned in
#                                        tools/node/coredns/go.mod, with only the
#                                        plugins cluster DNS needs (coredns/main.go);
#   kube-router                          from github.com/cloudnativelabs/kube-router/v2
#                                        pinned in tools/node/kube-router/go.mod (a
#                                        `tool` line, no code of ours); up.sh runs only
#                                        its NetworkPolicy firewall (iptables + ipset);
#   pause, pause.tar                     the pause container built statically from the
#                                        kubernetes module's build/pause/linux/pause.c,
#                                        and its image as a docker-archive named
#                                        registry.k8s.io/pause:<version>, for
#                                        `ctr images import` (nothing can be pulled).
# Only what is missing is built, so a warm cache is a no-op. Each file is written
# beside its final name and renamed into place, so an interrupted build never leaves
# a file that looks complete.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
controlplane=$(cd "$here/../controlplane" && pwd)

export GOTOOLCHAIN=local
# go.sum files are committed; when the checksum database cannot be reached the modules
# are still verified against them.
if ! (cd "$here/coredns" && timeout 10 go mod download -json github.com/coredns/coredns >/dev/null 2>&1); then
  export GONOSUMDB='*' GOSUMDB=off
fi

k8s_version=$(cd "$here/k8s" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
controlplane_version=$(cd "$controlplane" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
if [ "$k8s_version" != "$controlplane_version" ]; then
  echo "tools/node/k8s/go.mod pins k8s.io/kubernetes $k8s_version but tools/controlplane/go.mod" \
    "pins $controlplane_version: update tools/node/k8s (copy the replace lines, go mod tidy)" >&2
  exit 1
fi
(cd "$here/k8s" && go mod download k8s.io/kubernetes)
k8s_dir=$(cd "$here/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
coredns_version=$(cd "$here/coredns" && go list -m -f '{{.Version}}' github.com/coredns/coredns)
kube_router_version=$(cd "$here/kube-router" && go list -m -f '{{.Version}}' github.com/cloudnativelabs/kube-router/v2)
pause_version=$(sed -n 's/^TAG ?= *//p' "$k8s_dir/build/pause/Makefile")
go_version=$(go env GOVERSION)
cache_root=${SANDCASTLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandcastle}
out="$cache_root/node-k8s-$k8s_version-coredns-$coredns_version-kube-router-$kube_router_version-pause-$pause_version-$go_version"
mkdir -p "$out"

minor=${k8s_version#v1.}; minor=${minor%%.*}
# The same flags as tools/controlplane/build.sh, so the shared packages come from the
# build cache the control plane left.
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean"
build() {
  local dir=$1 name=$2 flags=$3 package=$4
  [[ -x "$out/$name" ]] && return
  echo "building $name with $go_version into $out" >&2
  # -mod=readonly: never touch the committed go.mod/go.sum.
  (cd "$dir" && go build -mod=readonly -trimpath -ldflags "$flags" -o "$out/$name.partial" "$package") >&2
  mv "$out/$name.partial" "$out/$name"
}
build "$here/k8s" kubelet "$ldflags" k8s.io/kubernetes/cmd/kubelet
build "$here/k8s" kube-scheduler "$ldflags" k8s.io/kubernetes/cmd/kube-scheduler
build "$here/k8s" kube-proxy "$ldflags" k8s.io/kubernetes/cmd/kube-proxy
# The plugin set is chosen in coredns/main.go: a changed main.go or module rebuilds it.
coredns_key=$(cat "$here/coredns/main.go" "$here/coredns/go.mod" "$here/coredns/go.sum" | sha256sum | cut -c1-16)
if [ "$(cat "$out/coredns.key" 2>/dev/null)" != "$coredns_key" ]; then
  rm -f "$out/coredns"
fi
build "$here/coredns" coredns "-s -w" .
echo "$coredns_key" >"$out/coredns.key"
build "$here/kube-router" kube-router \
  "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$kube_router_version" \
  github.com/cloudnativelabs/kube-router/v2/cmd/kube-router

if [[ ! -x "$out/pause" ]]; then
  echo "building pause $pause_version into $out" >&2
  gcc -Os -Wall -Werror -static -DVERSION="v$pause_version-sandcastle" \
    -o "$out/pause.partial" "$k8s_dir/build/pause/linux/pause.c"
  strip "$out/pause.partial"
  mv "$out/pause.partial" "$out/pause"
fi
if [[ ! -f "$out/pause.tar" ]]; then
  # shellcheck source=SCRIPTDIR/../images/lib.sh
  SANDCASTLE_CACHE=$cache_root . "$here/../images/lib.sh"
  tmp=$(mktemp -d)
  mkdir "$tmp/root"
  install -m 0755 -o 0 -g 0 "$out/pause" "$tmp/root/pause"
  layer_tar "$tmp/root" "$tmp/pause-layer.tar"
  # As upstream's image: the binary alone, run as 65535.
  oci_build "$tmp/oci" "$pause_version" "$tmp/pause-layer.tar" -- \
    --config.entrypoint=/pause --config.user=65535:65535 >&2
  skopeo copy --quiet "oci:$tmp/oci:$pause_version" \
    "docker-archive:$out/pause.tar.partial:registry.k8s.io/pause:$pause_version" >&2
  rm -rf "$tmp"
  mv "$out/pause.tar.partial" "$out/pause.tar"
fi
echo "$pause_version" >"$out/pause.version"
echo "$out"
