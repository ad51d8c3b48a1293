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
