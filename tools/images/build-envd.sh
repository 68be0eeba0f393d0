#!/usr/bin/env bash
# Builds sandcastle-envd, the envd of sandbox pods, as a static glibc binary (the musl
# target is not installable on these machines; glibc's static-pie is) and prints its path:
#   tools/images/build-envd.sh [--release]
# The build has its own --target directory, so it neither waits for nor invalidates the
# workspace's ordinary builds.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
profile=debug
flags=()
if [ "${1:-}" = --release ]; then
  profile=release
  flags=(--release)
fi
host=$(rustc -vV | sed -n 's/^host: //p')
cd "$root"
# Without debug info: every sandbox pod copies the binary, and a debug build's would be
# ten times the size.
RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" CARGO_PROFILE_DEV_DEBUG=0 cargo build --locked --quiet "${flags[@]}" \
  --target "$host" -p sandcastle-sandboxd --bin sandcastle-envd >&2
binary="${CARGO_TARGET_DIR:-$root/target}/$host/$profile/sandcastle-envd"
if readelf -d "$binary" | grep -q '(NEEDED)'; then
  echo "build-envd.sh: $binary is not statically linked" >&2
  exit 1
fi
echo "$binary"
