# shellcheck shell=bash
# Helpers for building OCI images with no container daemon: root filesystems are
# assembled in plain directories (files from Debian packages unpacked with dpkg-deb),
# each becomes an uncompressed tar layer, umoci writes the OCI image layout (it gzips
# the layers and writes config, manifest and index), skopeo pushes the layout to a
# registry. Sourced by build-operator-image.sh, build-sandbox-images.sh and
# tools/node/build.sh. Needs: umoci, skopeo, tar, dpkg-deb, apt-get (install-packages.sh).

images_cache=${SANDCASTLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandcastle}/images
mkdir -p "$images_cache"

img_log() { echo "images: $*" >&2; }

# layer_tar DIR OUT: writes an uncompressed tar of DIR's contents (sorted, numeric
# owners as they are on disk, no atime/ctime) to OUT, atomically.
layer_tar() {
  local dir=$1 out=$2
  tar --sort=name --numeric-owner --format=gnu -C "$dir" -cf "$out.partial" .
  mv "$out.partial" "$out"
}

# deb_uris PKG...: prints "filename sha256" for each package apt would download for
# these names (the candidate versions; dependencies are NOT added). Refreshes the
# package lists once when apt does not know a name.
deb_uris() {
  local out
  if ! out=$(apt-get download --print-uris "$@" 2>/dev/null) || [ -z "$out" ]; then
    apt-get update -qq >&2
    out=$(apt-get download --print-uris "$@")
  fi
  # 'URI' FILENAME SIZE SHA256:HEX
  awk '{print $2, $4}' <<<"$out"
}

# debs_layer NAME PKG...: a layer tar holding the files of the given Debian packages
# (unpacked with dpkg-deb, maintainer scripts not run), cached by the packages' exact
# file names and hashes. Prints the tar's path.
debs_layer() {
  local name=$1; shift
  local key dir tmp
  key=$(deb_uris "$@" | sha256sum | cut -c1-16)
  dir="$images_cache/layers"
  mkdir -p "$dir"
  local out="$dir/$name-$key.tar"
  if [ ! -f "$out" ]; then
    tmp=$(mktemp -d "$dir/.debs.XXXXXX")
    img_log "downloading ${*}"
    (cd "$tmp" && apt-get download -qq "$@" >/dev/null 2>&1) ||
      (cd "$tmp" && apt-get download "$@" >&2)
    mkdir "$tmp/root"
    local deb
    for deb in "$tmp"/*.deb; do
      dpkg-deb -x "$deb" "$tmp/root"
    done
    rm -rf "$tmp/root/usr/share/doc" "$tmp/root/usr/share/man" "$tmp/root/usr/share/lintian" \
      "$tmp/root/usr/share/locale" "$tmp/root/usr/share/info"
    # ca-certificates ships the certificates; its postinst (update-ca-certificates) would
    # concatenate them into the bundle every TLS library looks for. Do that here.
    if [ -d "$tmp/root/usr/share/ca-certificates" ]; then
      mkdir -p "$tmp/root/etc/ssl/certs"
      find "$tmp/root/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z |
        xargs -0 cat >"$tmp/root/etc/ssl/certs/ca-certificates.crt"
    fi
    layer_tar "$tmp/root" "$out"
    rm -rf "$tmp"
  fi
  echo "$out"
}

# oci_build LAYOUT TAG LAYER_TAR... -- UMOCI_CONFIG_ARG...: writes a fresh OCI layout
# at LAYOUT holding one image tagged TAG with the given layers (bottom first) and
# config (umoci config flags, e.g. --config.user=65532:65532). Atomic: LAYOUT appears
# only when complete. Returns at once when LAYOUT was built from the same inputs.
oci_build() {
  local layout=$1 tag=$2; shift 2
  local layers=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do layers+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  # A layout built from the same layers (path, size, time) and config is reused as is.
  local key
  key=$( { printf '%s\n' "$tag" "$@"; stat -c '%n %s %Y' "${layers[@]}"; } | sha256sum | cut -d' ' -f1)
  if [ -d "$layout" ] && [ "$(cat "$layout.key" 2>/dev/null)" = "$key" ]; then
    return 0
  fi
  rm -rf "$layout.partial" "$layout.key"
  umoci init --layout "$layout.partial"
  umoci new --image "$layout.partial:$tag"
  local layer
  for layer in "${layers[@]}"; do
    umoci raw add-layer --image "$layout.partial:$tag" \
      --history.created_by "sandcastle tools/images: $(basename "$layer")" "$layer"
  done
  if [ $# -gt 0 ]; then
    umoci config --image "$layout.partial:$tag" --history.created_by "sandcastle tools/images: config" "$@"
  fi
  # umoci new leaves unreferenced blobs of the intermediate configs; drop them.
  umoci gc --layout "$layout.partial"
  rm -rf "$layout"
  mv "$layout.partial" "$layout"
  echo "$key" >"$layout.key"
}

# oci_push LAYOUT TAG REF: copies the image to a plain-HTTP registry (REF is
# host:port/name:tag) and prints REF@digest.
oci_push() {
  local layout=$1 tag=$2 ref=$3 digestfile
  digestfile=$(mktemp)
  skopeo copy --quiet --dest-tls-verify=false --digestfile "$digestfile" \
    "oci:$layout:$tag" "docker://$ref" >&2
  echo "$ref@$(cat "$digestfile")"
  rm -f "$digestfile"
}

# sandbox_user DIR: adds E2B's sandbox account, user (uid 1000) with its home
# /home/user, to a root that passwd_files made: sandbox pods run as this uid.
sandbox_user() {
  local dir=$1
  mkdir -p "$dir/home/user"
  chown 1000:1000 "$dir/home/user"
  echo 'user:x:1000:1000:user:/home/user:/bin/sh' >>"$dir/etc/passwd"
  echo 'user:x:1000:' >>"$dir/etc/group"
}

# passwd_files DIR: /etc/passwd, /etc/group with root and nonroot (65532, as in
# distroless), a /tmp and the nonroot home.
passwd_files() {
  local dir=$1
  mkdir -p "$dir/etc" "$dir/tmp" "$dir/home/nonroot" "$dir/root"
  chmod 1777 "$dir/tmp"
  chmod 700 "$dir/root"
  chown 65532:65532 "$dir/home/nonroot"
  cat >"$dir/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$dir/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
EOF
}
