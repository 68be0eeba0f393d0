#!/usr/bin/env bash
# Tears down the node that tools/node/up.sh started in DIR and removes everything it
# left on the machine:
#   tools/node/down.sh DIR [--purge]
# Order: controller-manager and scheduler (nothing recreates or places pods), then the
# pods are deleted through the API so the kubelet stops them and the CNI plugin tears
# their networks down, then kube-router, coredns, kube-proxy, kubelet; whatever still
# runs in the kubepods cgroups is killed, then the containerd shims of this node's
# containerd, containerd, the registry, kube-apiserver and etcd. Then it removes what
# is left behind: mounts under DIR (unmounted, deepest first; nothing outside DIR
# except /run/netns/cni-* network namespaces is unmounted), /run/netns/cni-*, the cni0
# bridge and its veths, the KUBE-*/CNI-* iptables and ip6tables chains (filter, nat,
# mangle, raw; kube-router's KUBE-ROUTER-*, KUBE-NWPLCY-*, KUBE-POD-FW-* among them),
# kube-router's ipsets (KUBE-SRC-*, KUBE-DST-*, TMP-*), the kubepods cgroups (rmdir
# only; the hierarchies stay mounted), what the kubelet, containerd and the CNI
# library put outside DIR whatever their configuration
# (/var/lib/kubelet/device-plugins, /var/log/pods, /var/log/containers,
# /run/containerd/s, /var/lib/cni/results), and the sysctls the node changed. DIR's
# contents (certificates, etcd, registry data, containerd root) are deleted except
# DIR/logs, and the tmpfs up.sh mounted on DIR is unmounted; --purge deletes DIR too.
# Ends with check-clean.sh, whose status it returns. Idempotent: safe on a DIR that
# is already down or never came up.
# Processes are stopped by the pids up.sh recorded (SIGTERM, then SIGKILL after $GRACE
# seconds, default 5), shims by their -address, pod processes by their cgroup: never
# by name.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
t0=$EPOCHREALTIME
log() { awk -v a="$t0" -v b="$EPOCHREALTIME" -v m="$*" 'BEGIN { printf "[down %6.2fs] %s\n", b - a, m }' >&2; }

dir=${1:?usage: down.sh DIR [--purge]}
purge=${2:-}
[ "$(id -u)" = 0 ] || { echo "down.sh: must run as root" >&2; exit 1; }
if [ -d "$dir" ]; then dir=$(cd "$dir" && pwd); fi
# Everything in DIR is deleted: refuse a directory that up.sh did not make.
if [ -d "$dir" ] && { [ "$dir" = / ] ||
  [ -n "$(find "$dir" -mindepth 1 -maxdepth 1 ! -name logs ! -name pids ! -name env ! -name kubeconfig -print -quit)" ] &&
  [ ! -f "$dir/env" ] && [ ! -d "$dir/pids" ] && [ ! -f "$dir/sysctl.saved" ]; }; then
  echo "down.sh: $dir does not look like a node directory of up.sh; not touching it" >&2
  exit 2
fi
ctd_sock=$dir/run/containerd.sock

# stop NAME...: SIGTERM to each recorded pid, SIGKILL to those still there after
# $GRACE seconds (default 5); all in parallel.
stop() {
  local name pid pids=()
  for name in "$@"; do
    [ -f "$dir/pids/$name.pid" ] || continue
    pid=$(cat "$dir/pids/$name.pid")
    if running "$pid"; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$dir/pids/$name.pid"
  done
  terminate "${pids[@]}"
}
# running PID: the process exists and has not exited. An exited process of ours stays
# a zombie until PID 1 reaps it (up to 2 s here), and kill -0 succeeds on a zombie.
running() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
# terminate PID...: waits for the (already signalled) pids, SIGKILL after the grace.
terminate() {
  local deadline pid left
  deadline=$(awk -v t="$EPOCHREALTIME" -v g="${GRACE:-5}" 'BEGIN { print t + g }')
  while :; do
    left=()
    for pid in "$@"; do running "$pid" && left+=("$pid"); done
    [ ${#left[@]} -eq 0 ] && return 0
    if awk -v t="$EPOCHREALTIME" -v d="$deadline" 'BEGIN { exit !(t > d) }'; then
      for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null; done
      sleep 0.1
      return 0
    fi
    sleep 0.05
  done
}
alive() { [ -f "$dir/pids/$1.pid" ] && running "$(cat "$dir/pids/$1.pid")"; }

kubectl=${KUBECTL:-}
if [ -z "$kubectl" ]; then
  if [ -x "$root/.tools/bin/kubectl" ]; then kubectl=$root/.tools/bin/kubectl; else kubectl=$(command -v kubectl || true); fi
fi

# 1. Nothing may create or schedule pods any more.
stop kube-controller-manager kube-scheduler
log "controller-manager and scheduler stopped"

# 2. The kubelet stops the pods and tears their sandboxes (and so their networks) down.
if alive kube-apiserver && alive kubelet && [ -n "$kubectl" ] && [ -f "$dir/kubeconfig" ]; then
  k() { "$kubectl" --kubeconfig "$dir/kubeconfig" --request-timeout=5s "$@"; }
  if [ -n "$(k get pods -A -o name 2>/dev/null | head -1)" ]; then
    k delete pods --all -A --grace-period=1 --wait=true --timeout=30s >/dev/null 2>&1 ||
      log "some pods did not go away in 30 s; killing what is left"
    log "pods deleted"
  fi
fi

# 3. The node's own daemons. kube-router leaves its chains and ipsets (removed below).
stop kube-router coredns kube-proxy kubelet
log "kube-router, coredns, kube-proxy, kubelet stopped"

# 4. Whatever still runs in a pod cgroup belongs to this node.
pod_pids() {
  local f
  for f in /sys/fs/cgroup/*/kubepods; do
    [ -d "$f" ] && find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}
mapfile -t pod_procs < <(pod_pids)
if [ ${#pod_procs[@]} -gt 0 ]; then
  kill -KILL "${pod_procs[@]}" 2>/dev/null
  terminate "${pod_procs[@]}"
  log "killed pod processes: ${#pod_procs[@]}"
fi

# 5. This containerd's shims (found by the socket they were started with), containerd.
shims=()
for p in /proc/[0-9]*; do
  cmd=$( { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null) || continue
  case "$cmd" in
    *containerd-shim*"-address $ctd_sock "*) shims+=("${p#/proc/}") ;;
  esac
done
if [ ${#shims[@]} -gt 0 ]; then
  kill -TERM "${shims[@]}" 2>/dev/null
  GRACE=2 terminate "${shims[@]}"
fi
stop containerd registry
log "containerd (and ${#shims[@]} shims), registry stopped"
stop kube-apiserver
log "kube-apiserver stopped"
stop etcd
log "etcd stopped"

# 6. Network namespaces, mounts under DIR.
for ns in /run/netns/cni-*; do
  [ -e "$ns" ] || continue
  ip netns delete "$(basename "$ns")" 2>/dev/null || { umount "$ns" 2>/dev/null; rm -f "$ns"; }
done
if [ -d "$dir" ]; then
  for _ in 1 2 3; do
    mounts=$(findmnt -rn -o TARGET | awk -v d="$dir/" 'index($0, d) == 1' | sort -r)
    [ -z "$mounts" ] && break
    while IFS= read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done <<<"$mounts"
  done
fi

log "network namespaces and mounts removed"

# 7. The bridge and the veths on it (a veth whose namespace is gone is gone too).
for v in $(ip -o link show master cni0 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
  ip link delete "$v" 2>/dev/null
done
ip link delete cni0 2>/dev/null

log "cni0 and its veths removed"

# 8. iptables chains of kube-proxy, the kubelet and the CNI plugins.
clean_chains() {
  local cmd=$1 table rules chains script
  for table in filter nat mangle raw; do
    rules=$("$cmd-save" -t "$table" 2>/dev/null) || continue
    chains=$(sed -n 's/^:\(\(KUBE\|CNI\)-[^ ]*\) .*/\1/p' <<<"$rules")
    [ -z "$chains" ] && continue
    # One transaction per table: delete the rules in other chains that jump into ours,
    # then flush and delete ours.
    script=$(
      echo "*$table"
      grep -E '^-A ' <<<"$rules" | grep -E -- '-j (KUBE|CNI)-' | grep -vE '^-A (KUBE|CNI)-' | sed 's/^-A /-D /'
      for c in $chains; do echo "-F $c"; done
      for c in $chains; do echo "-X $c"; done
      echo COMMIT
    )
    if ! "$cmd-restore" -w --noflush <<<"$script" 2>/dev/null; then
      # One rule at a time, ignoring what is already gone.
      while IFS= read -r line; do
        case "$line" in
          -D* | -F* | -X*) eval "\"$cmd\" -w -t \"$table\" $line" 2>/dev/null ;;
        esac
      done <<<"$script"
    fi
  done
}
clean_chains iptables
clean_chains ip6tables

log "iptables chains removed"

# 8b. kube-router's ipsets: its pod and CIDR sets and the TMP-<base32> sets of its
# atomic swaps (inet6: prefixed when IPv6). Only now, with no rule referring to them.
if command -v ipset >/dev/null; then
  for s in $(ipset list -n 2>/dev/null | grep -E '^(inet6:)?(KUBE-(SRC|DST)-[A-Z2-7]+|TMP-[A-Z2-7]{16})$'); do
    ipset destroy "$s" 2>/dev/null || log "ipset $s still in use"
  done
  log "ipsets removed"
fi

# 9. Pod cgroups: rmdir, deepest first. Never unmount a hierarchy.
for h in /sys/fs/cgroup/*/; do
  [ -d "$h/kubepods" ] && find "$h/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null
done

log "kubepods cgroups removed"

# 10. The kubelet's links in /var/log/containers into DIR; sysctls; DIR itself.
if [ -d /var/log/containers ]; then
  for l in /var/log/containers/*; do
    [ -L "$l" ] && case "$(readlink "$l")" in "$dir"/*) rm -f "$l" ;; esac
  done
fi
# The kubelet makes these whatever its configuration says (device plugins' socket,
# pod log links); remove what it left and the directories when they are then empty.
rm -f /var/lib/kubelet/device-plugins/kubelet.sock /var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet /var/log/pods /var/log/containers 2>/dev/null
# containerd's CNI library caches each attachment's result in /var/lib/cni/results
# whatever the configuration; entries outlive pods killed behind its back.
rm -f /var/lib/cni/results/sandcastle-* /var/lib/cni/results/cni-loopback-*
rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null
# containerd 1.6 puts its shims' sockets in /run/containerd/s whatever its state dir.
rmdir /run/containerd/s /run/containerd 2>/dev/null
if [ -f "$dir/sysctl.saved" ]; then
  while IFS= read -r kv; do sysctl -qw "$kv" 2>/dev/null; done <"$dir/sysctl.saved"
fi
if [ -d "$dir" ] && [ "$(findmnt -n -o SOURCE --mountpoint "$dir" 2>/dev/null)" = sandcastle-node ]; then
  # up.sh's tmpfs: unmount it, keeping the logs on the filesystem beneath.
  saved=$(mktemp -d)
  cp -a "$dir/logs" "$saved/" 2>/dev/null
  umount "$dir" 2>/dev/null || umount -l "$dir"
  rm -rf --one-file-system "$dir/logs"
  [ -d "$saved/logs" ] && mv "$saved/logs" "$dir/logs"
  rm -rf "$saved"
fi
if [ -d "$dir" ]; then
  if [ "$purge" = --purge ]; then
    rm -rf --one-file-system "$dir"
  else
    find "$dir" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf --one-file-system {} +
  fi
fi
log "cleaned up"
"$here/check-clean.sh" "$dir"
