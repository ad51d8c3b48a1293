#!/usr/bin/env bash
# launch/containers.sh -- a private cluster of iteravg containers ("hosts" h1..hN with sshd) for multi-host jobs,
# with podman (default) or docker. `make test-hosts` (tests/hosts/suite.py) brings its cluster up and down with
# this script, so these are exactly the flags the suite ran with.
#
# Usage:
#   launch/containers.sh up [IMAGE]     network + containers h1..hN, waits until every host reaches every host by ssh
#   launch/containers.sh down           removes the containers and the network (also after a crash; idempotent)
#
# Then launch from h1 (one rank per host; the image's demo ssh key lets h1 start ranks on the others):
#   podman exec iteravg-h1 horovodrun -np 3 -H h1:1,h2:1,h3:1 --network-interface eth0 iteravg train --out /runs/a
#   podman exec iteravg-h1 horovodrun -np 3 -H h1:1,h2:1,h3:1 --network-interface eth0 --gloo iteravg train --out /runs/b
#   podman exec iteravg-h1 mpirun -np 3 -H h1:1,h2:1,h3:1 --bind-to none --mca btl tcp,self \
#       --mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0 -x ITERAVG_COMM=mpi -x PATH iteravg train --out /runs/c
#   podman exec iteravg-h1 iteravg inspect /runs/a/checkpoints          # rank 0's files live on h1 only
# (docker: the same with `docker exec`.)
#
# Variables:
#   ENGINE=podman|docker          default podman (run with the runc runtime: crun rejects cgroup v1 / hybrid hosts)
#   IMAGE=localhost/iteravg:latest   what `make image` (scripts/image.sh) builds
#   HOSTS_N=3                     number of hosts (at most 9)
#   ITERAVG_HOSTS_SUBNET=10.89.77 the network is $ITERAVG_HOSTS_SUBNET.0/24, host hI gets .1I (h1 = 10.89.77.11)
#   NETWORK=iteravg-hosts         the container network's name
# Why these flags:
#   --ulimit nofile=4096:4096 --ulimit nproc=4096:4096   explicit limits below the host's hard limits (sandboxes
#                                 refuse to raise them; the runtime's defaults may be higher); enough for Open MPI
#   --sysctl net.ipv4.tcp_retries2=5   per-container TCP: give up on an unacknowledged connection after ~10-25 s
#                                 instead of ~15 min, so ranks on a host that was cut off notice and exit
#   --add-host hJ:IP              every host resolves every other by name, without relying on the network's DNS
set -euo pipefail

ENGINE=${ENGINE:-podman}
IMAGE=${IMAGE:-localhost/iteravg:latest}
HOSTS_N=${HOSTS_N:-3}
PREFIX=${ITERAVG_HOSTS_SUBNET:-10.89.77}
NETWORK=${NETWORK:-iteravg-hosts}
engine=("$ENGINE")
[ "$ENGINE" = podman ] && engine+=(--runtime runc)
if ! [[ "$HOSTS_N" =~ ^[1-9]$ ]]; then
  echo "$0: HOSTS_N must be 1..9, got '$HOSTS_N'" >&2
  exit 2
fi

down() {
  for i in $(seq 1 9); do
    "${engine[@]}" rm -f -t 0 "iteravg-h$i" >/dev/null 2>&1 || true
  done
  "${engine[@]}" network rm -f "$NETWORK" >/dev/null 2>&1 || "${engine[@]}" network rm "$NETWORK" >/dev/null 2>&1 || true
}

up() {
  down
  "${engine[@]}" network create --subnet "$PREFIX.0/24" "$NETWORK" >/dev/null
  local i j add
  for i in $(seq 1 "$HOSTS_N"); do
    add=()
    for j in $(seq 1 "$HOSTS_N"); do
      [ "$j" = "$i" ] || add+=(--add-host "h$j:$PREFIX.1$j")
    done
    "${engine[@]}" run -d --name "iteravg-h$i" --hostname "h$i" --network "$NETWORK" --ip "$PREFIX.1$i" \
      "${add[@]}" --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --sysctl net.ipv4.tcp_retries2=5 \
      "$IMAGE" >/dev/null
  done
  # sshd starts with the container; wait until every host reaches every host (the launchers' transport).
  for i in $(seq 1 "$HOSTS_N"); do
    for j in $(seq 1 "$HOSTS_N"); do
      for try in $(seq 1 60); do
        "${engine[@]}" exec "iteravg-h$i" ssh -o BatchMode=yes -o ConnectTimeout=3 "h$j" true 2>/dev/null && break
        if [ "$try" = 60 ]; then echo "$0: ssh h$i -> h$j does not work" >&2; exit 1; fi
        sleep 1
      done
    done
  done
  echo "hosts up on $ENGINE network $NETWORK ($PREFIX.0/24):" \
    "$(for i in $(seq 1 "$HOSTS_N"); do printf 'h%s=%s.1%s ' "$i" "$PREFIX" "$i"; done)"
}

case "${1:-}" in
  up) IMAGE=${2:-$IMAGE}; up ;;
  down) down ;;
  *) echo "usage: $0 up [IMAGE] | down" >&2; exit 2 ;;
esac
