#!/usr/bin/env bash
# Starts a complete single-node Kubernetes cluster on this machine, all its state in
# DIR, and returns once the node is Ready, the default ServiceAccount exists and cluster
# DNS answers:
#   tools/node/up.sh DIR
# Processes (each in its own session, pid in DIR/pids, log in DIR/logs), in start order:
#   containerd       own config, root, state and socket under DIR; CRI with
#                    restrict_oom_score_adj (no CAP_SYS_RESOURCE here), cgroupfs runc,
#                    the bridge CNI config below, the locally built pause image
#                    side-loaded as registry.k8s.io/pause:<version>
#   docker-registry  plain HTTP on 127.0.0.1:$REGISTRY_PORT, data in DIR/registry;
#                    also on NODE_IP:$REGISTRY_PORT (it listens on 0.0.0.0), the name
#                    pods use (REGISTRY_POD in DIR/env: a pod's 127.0.0.1 is its own),
#                    pulled by containerd over plain HTTP through certs.d
#   etcd, kube-apiserver (Node,RBAC; NodeRestriction; apiserver->kubelet client cert),
#   kube-controller-manager, kube-scheduler, kubelet (cgroupfs, cgroup v1 allowed,
#   CA-signed serving cert, webhook authn/authz), kube-proxy (iptables, oomScoreAdj 0),
#   kube-router      only its NetworkPolicy firewall (iptables + ipset; no routing, no
#                    service proxy), as system:kube-router with a read-only ClusterRole
#                    (see NODE_NETPOL: without it, policies are not enforced),
#   coredns          on the host at NODE_IP:53, behind the selector-less Service kube-dns
#                    (10.96.0.10) with a hand-written EndpointSlice.
# Prints shell assignments (KUBECONFIG=..., REGISTRY=..., ...) on stdout; also written
# to DIR/env. Tear down with tools/node/down.sh DIR. On failure it prints the failing
# process's log tail and runs down.sh itself (KEEP_ON_FAILURE=1 keeps everything).
#
# Environment (defaults): NODE_IP (eth0's IPv4 address), NODE_NAME (hostname),
# APISERVER_PORT (6443), ETCD_PORT (2379), ETCD_PEER_PORT (2380), REGISTRY_PORT (5000),
# DNS_UPSTREAM (none: only cluster names resolve; e.g. /etc/resolv.conf to forward),
# NODE_TMPFS (1: DIR is a tmpfs mounted by up.sh, unmounted by down.sh),
# NODE_NETPOL (unset: kube-router's firewall enforces NetworkPolicy when NODE_BIN has
# kube-router and ipset is installed, and a note says so when not; 1: it must; 0: no
# enforcement; DIR/env's NETWORK_POLICY says which: kube-router or none),
# NODE_BIN / CONTROLPLANE_BIN (the build directories; built when unset), KUBECTL,
# NODE_GVISOR_BIN (unset: Debian's containerd 1.6 and runc only; a directory as
# tools/node/build-gvisor.sh prints it: containerd 2 from that directory instead, with
# gVisor's runsc as a second runtime and a RuntimeClass `gvisor` for it; DIR/env's
# RUNTIME_CLASSES says which).
# One node per machine: the kubelet's ports, the cni0 bridge and the kubepods cgroups
# are machine-wide. Needs root and tools/node/install-packages.sh.
set -Eeuo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
t0=$EPOCHREALTIME
log() { awk -v a="$t0" -v b="$EPOCHREALTIME" -v m="$*" 'BEGIN { printf "[up %6.2fs] %s\n", b - a, m }' >&2; }

dir=${1:?usage: up.sh DIR}
[ "$(id -u)" = 0 ] || { echo "up.sh: must run as root" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -f "$dir/pids/kubelet.pid" ] || [ -f "$dir/pids/containerd.pid" ]; then
  echo "up.sh: $dir already holds a node; run down.sh $dir first" >&2
  exit 1
fi
# DIR is emptied by down.sh: it must be empty, or hold only a previous run's logs.
if [ "$dir" = / ] || [ -n "$(find "$dir" -mindepth 1 -maxdepth 1 ! -name logs -print -quit)" ]; then
  echo "up.sh: $dir is not empty; give a new directory (or one down.sh left)" >&2
  exit 1
fi
if ip link show cni0 >/dev/null 2>&1 || pgrep -x kubelet >/dev/null || pgrep -x containerd >/dev/null; then
  echo "up.sh: another node is running on this machine (cni0, kubelet or containerd exists)" >&2
  exit 1
fi

# DIR on a tmpfs of its own (NODE_TMPFS=0: on DIR's filesystem). Deleting an unpacked
# image tree from this machine's disk takes 10-20 s while anything else writes to it
# (a cargo build); from memory it is instant. down.sh unmounts it, keeping the logs.
if [ "${NODE_TMPFS:-1}" = 1 ] && ! mountpoint -q "$dir"; then
  mount -t tmpfs -o mode=0755 sandcastle-node "$dir"
fi

# From here on a failure prints the logs and tears down whatever was started.
on_error() {
  local rc=$?
  echo "up.sh: failed (exit $rc); log tails:" >&2
  for f in "$dir"/logs/*.log; do
    [ -s "$f" ] || continue
    echo "---- $(basename "$f")" >&2
    tail -n 15 "$f" >&2
  done
  if [ "${KEEP_ON_FAILURE:-0}" != 1 ]; then
    "$here/down.sh" "$dir" >&2 || true
  fi
  exit "$rc"
}
trap on_error ERR
die() { echo "up.sh: $*" >&2; false; }

node_ip=${NODE_IP:-$(ip -4 -o addr show dev eth0 scope global 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1)}
if [ -z "$node_ip" ]; then
  dev=$(ip -4 route show default | awk '{for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}' | head -1)
  node_ip=$(ip -4 -o addr show dev "$dev" scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
fi
[ -n "$node_ip" ] || die "no non-loopback IPv4 address; set NODE_IP"
node_name=${NODE_NAME:-$(hostname | tr '[:upper:]' '[:lower:]')}
api_port=${APISERVER_PORT:-6443}
etcd_port=${ETCD_PORT:-2379}
etcd_peer_port=${ETCD_PEER_PORT:-2380}
registry_port=${REGISTRY_PORT:-5000}
dns_upstream=${DNS_UPSTREAM:-}
netpol=${NODE_NETPOL:-auto}
service_cidr=10.96.0.0/16
service_ip=10.96.0.1
dns_ip=10.96.0.10
pod_cidr=10.244.0.0/24
cluster_domain=cluster.local

# --- binaries -------------------------------------------------------------------------
"$here/install-packages.sh"
cp_bin=${CONTROLPLANE_BIN:-$("$root/tools/controlplane/build.sh")}
node_bin=${NODE_BIN:-$("$here/build.sh")}
kubectl=${KUBECTL:-}
if [ -z "$kubectl" ]; then
  if [ -x "$root/.tools/bin/kubectl" ]; then kubectl=$root/.tools/bin/kubectl; else kubectl=$(command -v kubectl); fi
fi
gvisor_bin=${NODE_GVISOR_BIN:-}
if [ -n "$gvisor_bin" ]; then
  for b in containerd containerd-shim-runc-v2 ctr runsc containerd-shim-runsc-v1; do
    [ -x "$gvisor_bin/$b" ] || die "missing $gvisor_bin/$b (tools/node/build-gvisor.sh)"
  done
  # containerd finds its shims and runsc on its PATH: these before Debian's.
  export PATH="$gvisor_bin:$PATH"
fi
pause_version=$(cat "$node_bin/pause.version")
pause_image=registry.k8s.io/pause:$pause_version
for b in "$cp_bin/etcd" "$cp_bin/kube-apiserver" "$cp_bin/kube-controller-manager" \
  "$node_bin/kubelet" "$node_bin/kube-scheduler" "$node_bin/kube-proxy" "$node_bin/coredns" "$kubectl"; do
  [ -x "$b" ] || die "missing $b"
done
# A NODE_BIN built before kube-router was added (a stale .tools/node link) still runs.
if [ "$netpol" = auto ]; then
  if [ -x "$node_bin/kube-router" ] && command -v ipset >/dev/null; then
    netpol=1
  else
    netpol=0
    log "note: NetworkPolicy is NOT enforced: no $node_bin/kube-router or no ipset (tools/node/build.sh, install-packages.sh)"
  fi
fi
if [ "$netpol" = 1 ]; then
  [ -x "$node_bin/kube-router" ] || die "missing $node_bin/kube-router (NODE_NETPOL=0 runs without it)"
  command -v ipset >/dev/null || die "missing ipset (tools/node/install-packages.sh)"
fi

mkdir -p "$dir"/{pids,logs,pki,kubeconfigs,run,etcd,registry/data,containerd/certs.d,cni/net.d,cni/ipam,kubelet/root,kubelet/pod-logs,kube-proxy,coredns}
chmod 700 "$dir/pki"
rm -f "$dir"/logs/*.log


# Machine settings the node changes, recorded so down.sh can put them back. The kubelet
# itself sets the vm/kernel ones (protectKernelDefaults: false).
sysctls=(net.ipv4.ip_forward vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
: >"$dir/sysctl.saved"
for s in "${sysctls[@]}"; do
  echo "$s=$(sysctl -n "$s")" >>"$dir/sysctl.saved"
done
sysctl -qw net.ipv4.ip_forward=1

# --- certificates ---------------------------------------------------------------------
pki=$dir/pki
# cert NAME CN O EXTKEYUSAGE [SAN]: an EC P-256 key and a certificate signed by the CA.
cert() {
  local name=$1 cn=$2 o=$3 eku=$4 san=${5:-}
  local subj="/CN=$cn"
  if [ -n "$o" ]; then subj="/O=$o$subj"; fi
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    if [ -n "$san" ]; then echo "subjectAltName=$san"; fi
  } >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}
openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key" 2>/dev/null
openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=sandcastle-node-ca" -days 30 -sha256 \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
  -out "$pki/ca.crt" 2>/dev/null
cert apiserver kube-apiserver "" serverAuth \
  "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$cluster_domain,DNS:localhost,DNS:$node_name,IP:127.0.0.1,IP:$node_ip,IP:$service_ip"
cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters clientAuth
cert admin sandcastle-admin system:masters clientAuth
cert controller-manager system:kube-controller-manager "" clientAuth
cert scheduler system:kube-scheduler "" clientAuth
cert kubelet "system:node:$node_name" system:nodes clientAuth
cert kubelet-serving "system:node:$node_name" system:nodes serverAuth "DNS:$node_name,DNS:localhost,IP:$node_ip,IP:127.0.0.1"
cert kube-proxy system:kube-proxy "" clientAuth
cert coredns system:coredns "" clientAuth
cert kube-router system:kube-router "" clientAuth
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
chmod 600 "$pki"/*.key

# kubeconfig NAME CERT: a kubeconfig for the apiserver on loopback with a client cert.
kubeconfig() {
  cat >"$dir/kubeconfigs/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: node
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: node
  context: {cluster: node, user: $2}
current-context: node
EOF
}
for c in admin controller-manager scheduler kubelet kube-proxy coredns kube-router; do kubeconfig "$c" "$c"; done
cp "$dir/kubeconfigs/admin.kubeconfig" "$dir/kubeconfig"
export KUBECONFIG=$dir/kubeconfig
log "certificates and kubeconfigs written"

# --- process helpers ------------------------------------------------------------------
# start NAME COMMAND...: runs COMMAND in its own session (so it outlives this script
# and no terminal signal reaches it), output to DIR/logs/NAME.log, pid to DIR/pids.
start() {
  local name=$1; shift
  setsid "$@" >>"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/$name.pid"
}
# alive NAME: the process runs (a zombie does not count).
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$(cat "$dir/pids/$1.pid")/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
# wait_for NAME SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds, failing
# when the process NAME exits or the time runs out.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$name" ] && ! alive "$name"; then
      echo "up.sh: $name exited" >&2
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "up.sh: timed out after ${secs}s waiting for: $*" >&2
      return 1
    fi
    sleep 0.2
  done
}

# --- containerd -----------------------------------------------------------------------
ctd_sock=$dir/run/containerd.sock
cat >"$dir/cni/net.d/10-sandcastle.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sandcastle",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$pod_cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$dir/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
mkdir -p "$dir/containerd/certs.d/127.0.0.1:$registry_port"
cat >"$dir/containerd/certs.d/127.0.0.1:$registry_port/hosts.toml" <<EOF
server = "http://127.0.0.1:$registry_port"

[host."http://127.0.0.1:$registry_port"]
  capabilities = ["pull", "resolve", "push"]
  skip_verify = true
EOF
# The same registry under the node's address: the name images get when something in a
# pod (an image build) pushes them and pods then run them.
mkdir -p "$dir/containerd/certs.d/$node_ip:$registry_port"
cat >"$dir/containerd/certs.d/$node_ip:$registry_port/hosts.toml" <<EOF
server = "http://$node_ip:$registry_port"

[host."http://$node_ip:$registry_port"]
  capabilities = ["pull", "resolve", "push"]
  skip_verify = true
EOF
cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
# Not needed by a CRI node; the others' defaults reach outside DIR.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$ctd_sock"

[ttrpc]
  address = "$ctd_sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # No CAP_SYS_RESOURCE here: runc cannot lower oom_score_adj below its own.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$dir/run/runc"
        SystemdCgroup = false

$(if [ -n "$gvisor_bin" ]; then cat <<RUNSC
    # gVisor: the shim runs runsc with the options in runsc.toml.
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc]
      runtime_type = "io.containerd.runsc.v1"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc.options]
        TypeUrl = "io.containerd.runsc.v1.options"
        ConfigPath = "$dir/containerd/runsc.toml"
RUNSC
fi)

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$dir/containerd/certs.d"
EOF
if [ -n "$gvisor_bin" ]; then
  mkdir -p "$dir/logs/runsc" "$dir/run/runsc"
  cat >"$dir/containerd/runsc.toml" <<EOF
log_path = "$dir/logs/runsc/%ID%.shim.log"
log_level = "info"
binary_name = "$gvisor_bin/runsc"
root = "$dir/run/runsc"
[runsc_config]
  debug-log = "$dir/logs/runsc/%ID%.%COMMAND%.log"
EOF
fi
start containerd containerd --config "$dir/containerd/config.toml"
ctr=(ctr --address "$ctd_sock")
wait_for containerd 30 "${ctr[@]}" version
log "containerd up"
"${ctr[@]}" -n k8s.io images import --platform linux/amd64 "$node_bin/pause.tar" >/dev/null
log "pause image imported as $pause_image"

# --- registry -------------------------------------------------------------------------
cat >"$dir/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/registry/data
  delete:
    enabled: true
http:
  # 127.0.0.1 for the host's tools, NODE_IP for pods (an in-cluster image build).
  addr: 0.0.0.0:$registry_port
EOF
start registry docker-registry serve "$dir/registry/config.yml"

# --- etcd, kube-apiserver -------------------------------------------------------------
start etcd "$cp_bin/etcd" --name node --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "node=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync=true --log-level=warn
start kube-apiserver "$cp_bin/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --secure-port="$api_port" --advertise-address="$node_ip" \
  --cert-dir="$dir/run/apiserver-certs" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$pki/ca.crt" \
  --kubelet-preferred-address-types=InternalIP,Hostname \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-account-issuer="https://kubernetes.default.svc.$cluster_domain" \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range="$service_cidr" --allow-privileged=true \
  --profiling=false
wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"
log "etcd up"
wait_for registry 30 curl -sf "http://127.0.0.1:$registry_port/v2/"
wait_for registry 30 curl -sf "http://$node_ip:$registry_port/v2/"
log "registry up on 127.0.0.1:$registry_port and $node_ip:$registry_port"
wait_for kube-apiserver 90 curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
  "https://127.0.0.1:$api_port/readyz"
log "kube-apiserver ready"

# --- controller-manager, scheduler ----------------------------------------------------
kc=$dir/kubeconfigs
start kube-controller-manager "$cp_bin/kube-controller-manager" \
  --kubeconfig="$kc/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$kc/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$kc/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
  --service-cluster-ip-range="$service_cidr" --controllers='*' --profiling=false \
  --kube-api-qps=200 --kube-api-burst=400
start kube-scheduler "$node_bin/kube-scheduler" \
  --kubeconfig="$kc/scheduler.kubeconfig" \
  --authentication-kubeconfig="$kc/scheduler.kubeconfig" \
  --authorization-kubeconfig="$kc/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --leader-elect=false --profiling=false

# --- kubelet, kube-proxy --------------------------------------------------------------
cat >"$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
rotateCertificates: false
serverTLSBootstrap: false
containerRuntimeEndpoint: unix://$ctd_sock
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupsPerQOS: true
clusterDomain: $cluster_domain
clusterDNS: [$dns_ip]
resolvConf: /etc/resolv.conf
podLogsDir: $dir/kubelet/pod-logs
failSwapOn: false
serializeImagePulls: false
imagePullCredentialsVerificationPolicy: NeverVerify
imageGCHighThresholdPercent: 100
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
staticPodPath: ""
EOF
start kubelet "$node_bin/kubelet" --config="$dir/kubelet/config.yaml" \
  --kubeconfig="$kc/kubelet.kubeconfig" --root-dir="$dir/kubelet/root" \
  --hostname-override="$node_name" --node-ip="$node_ip"
cat >"$dir/kube-proxy/config.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $kc/kube-proxy.kubeconfig
hostnameOverride: $node_name
mode: iptables
clusterCIDR: $pod_cidr
# No CAP_SYS_RESOURCE: the default -999 cannot be set.
oomScoreAdj: 0
# Leave the kernel's conntrack settings alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
start kube-proxy "$node_bin/kube-proxy" --config="$dir/kube-proxy/config.yaml"

k() { "$kubectl" --kubeconfig "$dir/kubeconfig" "$@"; }
wait_for kubelet 60 k get node "$node_name"
wait_for kubelet 60 k wait --for=condition=Ready "node/$node_name" --timeout=1s
log "node $node_name Ready"
# Both decode their configuration leniently: a misspelt field is only logged.
if grep -h 'strict decoding error' "$dir/logs/kubelet.log" "$dir/logs/kube-proxy.log" >&2; then
  die "the kubelet or kube-proxy configuration has unknown fields"
fi

# --- NetworkPolicy firewall -----------------------------------------------------------
# kube-router's firewall only: a chain per local pod (KUBE-POD-FW-*) and per policy
# (KUBE-NWPLCY-*), reached from KUBE-ROUTER-INPUT/FORWARD/OUTPUT, which it keeps first
# in the filter table's INPUT/FORWARD/OUTPUT; pod and CIDR sets in ipsets (KUBE-SRC-*,
# KUBE-DST-*). It reads the Node object (its InternalIP tells the local pods by hostIP),
# so it starts once the node is registered. It re-syncs on every pod, namespace and
# policy event, and every --iptables-sync-period. No health or metrics listener.
if [ "$netpol" = 1 ]; then
  k apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:kube-router"}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, services, nodes, endpoints]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kube-router"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-router"}
EOF
  start kube-router "$node_bin/kube-router" --kubeconfig="$kc/kube-router.kubeconfig" \
    --hostname-override="$node_name" --service-cluster-ip-range="$service_cidr" \
    --run-firewall=true --run-router=false --run-service-proxy=false --enable-cni=false \
    --health-port=0 --metrics-port=0 --v=1
  # Its chains and the jumps to them exist once its first full sync has run.
  netpol_synced() {
    [[ "$(iptables -w -t filter -S FORWARD)" == *"-j KUBE-ROUTER-FORWARD"* ]] &&
      [[ "$(iptables -w -t filter -S KUBE-ROUTER-FORWARD 2>/dev/null)" == *"-j ACCEPT"* ]]
  }
  wait_for kube-router 30 netpol_synced
  log "kube-router NetworkPolicy firewall synced"
fi

wait_for kube-controller-manager 60 k get serviceaccount default -n default
log "default ServiceAccount exists"
if [ -n "$gvisor_bin" ]; then
  k apply -f - >/dev/null <<EOF
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: gvisor}
handler: runsc
EOF
  log "RuntimeClass gvisor (runsc) registered"
fi

# --- cluster DNS ----------------------------------------------------------------------
k apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: $dns_ip
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-host
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: sandcastle.dev-node
addressType: IPv4
endpoints:
- addresses: ["$node_ip"]
  conditions: {ready: true}
  nodeName: $node_name
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
# Cluster names from the API; anything else goes to DNS_UPSTREAM when it is set, and
# is answered NXDOMAIN when not (nothing leaves the machine; a SERVFAIL would make
# resolvers retry).
if [ -n "$dns_upstream" ]; then
  rest="kubernetes $cluster_domain in-addr.arpa ip6.arpa {
        kubeconfig $kc/coredns.kubeconfig node
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    forward . $dns_upstream"
  zones="."
else
  rest="kubernetes $cluster_domain in-addr.arpa ip6.arpa {
        kubeconfig $kc/coredns.kubeconfig node
        pods insecure
        ttl 30
    }"
  zones="$cluster_domain:53 in-addr.arpa:53 ip6.arpa:53"
fi
cat >"$dir/coredns/Corefile" <<EOF
$zones {
    bind $node_ip
    errors
    health 127.0.0.1:18080
    ready 127.0.0.1:18181
    $rest
    cache 30
    loadbalance
}
EOF
if [ -z "$dns_upstream" ]; then
  cat >>"$dir/coredns/Corefile" <<EOF
.:53 {
    bind $node_ip
    errors
    template ANY ANY {
        rcode NXDOMAIN
    }
}
EOF
fi
start coredns "$node_bin/coredns" -conf "$dir/coredns/Corefile"
wait_for coredns 30 curl -sf http://127.0.0.1:18181/ready
log "coredns ready on $node_ip:53 (Service kube-dns $dns_ip)"

trap - ERR
cat >"$dir/env" <<EOF
KUBECONFIG=$dir/kubeconfig
REGISTRY=127.0.0.1:$registry_port
REGISTRY_POD=$node_ip:$registry_port
CONTAINERD_ADDRESS=$ctd_sock
NODE_NAME=$node_name
NODE_IP=$node_ip
CLUSTER_DNS=$dns_ip
NETWORK_POLICY=$([ "$netpol" = 1 ] && echo kube-router || echo none)
RUNTIME_CLASSES=$([ -n "$gvisor_bin" ] && echo gvisor || echo none)
EOF
cat "$dir/env"
log "node up"
