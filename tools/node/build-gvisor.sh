#!/usr/bin/env bash
# Builds what a node needs to run pods under gVisor, into a cache directory stamped
# with the versions, and prints that directory (tools/node/up.sh takes it as
# NODE_GVISOR_BIN):
#   containerd, containerd-shim-runc-v2, ctr  containerd v2 from its Go module: gVisor's
#                                             shim speaks v2's start handshake, which
#                                             Debian's containerd 1.6 rejects;
#   runsc, containerd-shim-runsc-v1           gVisor from its Go module (the `go` branch,
#                                             pinned below). runsc is linked statically:
#                                             its sandbox re-executes itself inside a
#                                             chroot that has no dynamic loader.
# The shim sets its own oom_score_adj to -999, which needs CAP_SYS_RESOURCE; these VMs
# lack it, so the build patches that one call to go on after EPERM, as containerd's CRI
# does for runc with restrict_oom_score_adj. Nothing else is changed.
# A warm cache is a no-op; files are renamed into place once complete.
set -euo pipefail
containerd_version=v2.4.2
gvisor_version=v0.0.0-20260905035102-160fafc42237

export GOTOOLCHAIN=local
if ! timeout 10 go mod download -json "github.com/containerd/containerd/v2@$containerd_version" >/dev/null 2>&1; then
  export GONOSUMDB='*' GOSUMDB=off
fi
cache_root=${SANDCASTLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandcastle}
out="$cache_root/gvisor-$gvisor_version-containerd-$containerd_version-$(go env GOVERSION)"
if [ -x "$out/runsc" ] && [ -x "$out/containerd-shim-runsc-v1" ] && [ -x "$out/containerd" ]; then
  echo "$out"
  exit 0
fi
work=$(mktemp -d)
trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
mkdir -p "$work/bin"

echo "building containerd $containerd_version" >&2
GOBIN="$work/bin" go install -trimpath -ldflags "-s -w" \
  "github.com/containerd/containerd/v2/cmd/containerd@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/ctr@$containerd_version" >&2

echo "building gVisor $gvisor_version" >&2
source_dir=$(go mod download -json "gvisor.dev/gvisor@$gvisor_version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$source_dir" ] || { echo "build-gvisor.sh: gvisor.dev/gvisor@$gvisor_version did not download" >&2; exit 1; }
cp -r "$source_dir" "$work/gvisor"
chmod -R u+w "$work/gvisor"
manager="$work/gvisor/pkg/shim/v1/manager.go"
call='if err := sys.SetOOMScore(cmd.Process.Pid, oomScoreMax); err != nil {'
grep -qF "$call" "$manager" || { echo "build-gvisor.sh: the shim's oom_score_adj call moved; revisit the patch" >&2; exit 1; }
sed -i "s|$call|if err := sys.SetOOMScore(cmd.Process.Pid, oomScoreMax); err != nil \&\& !errors.Is(err, os.ErrPermission) {|; s|^\t\"context\"\$|\t\"context\"\n\t\"errors\"|" "$manager"
grep -qF 'errors.Is(err, os.ErrPermission)' "$manager" || { echo "build-gvisor.sh: the shim patch did not apply" >&2; exit 1; }
(cd "$work/gvisor" &&
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/bin/runsc" ./runsc &&
  go build -trimpath -ldflags "-s -w" -o "$work/bin/containerd-shim-runsc-v1" ./shim) >&2

rm -rf "$out.partial"
mkdir -p "$(dirname "$out")"
cp -r "$work/bin" "$out.partial"
rm -rf "$out"
mv "$out.partial" "$out"
echo "$out"
