#!/usr/bin/env bash
# Data-parallel training under plain mpirun (no horovodrun).
#
#   launch/mpirun.sh NP [iteravg train args...]
#   ITERAVG_COMM=mpi launch/mpirun.sh 3 --epochs 20      force the mpi4py communicator
#   HOSTFILE=hosts.txt launch/mpirun.sh 8                 several hosts (Open MPI hostfile)
#
# iteravg picks Horovod when it is built (it runs on MPI's ranks), else mpi4py; ITERAVG_COMM=horovod|mpi|local
# overrides. Needs Open MPI and the repo's .venv (`make setup`); on several hosts the same paths everywhere.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$here/.venv/bin/python" ] && export PATH="$here/.venv/bin:$PATH"
np=${1:?usage: $0 NP [iteravg train args...]}
shift
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=(-np "$np" --bind-to none --map-by slot --oversubscribe -x PATH -x OMP_NUM_THREADS -x LD_LIBRARY_PATH)
[ -n "${ITERAVG_COMM:-}" ] && args+=(-x ITERAVG_COMM)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
exec mpirun "${args[@]}" iteravg train "$@"
