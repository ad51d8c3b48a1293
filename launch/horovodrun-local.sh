#!/usr/bin/env bash
# Data-parallel training with synchronised averaging on this host, one process per rank.
#
#   launch/horovodrun-local.sh NP [iteravg train args...]      e.g. launch/horovodrun-local.sh 2 --epochs 40
#   launch/horovodrun-local.sh NP --bench-sync                 the sync-vs-raw-allreduce benchmark
#
# Needs: horovodrun and iteravg on PATH (the repo's .venv/bin is used if present; `make setup` creates it),
# Open MPI (Horovod's MPI controller) or GLOO=1 for the Gloo controller. As root, Open MPI refuses to run
# unless OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (set here when running as root). More
# ranks than cores is allowed (oversubscription), at the cost of speed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$here/.venv/bin/horovodrun" ] && export PATH="$here/.venv/bin:$PATH"
np=${1:?usage: $0 NP [iteravg train args...]}
shift
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
controller=()
[ "${GLOO:-0}" = 1 ] && controller=(--gloo --network-interface lo)
if [ "${1:-}" = "--bench-sync" ]; then
  exec horovodrun -np "$np" -H "localhost:$np" "${controller[@]}" python "$here/benchmarks/bench_sync.py"
fi
exec horovodrun -np "$np" -H "localhost:$np" "${controller[@]}" iteravg train "$@"
