#!/usr/bin/env bash
# launch/horovodrun-local.sh -- data-parallel `iteravg train` on THIS host, one process per rank, via horovodrun.
#
# What it runs:
#   horovodrun -np NP -H localhost:NP iteravg train [args...]
#   horovodrun -np NP -H localhost:NP python3 benchmarks/bench_sync.py    (when the first argument is --bench-sync)
#
# Usage:
#   launch/horovodrun-local.sh NP [iteravg train args...]
#   launch/horovodrun-local.sh NP --bench-sync
#
# Examples:
#   launch/horovodrun-local.sh 2 --out runs/demo                          # what `make demo` runs
#   launch/horovodrun-local.sh 4 --epochs 60 --strategy alpha-suffix --alpha 0.5 --out runs/a
#   launch/horovodrun-local.sh 2 --out runs/a --resume                     # continue from runs/a/checkpoints
#   GLOO=1 launch/horovodrun-local.sh 3 --out runs/gloo                    # Gloo controller instead of MPI
#   launch/horovodrun-local.sh 2 --bench-sync                              # epoch-end sync vs raw allreduce
#
# Environment it needs:
#   * horovodrun (Horovod 0.28.1 built with MXNet) and iteravg on PATH. The repo's .venv/bin is put first on
#     PATH when it exists (`make setup` / scripts/install.sh creates it).
#   * Open MPI (Horovod's default MPI controller), or GLOO=1 for the Gloo controller (no MPI needed at run time).
# Environment it sets:
#   * OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 when run as root (Open MPI refuses root otherwise).
#   * OMPI_MCA_rmaps_base_oversubscribe=1 when NP > number of cores (allowed, but slower); a value you set wins.
#   * OMP_NUM_THREADS=1 unless set (one MXNet thread per rank; also what makes --resume bitwise exact).
# Optional:
#   GLOO=1                   use Horovod's Gloo controller (on the loopback interface)
#   HOROVODRUN_ARGS="..."    extra horovodrun options, e.g. "--timeline-filename /tmp/tl.json"
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
usage="usage: $0 NP [iteravg train args...] | $0 NP --bench-sync"
launch_setup "$usage" horovodrun "${1:-}"
shift
if [ "$np" -gt "$(nproc 2>/dev/null || echo 1)" ]; then
  export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
fi

args=(-np "$np" -H "localhost:$np")
[ "${GLOO:-0}" = 1 ] && args+=(--gloo --network-interface lo)
# shellcheck disable=SC2206  # word splitting of the user's extra options is intended
[ -n "${HOROVODRUN_ARGS:-}" ] && args+=(${HOROVODRUN_ARGS})

if [ "${1:-}" = "--bench-sync" ]; then
  shift
  exec horovodrun "${args[@]}" python3 "$here/benchmarks/bench_sync.py" "$@"
fi
exec horovodrun "${args[@]}" iteravg train "$@"
