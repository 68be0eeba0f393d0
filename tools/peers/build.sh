#!/usr/bin/env bash
# Builds the peer controller that benches/operator.rs runs beside Sandcastle:
# kubernetes-sigs/agent-sandbox's controller (with its SandboxClaim controller), pinned
# in go.mod (go.sum committed), into a cache directory with the CRDs of that release,
# and prints that directory. A warm cache skips the build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

# Never let go fetch another toolchain; the pinned module declares go 1.26.0.
export GOTOOLCHAIN=local
# The checksum database is sometimes unreachable from build machines; go.sum is
# committed, so the modules are verified against it either way.
if ! timeout 10 go mod download -json sigs.k8s.io/agent-sandbox >/dev/null 2>&1; then
  export GONOSUMDB='*' GOSUMDB=off
fi

version=$(go list -m -f '{{.Version}}' sigs.k8s.io/agent-sandbox)
cache_root=${SANDCASTLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandcastle}
out="$cache_root/peer-agent-sandbox-$version-$(go env GOVERSION)"
if [[ -x "$out/agent-sandbox-controller" ]]; then
  echo "$out"
  exit 0
fi

echo "building agent-sandbox-controller $version into $out" >&2
rm -rf "$out.partial"
mkdir -p "$out.partial"
go build -trimpath -ldflags "-s -w" -o "$out.partial/agent-sandbox-controller" \
  sigs.k8s.io/agent-sandbox/cmd/agent-sandbox-controller >&2
cp "$(go list -m -f '{{.Dir}}' sigs.k8s.io/agent-sandbox)"/k8s/crds/*.yaml "$out.partial/"
rm -rf "$out"
mv "$out.partial" "$out"
echo "$out"
