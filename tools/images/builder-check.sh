#!/usr/bin/env bash
# Proves an in-cluster template image build on a node that tools/node/up.sh started in
# DIR, and times it:
#   tools/images/builder-check.sh DIR
# 1. Builds and pushes sandbox-full (build-sandbox-images.sh) and the builder image
#    (build-builder-image.sh: kaniko's executor alone) to the node's registry from the
#    host ($REGISTRY, 127.0.0.1:5000); pods name the same registry $REGISTRY_POD
#    (NODE_IP:5000, from DIR/env).
# 2. In a fresh namespace (PodSecurity baseline enforced) runs a Job whose pod builds
#      FROM $REGISTRY_POD/sandbox-full:latest, RUN, ENV, WORKDIR, USER user, a RUN as that
#      user, COPY --chown of a file from the build context
#    with the context given as a ConfigMap (the Dockerfile and a context.tar.gz, as the
#    server will have them) mounted read-only, kaniko reading the tar with
#    --context=tar://, and pushes $REGISTRY_POD/templates/check:1 over plain HTTP. The
#    image digest comes back as the container's termination message (--digest-file=
#    /dev/termination-log). Streams the Job's log while it runs.
# 3. In a second fresh namespace (PodSecurity restricted enforced) runs a pod of the
#    built image by digest as uid 1000 and checks /opt/marker, $GREETING, the working
#    directory, the copied file and its owner, and the RUN done as user.
# Prints timings (builder image build, Job created -> pod started -> pushed -> complete,
# run pod created -> done). Deletes both namespaces; exits non-zero on any failure.
# The builder container runs as root (kaniko must own the root filesystem it unpacks
# the base into) but not privileged: all capabilities dropped but $BUILDER_CAPS
# (default: CHOWN DAC_OVERRIDE FOWNER FSETID SETUID SETGID; "runtime" keeps the
# runtime's default set), no privilege escalation, seccomp RuntimeDefault.
# KANIKO_ARGS adds executor flags.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=$(cd "${1:?usage: builder-check.sh DIR}" && pwd)
# shellcheck disable=SC1091
. "$dir/env"
export KUBECONFIG
: "${REGISTRY:?no REGISTRY in $dir/env}"
: "${REGISTRY_POD:?no REGISTRY_POD in $dir/env: a node started before up.sh published the registry on NODE_IP}"
kubectl=${KUBECTL:-$root/.tools/bin/kubectl}
[ -x "$kubectl" ] || kubectl=$(command -v kubectl)
k() { "$kubectl" "$@"; }
caps=${BUILDER_CAPS:-CHOWN DAC_OVERRIDE FOWNER FSETID SETUID SETGID}
suffix=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
ns=builder-check-$suffix
run_ns=builder-run-$suffix
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.2f s", b - a }'; }
say() { echo "builder-check: $*"; }
fail() {
  echo "builder-check: FAILED: $*" >&2
  for n in "$ns" "$run_ns"; do
    k -n "$n" get pods -o wide >&2 2>/dev/null || true
    k -n "$n" get events --sort-by=.lastTimestamp >&2 2>/dev/null || true
  done
  exit 1
}
work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  k delete namespace "$ns" "$run_ns" --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
}
trap cleanup EXIT

# --- images ---------------------------------------------------------------------------
t=$(now)
REGISTRY=$REGISTRY "$here/build-sandbox-images.sh" >/dev/null
say "sandbox images built and pushed in $(since "$t")"
t=$(now)
builder_ref=$(REGISTRY=$REGISTRY "$here/build-builder-image.sh")
say "builder image $builder_ref built and pushed in $(since "$t")"
# The same image under the name pods use.
builder_image=$REGISTRY_POD/${builder_ref#"$REGISTRY"/}

# --- build context ----------------------------------------------------------------------
mkdir -p "$work/context/files"
echo "copied from the context" >"$work/context/files/hello.txt"
cat >"$work/Dockerfile" <<EOF
FROM $REGISTRY_POD/sandbox-full:latest
RUN echo built > /opt/marker
ENV GREETING=hi
WORKDIR /opt
USER user
RUN id -un > /home/user/whoami
COPY --chown=user:user files/hello.txt /opt/hello.txt
EOF
tar -C "$work/context" --sort=name --numeric-owner --owner=0 --group=0 -czf "$work/context.tar.gz" .
destination=$REGISTRY_POD/templates/check:1

# --- the build Job --------------------------------------------------------------------
for n in "$ns" "$run_ns"; do k create namespace "$n" >/dev/null; done
k label namespace "$ns" pod-security.kubernetes.io/enforce=baseline >/dev/null
k label namespace "$run_ns" pod-security.kubernetes.io/enforce=restricted >/dev/null
# Pods are refused until the namespace's default ServiceAccount exists.
for n in "$ns" "$run_ns"; do
  for _ in $(seq 100); do k -n "$n" get serviceaccount default >/dev/null 2>&1 && break; sleep 0.1; done
done
k -n "$ns" create configmap build-context \
  --from-file=Dockerfile="$work/Dockerfile" --from-file=context.tar.gz="$work/context.tar.gz" >/dev/null

if [ "$caps" = runtime ]; then
  capabilities='{}'
else
  capabilities="{drop: [ALL], add: [${caps// /, }]}"
fi
extra=""
for a in ${KANIKO_ARGS:-}; do extra+="
        - $a"; done
cat >"$work/job.yaml" <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: build
  labels: {app.kubernetes.io/name: sandcastle-builder}
spec:
  backoffLimit: 0
  activeDeadlineSeconds: 600
  ttlSecondsAfterFinished: 600
  template:
    metadata:
      labels: {app.kubernetes.io/name: sandcastle-builder}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: 5
      containers:
      - name: kaniko
        image: $builder_image
        args:
        - --dockerfile=/workspace/Dockerfile
        - --context=tar:///workspace/context.tar.gz
        - --destination=$destination
        - --insecure-registry=$REGISTRY_POD
        - --digest-file=/dev/termination-log
        - --snapshot-mode=redo
        - --push-retry=2
        - --verbosity=info
        - --log-format=text$extra
        securityContext:
          runAsUser: 0
          runAsGroup: 0
          runAsNonRoot: false
          privileged: false
          allowPrivilegeEscalation: false
          capabilities: $capabilities
          seccompProfile: {type: RuntimeDefault}
        resources:
          requests: {cpu: 500m, memory: 512Mi}
          limits: {memory: 2Gi}
        volumeMounts:
        - {name: context, mountPath: /workspace, readOnly: true}
      volumes:
      - name: context
        configMap: {name: build-context}
EOF
say "Job (in namespace $ns):"
sed 's/^/    /' "$work/job.yaml"
t_job=$(now)
k -n "$ns" apply -f "$work/job.yaml" >/dev/null

# The pod, once it exists; then its container, once started.
pod=""
for _ in $(seq 300); do
  pod=$(k -n "$ns" get pods -l job-name=build -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
  [ -n "$pod" ] && break
  sleep 0.1
done
[ -n "$pod" ] || fail "the Job made no pod in 30 s"
started=""
for _ in $(seq 600); do
  state=$(k -n "$ns" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].state}' 2>/dev/null || true)
  case "$state" in
    *running* | *terminated*) started=$(now); break ;;
    *ImagePullBackOff* | *ErrImagePull* | *CreateContainerError* | *CreateContainerConfigError* | *InvalidImageName*)
      fail "builder container cannot start: $state" ;;
  esac
  sleep 0.1
done
[ -n "$started" ] || fail "builder container not started in 60 s"
say "Job created -> builder container started in $(since "$t_job" "$started")"

# Stream the log, stamping each line with the time since the Job was created.
pushed=""
while IFS= read -r line; do
  at=$(now)
  printf '  [job %7.2fs] %s\n' "$(awk -v a="$t_job" -v b="$at" 'BEGIN { print b - a }')" "$line"
  case "$line" in *"Pushed "*) pushed=$at ;; esac
done < <(k -n "$ns" logs -f "$pod" -c kaniko 2>&1)
if ! k -n "$ns" wait --for=condition=Complete job/build --timeout=120s >/dev/null 2>&1; then
  fail "Job did not complete: $(k -n "$ns" get job build -o jsonpath='{.status.conditions}')"
fi
done_at=$(now)
digest=$(k -n "$ns" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].state.terminated.message}')
[[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || fail "no digest in the termination message: '$digest'"
[ -n "$pushed" ] || fail "the log has no 'Pushed' line"
say "Job created -> pushed $destination@$digest in $(since "$t_job" "$pushed") (container started -> pushed $(since "$started" "$pushed")), -> Job Complete $(since "$t_job" "$done_at")"

# The image as the registry has it.
config=$(skopeo inspect --tls-verify=false --config "docker://$REGISTRY/templates/check@$digest")
python3 - "$config" <<'EOF' || fail "image config"
import json, sys
c = json.loads(sys.argv[1])
cfg = c["config"]
assert cfg.get("User") == "user", cfg.get("User")
assert "GREETING=hi" in cfg.get("Env", []), cfg.get("Env")
assert cfg.get("WorkingDir") == "/opt", cfg.get("WorkingDir")
print(f"builder-check: image config: User={cfg['User']} WorkingDir={cfg['WorkingDir']} "
      f"Env={cfg['Env']} layers={len(c['rootfs']['diff_ids'])}")
EOF

# --- a pod of the built image (restricted) --------------------------------------------
t=$(now)
k -n "$run_ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: check}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 1000
    runAsGroup: 1000
    seccompProfile: {type: RuntimeDefault}
  containers:
  - name: check
    image: $REGISTRY_POD/templates/check@$digest
    command: [/bin/bash, -c, 'echo "marker=\$(cat /opt/marker) greeting=\$GREETING pwd=\$(pwd) uid=\$(id -u) hello=\$(cat hello.txt) owner=\$(stat -c %U hello.txt) whoami=\$(cat /home/user/whoami)"']
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
EOF
k -n "$run_ns" wait --for=jsonpath='{.status.phase}'=Succeeded pod/check --timeout=90s >/dev/null ||
  fail "pod of the built image did not succeed"
ran=$(now)
out=$(k -n "$run_ns" logs check)
want="marker=built greeting=hi pwd=/opt uid=1000 hello=copied from the context owner=user whoami=user"
[ "$out" = "$want" ] || fail "pod of the built image printed '$out', want '$want'"
pulled=$(k -n "$run_ns" get events --field-selector involvedObject.name=check,reason=Pulled \
  -o jsonpath='{.items[0].message}' 2>/dev/null || true)
say "pod of the built image: $out"
say "pod created -> Succeeded in $(since "$t" "$ran") ($pulled)"

t=$(now)
cleanup
trap - EXIT
say "namespaces deleted in $(since "$t")"
say "all checks passed"
