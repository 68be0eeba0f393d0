#!/usr/bin/env bash
# Builds the two sandbox images with no container daemon and pushes them to a
# plain-HTTP registry:
#   tools/images/build-sandbox-images.sh [CLAUDE_DIR]
#   sandbox-minimal: Debian's busybox-static (sh and the usual applets), a passwd with
#                    root, nonroot and E2B's user (uid 1000, /home/user); about 1 MB.
#   sandbox-full:    a Debian 12 root from mmdebstrap (the Essential set: bash, coreutils,
#                    dpkg, ...) plus git, python3, nodejs, ca-certificates and procps,
#                    and E2B's user (uid 1000, /home/user),
#                    with an empty /opt/claude-code for the Claude Code CLI. Given
#                    CLAUDE_DIR (an installed CLI, as tools/install-claude.sh leaves it),
#                    a last layer copies it there and links /usr/local/bin/claude.
# Pushes to $REGISTRY (default 127.0.0.1:5000) with tag $TAG (default latest) and prints
# each pushed reference with its digest. PUSH=0 only builds. The Debian layers are
# cached under the cache directory by their package lists; REBUILD=1 remakes them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

claude_dir=${1:-}
registry=${REGISTRY:-127.0.0.1:5000}
tag=${TAG:-latest}
[ "${REBUILD:-0}" = 1 ] && rm -rf "$images_cache/layers"/sandbox-*
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$images_cache/oci"

# --- minimal --------------------------------------------------------------------------
busybox=$(debs_layer sandbox-busybox busybox-static)
minimal_key=$({ basename "$busybox"; cat "$here/lib.sh" "$0"; } | sha256sum | cut -c1-12)
minimal_layer="$images_cache/layers/sandbox-minimal-$minimal_key.tar"
if [ ! -f "$minimal_layer" ]; then
  mkdir "$work/minimal"
  tar -C "$work/minimal" -xf "$busybox"
  # One link per applet, where busybox itself says each belongs.
  for applet in $("$work/minimal/bin/busybox" --list-full); do
    [ -e "$work/minimal/$applet" ] && continue
    mkdir -p "$work/minimal/$(dirname "$applet")"
    ln -s /bin/busybox "$work/minimal/$applet"
  done
  passwd_files "$work/minimal"
  sandbox_user "$work/minimal"
  layer_tar "$work/minimal" "$minimal_layer"
fi
oci_build "$images_cache/oci/sandbox-minimal" "$tag" "$minimal_layer" -- \
  --config.env=PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin --config.cmd=/bin/sh
img_log "built sandbox-minimal:$tag"

# --- full -----------------------------------------------------------------------------
packages=git,python3,nodejs,ca-certificates,procps
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=http://deb.debian.org/debian
# The root's account layout is part of the key: "user" (uid 1000) as in E2B's images.
accounts="user:1000:/home/user"
key=$(printf '%s\n' "$packages" "$accounts" "$(cat "$sources" 2>/dev/null || echo "$sources")" | sha256sum | cut -c1-12)
full_layer="$images_cache/layers/sandbox-full-$key.tar"
if [ ! -f "$full_layer" ]; then
  img_log "mmdebstrap bookworm with $packages (about a minute)"
  # shellcheck disable=SC2016 # the hook's $1 is mmdebstrap's, not ours
  mmdebstrap --quiet --variant=essential --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='mkdir -p "$1/opt/claude-code"' \
    --customize-hook='echo "user:x:1000:1000:user:/home/user:/bin/bash" >>"$1/etc/passwd"' \
    --customize-hook='echo "user:x:1000:" >>"$1/etc/group"' \
    --customize-hook='install -d -o 1000 -g 1000 "$1/home/user"' \
    --format=tar bookworm "$work/full.tar" "$sources" >&2
  mv "$work/full.tar" "$full_layer"
fi
full_layers=("$full_layer")
if [ -n "$claude_dir" ]; then
  [ -d "$claude_dir" ] || { echo "build-sandbox-images.sh: no such directory: $claude_dir" >&2; exit 1; }
  claude_key=$(cd "$claude_dir" && find . -printf '%P %s %T@ %l\n' | sort | sha256sum | cut -c1-12)
  claude_layer="$images_cache/layers/sandbox-claude-$claude_key.tar"
  if [ ! -f "$claude_layer" ]; then
    rm -f "$images_cache/layers"/sandbox-claude-*.tar
    mkdir -p "$work/claude/opt" "$work/claude/usr/local/bin"
    cp -a "$claude_dir" "$work/claude/opt/claude-code"
    if [ -e "$work/claude/opt/claude-code/node_modules/.bin/claude" ]; then
      ln -s /opt/claude-code/node_modules/.bin/claude "$work/claude/usr/local/bin/claude"
    elif [ -e "$work/claude/opt/claude-code/bin/claude" ]; then
      ln -s /opt/claude-code/bin/claude "$work/claude/usr/local/bin/claude"
    fi
    layer_tar "$work/claude" "$claude_layer"
  fi
  full_layers+=("$claude_layer")
fi
oci_build "$images_cache/oci/sandbox-full" "$tag" "${full_layers[@]}" -- \
  --config.env=PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin \
  --config.env=LANG=C.UTF-8 --config.cmd=/bin/bash
img_log "built sandbox-full:$tag"

if [ "${PUSH:-1}" != 0 ]; then
  oci_push "$images_cache/oci/sandbox-minimal" "$tag" "$registry/sandbox-minimal:$tag"
  oci_push "$images_cache/oci/sandbox-full" "$tag" "$registry/sandbox-full:$tag"
fi
