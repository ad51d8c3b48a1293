#!/usr/bin/env bash
# Data-parallel training across several hosts with horovodrun.
#
#   HOSTS=host1:4,host2:4 launch/horovodrun-multihost.sh 8 [iteravg train args...]
#
# Needs on every host: the same path to this repo and its .venv (run `make setup` on each, or share it),
# passwordless ssh from the launching host, and Open MPI. Optional:
#   NETWORK_INTERFACE=eth0   the interface Horovod/MPI should use (--network-interface)
#   GLOO=1                   use the Gloo controller instead of MPI
#   SSH_PORT=2222            if sshd does not listen on 22
# Only rank 0 (the first slot of the first host) writes checkpoints, report and plot: put --out and
# --checkpoint-dir on storage rank 0 can write; for --resume, rank 0 reads and broadcasts, so other hosts
# need no access to the checkpoint directory.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$here/.venv/bin/horovodrun" ] && export PATH="$here/.venv/bin:$PATH"
np=${1:?usage: HOSTS=h1:N,h2:N $0 NP [iteravg train args...]}
shift
: "${HOSTS:?set HOSTS=host1:slots,host2:slots}"
args=(-np "$np" -H "$HOSTS")
[ -n "${NETWORK_INTERFACE:-}" ] && args+=(--network-interface "$NETWORK_INTERFACE")
[ "${GLOO:-0}" = 1 ] && args+=(--gloo)
[ -n "${SSH_PORT:-}" ] && args+=(-p "$SSH_PORT")
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec horovodrun "${args[@]}" iteravg train "$@"
