# Shared set-up for the launch scripts (sourced, not run): checks the rank count, puts the repo's .venv on
# PATH, checks the launcher exists, and sets what Open MPI and MXNet need.
#   launch_setup USAGE LAUNCHER NP      sets $here and $np, exits 2 on a bad NP, 127 without LAUNCHER
launch_setup() {
  local usage=$1 launcher=$2
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  np=${3:-}
  if ! [[ "$np" =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage" >&2
    exit 2
  fi
  if [ -d "$here/.venv/bin" ]; then export PATH="$here/.venv/bin:$PATH"; fi
  if ! command -v "$launcher" >/dev/null 2>&1; then
    echo "$0: $launcher not found; run 'make setup' (or scripts/install.sh) first" >&2
    exit 127
  fi
  if [ "$(id -u)" -eq 0 ]; then  # Open MPI refuses to run as root otherwise
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one MXNet thread per rank; also what makes --resume exact
}
