#!/usr/bin/env bash
# Proves that a node tools/node/up.sh started in DIR enforces NetworkPolicy (kube-router's
# firewall), and times how long a policy takes to apply:
#   tools/node/netpol-check.sh DIR
# Pushes sandbox-minimal (tools/images/build-sandbox-images.sh; busybox) to the node's
# registry and, in a namespace of its own, runs a server pod (busybox httpd on 8080) and
# a client pod, then checks in turn:
#   1. with no policy: client -> server HTTP works, client -> NODE_IP:10250 (the
#      kubelet, on the host) connects, cluster DNS resolves kubernetes.default;
#   2. a default-deny ingress policy: client -> server is refused;
#   3. an egress policy that allows only DNS (UDP and TCP 53): client -> NODE_IP:10250
#      is refused while cluster DNS still resolves (10.96.0.10 is DNATed to CoreDNS on
#      NODE_IP:53, so only the port lets it through);
#   4. both policies deleted: client -> server and client -> NODE_IP work again.
# Connections are made with busybox nc (Debian's busybox wget segfaults). "Refused"
# means nc could not connect (kube-router REJECTs: connection refused). Each policy
# change is polled from inside the client pod every 0.1 s. Two times are printed per
# policy applied, both from just before `kubectl apply`: "rules" to the end of the
# first kube-router full sync that started after it (from its log, --v=1), i.e. when
# the policy is in the kernel; "seen" to the first probe that saw the change (one
# `kubectl exec` included, and a refused connect takes about 1 s here: the first ICMP
# arrives while connect() holds the socket and is dropped, the SYN is resent after
# 1 s). Deletes its namespace; exits non-zero on the first failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=$(cd "${1:?usage: netpol-check.sh DIR}" && pwd)
# shellcheck disable=SC1091
. "$dir/env"
export KUBECONFIG
kubectl=${KUBECTL:-$root/.tools/bin/kubectl}
[ -x "$kubectl" ] || kubectl=$(command -v kubectl)
k() { "$kubectl" "$@"; }
ns=netpol-check
now() { echo "$EPOCHREALTIME"; }
tod() { date +%H:%M:%S.%N; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f s", b - a }'; }
fail() {
  echo "netpol-check: FAILED: $*" >&2
  k -n "$ns" get pods,networkpolicies -o wide >&2 || true
  [ -f "$dir/logs/kube-router.log" ] && tail -n 20 "$dir/logs/kube-router.log" >&2
  exit 1
}

if [ "${NETWORK_POLICY:-none}" = none ]; then
  echo "netpol-check: the node in $dir runs no NetworkPolicy enforcer (NODE_NETPOL=0?)" >&2
  exit 1
fi

t=$(now)
# Only the minimal image is needed: build both (cached layers), push that one.
PUSH=0 "$here/../images/build-sandbox-images.sh" >/dev/null
# shellcheck source=SCRIPTDIR/../images/lib.sh
. "$here/../images/lib.sh"
oci_push "$images_cache/oci/sandbox-minimal" latest "$REGISTRY/sandbox-minimal:latest" >/dev/null
echo "netpol-check: sandbox-minimal pushed in $(since "$t")"

k create namespace "$ns" >/dev/null
trap 'k -n "$ns" delete pods --all --grace-period=1 --wait=false >/dev/null 2>&1 || true
  k delete namespace "$ns" --wait=false >/dev/null 2>&1 || true' EXIT
for _ in $(seq 50); do k -n "$ns" get serviceaccount default >/dev/null 2>&1 && break; sleep 0.1; done

t=$(now)
k -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: $REGISTRY/sandbox-minimal:latest
    command: [/bin/sh, -c, 'mkdir -p /tmp/www && echo "hello from server" >/tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www']
    ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: $REGISTRY/sandbox-minimal:latest
    command: [sleep, "3600"]
EOF
k -n "$ns" wait --for=condition=Ready pod/server pod/client --timeout=60s >/dev/null || fail "pods not Ready"
server_ip=$(k -n "$ns" get pod server -o jsonpath='{.status.podIP}')
echo "netpol-check: server ($server_ip) and client pods Ready in $(since "$t")"

# The probes, run in the client pod. Each prints ok or blocked.
#   http IP PORT: an HTTP GET answered by the server's page;
#   tcp IP PORT:  a TCP connection (nc sends nothing, closes its side, waits at most 3 s);
#   dns NAME:     NAME resolves through the cluster DNS in resolv.conf.
# shellcheck disable=SC2016 # expanded by the pod's shell
probes='
http() { out=$(printf "GET / HTTP/1.0\r\n\r\n" | timeout 3 nc -w 2 "$1" "$2" 2>&1); case "$out" in *"hello from server"*) echo ok ;; *) echo blocked ;; esac; }
tcp() { out=$(timeout 3 nc -w 2 "$1" "$2" </dev/null 2>&1); case "$out" in *"can'"'"'t connect"*) echo blocked ;; *) echo ok ;; esac; }
dns() { out=$(timeout 5 nslookup "$1" 2>&1); case "$out" in *"Address: 10.96.0.1" | *"Address: 10.96.0.1"[!0-9.]*) echo ok ;; *) echo blocked ;; esac; }
'
# probe KIND ARGS...: one probe, its verdict on stdout.
probe() { k -n "$ns" exec client -- sh -c "$probes $*"; }
# await KIND ARGS... -- VERDICT: probes every 0.1 s (up to 30 s) until it answers
# VERDICT; prints the time from the call to that answer, fails when it never comes.
await() {
  local args=() want t0 got
  while [ "$1" != -- ]; do args+=("$1"); shift; done
  want=$2 t0=$(now)
  got=$(k -n "$ns" exec client -- sh -c "$probes
    for i in \$(seq 300); do v=\$(${args[*]}); [ \"\$v\" = $want ] && break; sleep 0.1; done; echo \$v")
  [ "$got" = "$want" ] || fail "${args[*]}: still $got after 30 s (wanted $want)"
  since "$t0"
}
check() {
  local got
  got=$(probe "${@:1:$#-1}")
  [ "$got" = "${*: -1}" ] || fail "${*:1:$#-1}: $got (wanted ${*: -1})"
}
# rules TOD: seconds from TOD (tod, before a change) to the end of the first full sync
# kube-router started after it.
rules() {
  awk -v t="$1" '
    function since(x, a) { split(x, a, ":"); x = a[1] * 3600 + a[2] * 60 + a[3] - t
                           return x < -43200 ? x + 86400 : x }
    BEGIN { split(t, a, ":"); t = a[1] * 3600 + a[2] * 60 + a[3] }
    /Starting sync of iptables/ && since($2) >= 0 { started = 1 }
    started && /sync iptables took/ { printf "%.2f s", since($2); found = 1; exit }
    END { if (!found) printf "?" }' "$dir/logs/kube-router.log" 2>/dev/null || printf "?"
}
dns_name=kubernetes.default.svc.cluster.local

# 1. No policy: everything connects.
check http "$server_ip" 8080 ok
check tcp "$NODE_IP" 10250 ok
check dns "$dns_name" ok
echo "netpol-check: no policy: client -> server:8080 ok, client -> $NODE_IP:10250 ok, DNS ok"

# 2. Default-deny ingress for every pod of the namespace.
t=$(tod)
k -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress}
spec:
  podSelector: {}
  policyTypes: [Ingress]
EOF
took=$(await http "$server_ip" 8080 -- blocked)
echo "netpol-check: default-deny ingress: client -> server:8080 refused (rules $(rules "$t"), seen $took after apply)"
check tcp "$NODE_IP" 10250 ok
check dns "$dns_name" ok
echo "netpol-check: default-deny ingress: egress untouched (node IP and DNS ok)"

# 3. Egress: DNS only.
t=$(tod)
k -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-dns-only}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
EOF
took=$(await tcp "$NODE_IP" 10250 -- blocked)
echo "netpol-check: egress DNS only: client -> $NODE_IP:10250 refused (rules $(rules "$t"), seen $took after apply)"
check dns "$dns_name" ok
echo "netpol-check: egress DNS only: $dns_name still resolves"

# 4. Policies gone: connections work again.
# (Two deletions may take two syncs: only the probe's time is printed.)
k -n "$ns" delete networkpolicy default-deny-ingress egress-dns-only >/dev/null
took=$(await http "$server_ip" 8080 -- ok)
check tcp "$NODE_IP" 10250 ok
echo "netpol-check: policies deleted: client -> server:8080 and -> $NODE_IP:10250 ok again (seen $took after delete)"

if [ -f "$dir/logs/kube-router.log" ]; then
  syncs=$(grep -c 'sync iptables took' "$dir/logs/kube-router.log" || true)
  last=$(grep -o 'sync iptables took .*' "$dir/logs/kube-router.log" | tail -1 || true)
  echo "netpol-check: kube-router full syncs so far: $syncs (last: ${last#sync iptables took })"
fi

t=$(now)
k -n "$ns" delete pods --all --grace-period=1 --wait=false >/dev/null
k delete namespace "$ns" --timeout=60s >/dev/null
trap - EXIT
echo "netpol-check: namespace deleted in $(since "$t")"
echo "netpol-check: NetworkPolicy enforced"
