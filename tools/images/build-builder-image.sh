#!/usr/bin/env bash
# Builds the template builder image with no container daemon and pushes it to a
# plain-HTTP registry:
#   tools/images/build-builder-image.sh
# The image holds kaniko's executor and nothing else a build could trample: kaniko
# unpacks the base image into its own container's root filesystem (deleting what was
# there, except /kaniko, mounts and its ignore list), so the executor, its CA bundle and
# its registry config all live under /kaniko, as in upstream's kaniko-executor image
# (without the cloud credential helpers):
#   /kaniko/executor                   kaniko's executor, pinned in tools/images/kaniko/go.mod
#                                      (a `tool` line, go.sum), static (CGO_ENABLED=0),
#                                      cached under the cache directory by version and Go
#   /kaniko/ssl/certs/ca-certificates.crt  Debian's CA bundle (SSL_CERT_DIR points here)
#   /kaniko/.docker/                   DOCKER_CONFIG: mount a config.json here for auth
#   /etc/nsswitch.conf, /workspace     as upstream; WORKDIR /workspace
#   user 0:0, ENTRYPOINT /kaniko/executor, HOME=/root, PATH=/usr/local/bin:/kaniko
# Pushes to $REGISTRY (default 127.0.0.1:5000) as sandcastle-builder:<kaniko version>
# (TAG overrides) and prints the pushed reference with its digest. PUSH=0 only builds.
# How the image is run as a Job: tools/node/README.md, "Template image builds".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

registry=${REGISTRY:-127.0.0.1:5000}
module=github.com/GoogleContainerTools/kaniko
export GOTOOLCHAIN=local CGO_ENABLED=0
# go.sum is committed; when the checksum database cannot be reached the module is
# still verified against it.
if ! (cd "$here/kaniko" && timeout 10 go mod download -json "$module" >/dev/null 2>&1); then
  export GONOSUMDB='*' GOSUMDB=off
fi
version=$(cd "$here/kaniko" && go list -m -f '{{.Version}}' "$module")
go_version=$(go env GOVERSION)
tag=${TAG:-$version}

# --- the executor ---------------------------------------------------------------------
cache_root=${SANDCASTLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandcastle}
bin_dir="$cache_root/kaniko-$version-$go_version"
mkdir -p "$bin_dir"
if [ ! -x "$bin_dir/executor" ]; then
  img_log "building kaniko executor $version with $go_version into $bin_dir (1-2 min)"
  # -mod=readonly: never touch the committed go.mod/go.sum. The version variable is the
  # one kaniko's Makefile sets (`executor version` prints it).
  (cd "$here/kaniko" && go build -mod=readonly -trimpath \
    -ldflags "-s -w -X $module/pkg/version.version=$version" \
    -o "$bin_dir/executor.partial" "$module/cmd/executor") >&2
  mv "$bin_dir/executor.partial" "$bin_dir/executor"
fi

# --- the image ------------------------------------------------------------------------
certs=$(debs_layer builder-certs ca-certificates)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/kaniko/ssl/certs" "$root/kaniko/.docker" "$root/etc" "$root/workspace" "$root/root"
chmod 700 "$root/root"
tar -C "$work" -xf "$certs" ./etc/ssl/certs/ca-certificates.crt
install -m 0644 "$work/etc/ssl/certs/ca-certificates.crt" "$root/kaniko/ssl/certs/ca-certificates.crt"
install -m 0755 "$bin_dir/executor" "$root/kaniko/executor"
cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd:         files
group:          files
hosts:          files dns
EOF
chown -R 0:0 "$root"
# A stable layer (fixed times) so an unchanged executor gives the same digest.
find "$root" -exec touch -h -d @0 {} +
layer_tar "$root" "$work/builder.tar"
layer="$images_cache/layers/builder-$version-$(sha256sum "$work/builder.tar" | cut -c1-16).tar"
[ -f "$layer" ] || mv "$work/builder.tar" "$layer"

layout="$images_cache/oci/sandcastle-builder"
mkdir -p "$(dirname "$layout")"
oci_build "$layout" "$tag" "$layer" -- \
  --config.user=0:0 --config.workingdir=/workspace \
  --config.entrypoint=/kaniko/executor \
  --config.env=HOME=/root --config.env=USER=root \
  --config.env=PATH=/usr/local/bin:/kaniko \
  --config.env=SSL_CERT_DIR=/kaniko/ssl/certs \
  --config.env=DOCKER_CONFIG=/kaniko/.docker/ \
  --config.label=org.opencontainers.image.title=sandcastle-builder \
  --config.label="org.opencontainers.image.version=$version" \
  --config.label="org.opencontainers.image.description=kaniko executor $version ($module), built with $go_version"
img_log "built sandcastle-builder:$tag (kaniko $version) in $layout"
if [ "${PUSH:-1}" != 0 ]; then
  oci_push "$layout" "$tag" "$registry/sandcastle-builder:$tag"
fi
