#!/usr/bin/env bash
# Exits non-zero, listing each leftover, when anything of a local node is still on the
# machine:
#   tools/node/check-clean.sh [DIR]
# Checks: node processes (kubelet, containerd and its shims, kube-proxy, kube-scheduler,
# kube-router, docker-registry, coredns, runc, runsc and gVisor's sandbox and gofer;
# and any process whose command line names
# DIR), listeners on the node's fixed ports, /run/netns/cni-* and nsfs mounts, CNI
# veths, the cni0 bridge, KUBE-*/CNI-* chains (iptables and ip6tables; filter, nat,
# mangle, raw; kube-router's among them), kube-router's ipsets (KUBE-SRC-*, KUBE-DST-*,
# TMP-*), kubepods cgroups in every hierarchy, mounts under DIR and overlay mounts
# anywhere, the kubelet's /var/log/containers links into DIR.
set -uo pipefail
dir=${1:-}
if [ -n "$dir" ] && [ -d "$dir" ]; then dir=$(cd "$dir" && pwd); fi
left=()
add() { left+=("$1"); }

for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ "$pid" = $$ ] && continue
  comm=$(cat "$p/comm" 2>/dev/null) || continue
  # A zombie has exited already; its parent has just not reaped it yet.
  [ "$(awk '/^State:/ {print $2}' "$p/status" 2>/dev/null)" = Z ] && continue
  case "$comm" in
    kubelet | containerd | containerd-shim* | kube-proxy | kube-scheduler | kube-router | docker-registry | coredns | runc | runsc)
      cmd=$( { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null)
      # An empty command line is a process in the middle of exiting (its memory, and
      # with it its arguments, already released): it is on its way out, not left.
      [ -n "$cmd" ] && add "process $pid: $cmd" ;;
    *)
      cmd=$( { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null)
      # gVisor's sandbox and gofer re-execute runsc, so their comm is "exe".
      case "$cmd" in runsc-sandbox* | runsc-gofer*) add "process $pid: $cmd" ;; esac
      if [ -n "$dir" ]; then
        case "$cmd" in *"$dir"/*) add "process $pid: $cmd" ;; esac
      fi ;;
  esac
done

# kubelet, kubelet healthz, kube-proxy metrics and healthz, controller-manager, scheduler.
for port in 10250 10248 10249 10256 10257 10259; do
  ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && add "listener on port $port"
done

for ns in /run/netns/cni-*; do [ -e "$ns" ] && add "network namespace $ns"; done
while IFS= read -r m; do [ -n "$m" ] && add "nsfs mount $m"; done < <(findmnt -rn -t nsfs -o TARGET | grep -E '/cni-|/netns/')

ip link show cni0 >/dev/null 2>&1 && add "bridge cni0"
while IFS= read -r v; do
  [ -n "$v" ] && add "veth $v"
done < <(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^veth[0-9a-f]{8}$')

for cmd in iptables ip6tables; do
  for table in filter nat mangle raw; do
    while IFS= read -r c; do
      [ -n "$c" ] && add "$cmd -t $table chain $c"
    done < <("$cmd-save" -t "$table" 2>/dev/null | sed -n 's/^:\(\(KUBE\|CNI\)-[^ ]*\) .*/\1/p')
  done
done

if command -v ipset >/dev/null; then
  while IFS= read -r s; do
    [ -n "$s" ] && add "ipset $s"
  done < <(ipset list -n 2>/dev/null | grep -E '^(inet6:)?(KUBE-(SRC|DST)-[A-Z2-7]+|TMP-[A-Z2-7]{16})$')
fi

for h in /sys/fs/cgroup/*/; do
  [ -d "$h/kubepods" ] && add "cgroup ${h}kubepods"
done

while IFS= read -r m; do [ -n "$m" ] && add "overlay mount $m"; done < <(findmnt -rn -t overlay -o TARGET)
if [ -n "$dir" ]; then
  while IFS= read -r m; do [ -n "$m" ] && add "mount $m"; done < <(findmnt -rn -o TARGET | awk -v d="$dir/" 'index($0, d) == 1 || $0 == substr(d, 1, length(d) - 1)')
  if [ -d /var/log/containers ]; then
    for l in /var/log/containers/*; do
      [ -L "$l" ] && case "$(readlink "$l")" in "$dir"/*) add "log link $l" ;; esac
    done
  fi
fi

# Paths the kubelet, containerd and the CNI library create whatever their configuration
# says; down.sh removes them.
for d in /var/lib/kubelet /var/log/pods /var/log/containers /run/containerd /var/lib/cni; do
  [ -e "$d" ] && add "kubelet path $d"
done

if [ ${#left[@]} -gt 0 ]; then
  echo "check-clean: left behind by a node:" >&2
  printf '  %s\n' "${left[@]}" >&2
  exit 1
fi
echo "check-clean: nothing of a node is left" >&2
