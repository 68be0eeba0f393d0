#!/usr/bin/env bash
# Proves a node that tools/node/up.sh started in DIR works, and times it:
#   tools/node/smoke.sh DIR
# Pushes the sandbox images (tools/images/build-sandbox-images.sh) to the node's
# registry, runs a Deployment of 2 replicas of sandbox-minimal (busybox httpd, as the
# nonroot user, with a readiness probe and CPU/memory limits) behind a Service, and
# checks: the pods reach Ready, `kubectl logs` and `kubectl exec` work, a pod resolves
# kubernetes.default and the Service through cluster DNS (glibc's resolver, in a
# sandbox-full pod), the Service answers from a pod, a name outside the cluster gets
# NXDOMAIN rather than a time-out. Then builds the operator image around a C hello
# world (tools/images/build-operator-image.sh; the real binary needs cargo) and checks a
# pod of it runs as 65532 with the Dockerfile's entrypoint and command. Deletes what it
# created; exits non-zero on the first failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=$(cd "${1:?usage: smoke.sh DIR}" && pwd)
# shellcheck disable=SC1091
. "$dir/env"
export KUBECONFIG
kubectl=${KUBECTL:-$root/.tools/bin/kubectl}
[ -x "$kubectl" ] || kubectl=$(command -v kubectl)
k() { "$kubectl" "$@"; }
ns=smoke
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f s", b - a }'; }
fail() { echo "smoke: FAILED: $*" >&2; k -n "$ns" get pods -o wide >&2 || true; k -n "$ns" get events >&2 || true; exit 1; }

t=$(now)
REGISTRY=$REGISTRY "$here/../images/build-sandbox-images.sh" >/dev/null
echo "smoke: images built and pushed in $(since "$t")"

k create namespace "$ns" >/dev/null
trap 'k delete namespace "$ns" --wait=false >/dev/null 2>&1 || true' EXIT
# Pods are refused until the namespace's default ServiceAccount exists.
for _ in $(seq 50); do k -n "$ns" get serviceaccount default >/dev/null 2>&1 && break; sleep 0.1; done

t=$(now)
k -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: $REGISTRY/sandbox-minimal:latest
        command: [/bin/sh, -c, 'mkdir -p /tmp/www && echo "hello from \$HOSTNAME" >/tmp/www/index.html && echo serving && exec httpd -f -p 8080 -h /tmp/www']
        ports: [{containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
        resources: {limits: {cpu: 200m, memory: 64Mi}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
EOF
k -n "$ns" rollout status deploy/web --timeout=60s >/dev/null || fail "Deployment web not available"
echo "smoke: Deployment of 2 replicas created -> Ready in $(since "$t")"

pod=$(k -n "$ns" get pods -l app=web -o jsonpath='{.items[0].metadata.name}')
[ "$(k -n "$ns" logs "$pod")" = serving ] || fail "kubectl logs"
echo "smoke: kubectl logs ok"
[ "$(k -n "$ns" exec "$pod" -- id -u)" = 65532 ] || fail "kubectl exec"
echo "smoke: kubectl exec ok (uid 65532)"
# kube-proxy programs the Service's rules at most once a second (minSyncPeriod).
t=$(now)
for _ in $(seq 50); do
  out=$(k -n "$ns" exec "$pod" -- sh -c 'printf "GET / HTTP/1.0\r\n\r\n" | nc -w 2 web 80' 2>&1 || true)
  grep -q '^hello from web-' <<<"$out" && break
  sleep 0.2
done
grep -q '^hello from web-' <<<"$out" || fail "Service web from a pod: $out"
echo "smoke: Service reachable from a pod (busybox nc), $(since "$t") after the rollout"

t=$(now)
k -n "$ns" run full --image="$REGISTRY/sandbox-full:latest" --restart=Never --command -- sleep 600 >/dev/null
k -n "$ns" wait --for=condition=Ready pod/full --timeout=90s >/dev/null || fail "pod full not Ready"
echo "smoke: sandbox-full pod created -> Ready in $(since "$t")"
k -n "$ns" exec -i full -- python3 - <<'EOF' || fail "DNS or Service from the sandbox-full pod"
import socket, urllib.request
api = socket.getaddrinfo("kubernetes.default", 443, type=socket.SOCK_STREAM)[0][4][0]
assert api == "10.96.0.1", api
socket.create_connection((api, 443), timeout=5).close()
web = socket.getaddrinfo("web", 80, type=socket.SOCK_STREAM)[0][4][0]
body = urllib.request.urlopen("http://web/", timeout=5).read().decode()
assert body.startswith("hello from web-"), body
try:
    socket.getaddrinfo("nothing.invalid", 80)
    raise SystemExit("nothing.invalid resolved")
except socket.gaierror as e:
    assert e.errno == socket.EAI_NONAME, e
print(f"smoke: kubernetes.default -> {api} (TCP 443 ok), web -> {web}, HTTP ok, outside names NXDOMAIN")
EOF

t=$(now)
k -n "$ns" run single --image="$REGISTRY/sandbox-minimal:latest" --restart=Never --command -- sleep 600 >/dev/null
k -n "$ns" wait --for=condition=Ready pod/single --timeout=60s >/dev/null || fail "pod single not Ready"
echo "smoke: one pod (image present) created -> Ready in $(since "$t")"

work=$(mktemp -d)
cat >"$work/hello.c" <<'EOF'
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
  printf("%s %s uid=%d\n", argv[0], argc > 1 ? argv[1] : "-", (int)getuid());
  return 0;
}
EOF
gcc -O2 -o "$work/hello" "$work/hello.c"
t=$(now)
ref=$(REGISTRY=$REGISTRY ENVD_BINARY="$work/hello" "$here/../images/build-operator-image.sh" "$work/hello" smoke 2>/dev/null)
rm -rf "$work"
echo "smoke: operator image $ref built and pushed in $(since "$t")"
t=$(now)
k -n "$ns" run operator --image="$REGISTRY/sandcastle:smoke" --restart=Never \
  --overrides='{"spec": {"securityContext": {"runAsNonRoot": true}}}' >/dev/null
k -n "$ns" wait --for=jsonpath='{.status.phase}'=Succeeded pod/operator --timeout=60s >/dev/null ||
  fail "operator image pod did not succeed"
out=$(k -n "$ns" logs operator)
[ "$out" = "/usr/local/bin/sandcastle run uid=65532" ] || fail "operator image pod printed: $out"
echo "smoke: operator image pod ran '$out' (created -> Succeeded in $(since "$t"))"

t=$(now)
# sleep as PID 1 ignores SIGTERM: do not wait out the 30 s grace period.
k -n "$ns" delete pods --all --grace-period=1 --wait=false >/dev/null
k delete namespace "$ns" --timeout=60s >/dev/null
trap - EXIT
echo "smoke: namespace deleted in $(since "$t")"
echo "smoke: all checks passed"
