#!/usr/bin/env bash
# launch/mpirun.sh -- data-parallel `iteravg train` under plain mpirun (no horovodrun).
#
# What it runs:
#   mpirun -np NP --bind-to none --map-by slot -x PATH -x OMP_NUM_THREADS [-x ITERAVG_*...] iteravg train [args...]
#
# Usage:
#   launch/mpirun.sh NP [iteravg train args...]
#
# Examples:
#   launch/mpirun.sh 2 --out runs/mpi                       # Horovod on MPI's ranks if built, else mpi4py
#   ITERAVG_COMM=mpi launch/mpirun.sh 3 --epochs 20         # force the mpi4py communicator
#   ITERAVG_COMM=horovod launch/mpirun.sh 2                 # require Horovod (error if it is not built)
#   HOSTFILE=hosts.txt launch/mpirun.sh 8 --out /shared/runs/a   # several hosts (Open MPI hostfile)
#
# Communicator: iteravg sees an MPI launch (OMPI_COMM_WORLD_SIZE / PMI / PMIx variables) and uses Horovod if it
# imports, else mpi4py. ITERAVG_COMM=horovod|mpi|local overrides that choice (`iteravg train --comm` too).
#
# Environment it needs: Open MPI's mpirun, and iteravg with mpi4py and/or Horovod (the repo's .venv/bin is put
# first on PATH when it exists; `make setup` creates it). On several hosts: the same paths everywhere and
# passwordless ssh. Exported to every rank with -x: PATH, OMP_NUM_THREADS, LD_LIBRARY_PATH and VIRTUAL_ENV/
# PYTHONPATH if set, and each ITERAVG_* variable that is set (ITERAVG_COMM, ITERAVG_NO_KERNEL, ITERAVG_FAULT,
# ITERAVG_STOP_AFTER_EPOCH). Sets OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1 as root, and --oversubscribe when NP
# exceeds this host's cores and no HOSTFILE is given. --bind-to none: MXNet and Horovod run helper threads.
# Optional: HOSTFILE=path (Open MPI hostfile), MPIRUN_ARGS="..." (extra mpirun options).
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
usage="usage: $0 NP [iteravg train args...]"
launch_setup "$usage" mpirun "${1:-}"
shift

args=(-np "$np" --bind-to none --map-by slot -x PATH -x OMP_NUM_THREADS)
for var in LD_LIBRARY_PATH VIRTUAL_ENV PYTHONPATH ITERAVG_COMM ITERAVG_NO_KERNEL ITERAVG_FAULT ITERAVG_STOP_AFTER_EPOCH; do
  [ -n "${!var:-}" ] && args+=(-x "$var")
done
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
elif [ "$np" -gt "$(nproc 2>/dev/null || echo 1)" ]; then
  args+=(--oversubscribe)
fi
# shellcheck disable=SC2206  # word splitting of the user's extra options is intended
[ -n "${MPIRUN_ARGS:-}" ] && args+=(${MPIRUN_ARGS})
exec mpirun "${args[@]}" iteravg train "$@"
