#!/usr/bin/env bash
# Stops one component of the node tools/node/up.sh started in DIR and starts it again
# the same way, for fault tests:
#   tools/node/restart.sh DIR NAME [DOWN_SECONDS]
# NAME is a process up.sh recorded in DIR/pids (kubelet, kube-apiserver, containerd,
# ...). It gets SIGTERM (SIGKILL after 10 s); after DOWN_SECONDS (default 0) the same
# command line runs again with the same environment and working directory, as up.sh
# runs it (own session, output appended to DIR/logs/NAME.log, pid in DIR/pids). Prints
# the new pid. What the process had on the machine stays (a kubelet's pods run on
# under containerd), which is the point.
set -euo pipefail
dir=${1:?usage: restart.sh DIR NAME [DOWN_SECONDS]}
name=${2:?usage: restart.sh DIR NAME [DOWN_SECONDS]}
down=${3:-0}
[ "$(id -u)" = 0 ] || { echo "restart.sh: must run as root" >&2; exit 1; }
pidfile=$dir/pids/$name.pid
[ -f "$pidfile" ] || { echo "restart.sh: no $pidfile: not a component of this node" >&2; exit 1; }
pid=$(cat "$pidfile")
[ -r "/proc/$pid/cmdline" ] || { echo "restart.sh: $name ($pid) is not running" >&2; exit 1; }
# Taken from the running process, so that the restart is exactly what up.sh started.
mapfile -d '' -t command <"/proc/$pid/cmdline"
mapfile -d '' -t environment <"/proc/$pid/environ"
cwd=$(readlink "/proc/$pid/cwd")
kill -TERM "$pid"
for _ in $(seq 100); do
  [ -e "/proc/$pid" ] || break
  sleep 0.1
done
if [ -e "/proc/$pid" ]; then
  kill -KILL "$pid"
  while [ -e "/proc/$pid" ]; do sleep 0.1; done
fi
sleep "$down"
cd "$cwd"
env -i "${environment[@]}" setsid "${command[@]}" >>"$dir/logs/$name.log" 2>&1 </dev/null &
echo $! >"$pidfile"
echo $!
