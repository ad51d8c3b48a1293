#!/usr/bin/env bash
# launch/horovodrun-multihost.sh -- data-parallel `iteravg train` across several hosts with horovodrun.
#
# What it runs:
#   horovodrun -np NP -H $HOSTS [--network-interface IF] [--gloo] [-p PORT] iteravg train [args...]
#
# Usage:
#   HOSTS=host1:4,host2:4 launch/horovodrun-multihost.sh NP [iteravg train args...]
#
# Examples:
#   HOSTS=node1:4,node2:4 launch/horovodrun-multihost.sh 8 --epochs 100 --out /shared/runs/a
#   HOSTS=node1:2,node2:2 NETWORK_INTERFACE=eth0 launch/horovodrun-multihost.sh 4 --out runs/b
#   HOSTS=node1:2,node2:2 GLOO=1 NETWORK_INTERFACE=eth0 launch/horovodrun-multihost.sh 4
#
# Environment it needs, on EVERY host:
#   * this repository at the same path, with its .venv (`make setup` on each host, or a shared file system);
#   * passwordless ssh from the launching host to every other host (and host keys already accepted);
#   * Open MPI (the default MPI controller), or GLOO=1 for the Gloo controller;
#   * TCP reachability between hosts on the chosen interface (Horovod opens its own ports).
# Variables:
#   HOSTS                    required: comma-separated host:slots; the first slot of the first host is rank 0
#   NETWORK_INTERFACE=eth0   optional: interface for Horovod and MPI traffic (--network-interface)
#   GLOO=1                   optional: Horovod's Gloo controller instead of MPI (--gloo)
#   SSH_PORT=2222            optional: if sshd does not listen on 22 (-p)
#   HOROVODRUN_ARGS="..."    optional: extra horovodrun options
# Only rank 0 writes checkpoints, report.json and val_loss.png: put --out / --checkpoint-dir on storage rank 0
# can write. For --resume rank 0 reads and broadcasts, so the other hosts need no access to the checkpoints.
# horovodrun forwards the launching shell's environment (PATH, OMP_NUM_THREADS, ITERAVG_*) to every rank.
#
# Containers as hosts (what `make test-hosts` runs; see docker/README.md): `launch/containers.sh up` starts
# iteravg-h1..3 on a private podman (ENGINE=docker: docker) network, then from h1, one rank per host:
#   podman exec iteravg-h1 horovodrun -np 3 -H h1:1,h2:1,h3:1 --network-interface eth0 iteravg train --out /runs/a
#   podman exec iteravg-h1 horovodrun -np 3 -H h1:1,h2:1,h3:1 --network-interface eth0 --gloo iteravg train --out /runs/b
# Failing fast when a host dies or is cut off (measured times in docs/launching.md): set on every host
#   sysctl net.ipv4.tcp_retries2=5                      (~10-25 s instead of ~15 min for a silent peer)
#   oob_tcp_keepalive_time = 5, _intvl = 2, _probes = 3 in openmpi-mca-params.conf (orted notices a lost launcher)
#   ssh ServerAliveInterval 5 / sshd ClientAliveInterval 5
# and export HOROVOD_STALL_CHECK_TIME_SECONDS=10 HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=30 before launching.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
usage="usage: HOSTS=host1:N,host2:N $0 NP [iteravg train args...]"
launch_setup "$usage" horovodrun "${1:-}"
shift
if [ -z "${HOSTS:-}" ]; then
  echo "$0: set HOSTS=host1:slots,host2:slots" >&2
  echo "$usage" >&2
  exit 2
fi

args=(-np "$np" -H "$HOSTS")
[ -n "${NETWORK_INTERFACE:-}" ] && args+=(--network-interface "$NETWORK_INTERFACE")
[ "${GLOO:-0}" = 1 ] && args+=(--gloo)
[ -n "${SSH_PORT:-}" ] && args+=(-p "$SSH_PORT")
# shellcheck disable=SC2206  # word splitting of the user's extra options is intended
[ -n "${HOROVODRUN_ARGS:-}" ] && args+=(${HOROVODRUN_ARGS})
exec horovodrun "${args[@]}" iteravg train "$@"
