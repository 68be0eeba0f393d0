#!/usr/bin/env bash
# Builds the operator image with no container daemon and pushes it to a plain-HTTP
# registry:
#   tools/images/build-operator-image.sh BINARY [TAG]
# BINARY is a release build of the operator (target/release/sandcastle); ENVD_BINARY a
# static build of sandcastle-envd, placed where the Dockerfile puts it. The image is
# the Dockerfile's runtime stage rebuilt from Debian 12 packages instead of
# distroless/cc-debian12: glibc, libgcc, CA certificates, netbase, a passwd with the
# nonroot user, and the binary at the path, with the user, entrypoint, command and
# labels that the Dockerfile's last stage declares (read from the Dockerfile, so the
# two cannot drift). Pushes to $REGISTRY (default 127.0.0.1:5000) as sandcastle:TAG
# (default: the Dockerfile's VERSION) and prints the pushed reference with its digest.
# Set PUSH=0 to only build; the OCI layout is kept under the cache either way.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

binary=${1:?usage: build-operator-image.sh BINARY [TAG]}
[ -f "$binary" ] || { echo "build-operator-image.sh: no such file: $binary" >&2; exit 1; }
registry=${REGISTRY:-127.0.0.1:5000}
dockerfile=${DOCKERFILE:-$root/Dockerfile}

# What the runtime stage declares: the binary's path, USER, ENTRYPOINT, CMD, LABELs
# (with ARG defaults substituted). One "key<TAB>value" per line; exec-form lists are
# kept as JSON.
declared=$(python3 - "$dockerfile" <<'EOF'
import json, re, shlex, sys
lines, cur = [], ""
for raw in open(sys.argv[1]):
    line = raw.rstrip("\n")
    if not cur and line.lstrip().startswith("#"):
        continue
    if line.endswith("\\"):
        cur += line[:-1] + " "
        continue
    cur += line
    if cur.strip():
        lines.append(cur.strip())
    cur = ""
stages = [[]]
for l in lines:
    if l.upper().startswith("FROM "):
        stages.append([])
    stages[-1].append(l)
stage, args = stages[-1], {}
def subst(s):
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), s)
out = {}
for l in stage:
    word, _, rest = l.partition(" ")
    word = word.upper()
    if word == "ARG":
        k, _, v = rest.partition("=")
        args[k.strip()] = v.strip().strip('"')
    elif word == "COPY":
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        key = "envd_path" if parts[-1].endswith("/sandcastle-envd") else "path"
        out[key] = parts[-1]
    elif word == "USER":
        out["user"] = rest.strip()
    elif word in ("ENTRYPOINT", "CMD"):
        out[word.lower()] = json.dumps(json.loads(rest))
    elif word == "LABEL":
        for kv in shlex.split(rest):
            k, _, v = kv.partition("=")
            out.setdefault("labels", []).append(k + "=" + subst(v))
    if word == "ARG" and "VERSION" in args:
        out["version"] = args["VERSION"]
for k in ("path", "user", "entrypoint"):
    if k not in out:
        sys.exit(f"{sys.argv[1]}: the last stage declares no {k.upper() if k != 'path' else 'COPY'}")
for k, v in out.items():
    for item in (v if isinstance(v, list) else [v]):
        print(f"{k}\t{item}")
EOF
)
get() { awk -F'\t' -v k="$1" '$1 == k {print $2}' <<<"$declared"; }
path=$(get path)
envd_path=$(get envd_path)
user=$(get user)
tag=${2:-$(get version)}
tag=${tag:-latest}
[[ "$user" =~ ^[0-9]+(:[0-9]+)?$ ]] || { echo "build-operator-image.sh: USER $user is not numeric" >&2; exit 1; }

# Every shared library the binary needs must be in the image (glibc, libgcc_s).
base=$(debs_layer operator-base libc6 libgcc-s1 gcc-12-base ca-certificates netbase tzdata)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root"
tar -C "$work/root" -xf "$base"
missing=()
if readelf -d "$binary" >/dev/null 2>&1; then
  for lib in $(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    if ! find "$work/root/usr/lib" "$work/root/lib" -name "$lib" 2>/dev/null | grep -q .; then
      missing+=("$lib")
    fi
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-operator-image.sh: $binary needs libraries the image lacks: ${missing[*]}" >&2
  exit 1
fi

# The operator's own layer: the passwd files and the binary.
mkdir -p "$work/app$(dirname "$path")"
passwd_files "$work/app"
install -m 0755 -o 0 -g 0 "$binary" "$work/app$path"
if [ -n "$envd_path" ]; then
  envd=${ENVD_BINARY:?the Dockerfile puts envd at $envd_path: set ENVD_BINARY to a static build of sandcastle-envd}
  [ -f "$envd" ] || { echo "build-operator-image.sh: no such file: $envd" >&2; exit 1; }
  install -m 0755 -o 0 -g 0 "$envd" "$work/app$envd_path"
fi
layer_tar "$work/app" "$work/app.tar"

config=(--config.user="$user" --config.workingdir=/home/nonroot
  --config.env=PATH=/usr/local/bin:/usr/bin:/bin
  --config.env=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt)
while IFS= read -r arg; do config+=(--config.entrypoint="$arg"); done < <(python3 -c 'import json,sys; [print(a) for a in json.loads(sys.argv[1])]' "$(get entrypoint)")
cmd=$(get cmd)
if [ -n "$cmd" ]; then
  while IFS= read -r arg; do config+=(--config.cmd="$arg"); done < <(python3 -c 'import json,sys; [print(a) for a in json.loads(sys.argv[1])]' "$cmd")
fi
while IFS= read -r label; do
  [ -n "$label" ] && config+=(--config.label="$label")
done < <(get labels)

layout="$images_cache/oci/sandcastle"
mkdir -p "$(dirname "$layout")"
oci_build "$layout" "$tag" "$base" "$work/app.tar" -- "${config[@]}"
img_log "built sandcastle:$tag in $layout"
if [ "${PUSH:-1}" != 0 ]; then
  oci_push "$layout" "$tag" "$registry/sandcastle:$tag"
fi
