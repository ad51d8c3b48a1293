#!/usr/bin/env bash
# Install everything iteravg needs on a fresh Debian machine (root) or container.
# Shared by the Makefile (`make setup`) and docker/Dockerfile, so both install the same way.
#
# Idempotent: each step checks whether it is already done, so a second run takes seconds.
# Usage: scripts/install.sh [VENV_DIR]   (default: .venv at the repo root; "system" installs into the current python)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
# Absolute, so that paths derived from it (the stamp directory, the CMake toolchain file Horovod's build reads from
# its own build directory) mean the same thing wherever they are used.
case $venv in system | /*) ;; *) venv=$PWD/$venv ;; esac
stamp_dir=$venv/.iteravg-stamps

log() { printf '[install] %s\n' "$*" >&2; }

# 1. System packages: Open MPI (Horovod's MPI controller, mpi4py) and Debian's cmake 3.x
#    (pip's cmake 4.x rejects gloo's CMakeLists; Horovod's build needs cmake < 4).
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include ] \
  || dpkg -s libopenmpi-dev >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# 2. The virtual environment.
if [ "$venv" = system ]; then
  py=$(command -v python3)  # resolved now: the Horovod step puts /usr/bin first on PATH
  stamp_dir=/var/lib/iteravg-stamps
else
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  py=$venv/bin/python
fi
mkdir -p "$stamp_dir"
pip() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

# 3. Python dependencies, in the order that works: numpy pinned for mxnet (numpy 1.24 removed np.bool),
#    then mxnet, then (optionally) torch, then Horovod built from source against them.
# Stamps carry a hash of their requirements file, so editing it re-runs that step.
base_stamp=$stamp_dir/base-$(sha256sum "$here/requirements/base.txt" | cut -c1-12)
dev_stamp=$stamp_dir/dev-$(sha256sum "$here/requirements/dev.txt" | cut -c1-12)
if [ ! -e "$base_stamp" ]; then
  log "installing numpy, mxnet, mpi4py and test/doc tools"
  pip --upgrade "pip<26" wheel "setuptools<70"
  pip -r "$here/requirements/base.txt"
  touch "$base_stamp"
fi
# Optional: CPU PyTorch, before Horovod so that Horovod builds its PyTorch binding too (~50 s, ~870 MB;
# ITERAVG_TORCH=0 skips it). --no-deps: torch's metadata asks for setuptools>=77, which would replace the
# setuptools<70 Horovod's build needs; requirements/torch.txt lists torch's other runtime dependencies.
# A failure only skips the torch tests and builds Horovod without its PyTorch binding.
torch_hash=$(sha256sum "$here/requirements/torch.txt" | cut -c1-12)
torch_stamp=$stamp_dir/torch-$torch_hash
has_torch() { "$py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)'; }
if [ "${ITERAVG_TORCH:-1}" != 0 ] && { [ ! -e "$torch_stamp" ] || ! has_torch; }; then
  log "installing CPU PyTorch (optional)"
  if pip --no-deps -r "$here/requirements/torch.txt"; then
    touch "$torch_stamp"
  else
    log "warning: PyTorch could not be installed; tests/test_torch_example.py will be skipped"
  fi
fi
# Horovod 0.28.1 from source against the numpy, mxnet and torch above: MPI + Gloo controllers, the MXNet binding,
# and the PyTorch binding when torch is installed (iteravg's Horovod communicator uses horovod.torch in jobs that
# never import MXNet, so they do not load it: src/iteravg/comm/horovod.py).
# * Debian's cmake first on PATH: a cmake 4.x from pip would break gloo's build.
# * torch >= 2.1's headers stop with "#error C++17 or later compatible compiler is required to use PyTorch",
#   while Horovod 0.28.1 (the last release) hard-codes set(CMAKE_CXX_STANDARD 14) (upstream's fix, horovod
#   PR #3998, came after it). A CMake toolchain file, given through the CMAKE_TOOLCHAIN_FILE environment variable
#   (cmake >= 3.21; bookworm has 3.25), has CMake read it again as a C++ rules override once the compiler is set
#   up, where it makes the flag CMake emits for C++14 be -std=c++17: the whole build is C++17, sources unchanged.
# * The stamp lists the bindings built; the step reruns when one of them no longer imports, or when the wanted
#   set changes (an existing MXNet-only build is rebuilt once when torch is there).
build_horovod() {  # $1: with (1) or without (0) the PyTorch binding
  local torch_env=(HOROVOD_WITHOUT_PYTORCH=1)
  if [ "$1" = 1 ]; then
    local toolchain=$stamp_dir/horovod-cxx17.cmake
    printf '%s\n' 'set(CMAKE_USER_MAKE_RULES_OVERRIDE_CXX "${CMAKE_CURRENT_LIST_FILE}")' \
      'set(CMAKE_CXX14_STANDARD_COMPILE_OPTION "-std=c++17")' \
      'set(CMAKE_CXX14_EXTENSION_COMPILE_OPTION "-std=gnu++17")' > "$toolchain"
    torch_env=(HOROVOD_WITH_PYTORCH=1 "CMAKE_TOOLCHAIN_FILE=$toolchain")
  fi
  # --force-reinstall --no-deps: rebuild over an installed horovod 0.28.1 (pip would call it satisfied);
  # the second call then only adds Horovod's missing runtime dependencies.
  env PATH=/usr/bin:$PATH MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}" \
    HOROVOD_WITH_MXNET=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 "${torch_env[@]}" \
    "$py" -m pip install --disable-pip-version-check -q --no-build-isolation --no-cache-dir --force-reinstall \
      --no-deps horovod==0.28.1 \
  && pip horovod==0.28.1
}
hvd_want=mxnet
if has_torch; then hvd_want="mxnet torch"; fi
hvd_stamp=$stamp_dir/horovod-${hvd_want// /-}$([ "$hvd_want" = mxnet ] || echo "-$torch_hash")
hvd_built() {
  [ -s "$hvd_stamp" ] || return 1
  local b
  for b in $(cat "$hvd_stamp"); do "$py" -c "import horovod.$b" >/dev/null 2>&1 || return 1; done
}
if ! hvd_built; then
  if [ "$hvd_want" != mxnet ]; then
    log "building horovod 0.28.1 from source (MXNet + PyTorch bindings, MPI + Gloo), ~8 min on 2 cores"
    if build_horovod 1; then
      echo "mxnet torch" > "$hvd_stamp"
    else
      log "warning: Horovod's PyTorch binding did not build; building Horovod with MXNet only" \
        "(numpy and torch jobs under horovodrun then load MXNet)"
      build_horovod 0
      echo mxnet > "$hvd_stamp"
    fi
  else
    log "building horovod 0.28.1 from source (MXNet + MPI + Gloo), ~80 s"
    build_horovod 0
    echo mxnet > "$hvd_stamp"
  fi
fi
if [ ! -e "$dev_stamp" ]; then
  log "installing test and docs dependencies"
  pip -r "$here/requirements/dev.txt"
  touch "$dev_stamp"
fi
# The averaging study's data (pmdarima, statsmodels), constrained so nothing already pinned moves (ITERAVG_STUDY=0
# skips it: the container image has no use for it).
study_stamp=$stamp_dir/study-$(sha256sum "$here/requirements/study.txt" | cut -c1-12)
if [ "${ITERAVG_STUDY:-1}" != 0 ] && [ ! -e "$study_stamp" ]; then
  log "installing the study's data packages"
  pip -r "$here/requirements/study.txt" -c "$here/requirements/base.txt" -c "$here/requirements/dev.txt"
  touch "$study_stamp"
fi
# Optional: Lightning for iteravg.lightning and gluonts.torch's estimators (needs the torch step; same --no-deps
# reason, see requirements/lightning.txt). A failure only skips the Lightning tests.
lightning_stamp=$stamp_dir/lightning-$(sha256sum "$here/requirements/lightning.txt" | cut -c1-12)
if [ "${ITERAVG_TORCH:-1}" != 0 ] && has_torch && { [ ! -e "$lightning_stamp" ] || ! "$py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("lightning") is None)'; }; then
  log "installing Lightning (optional)"
  if pip --no-deps -r "$here/requirements/lightning.txt"; then
    touch "$lightning_stamp"
  else
    log "warning: Lightning could not be installed; tests/test_lightning*.py will be skipped"
  fi
fi
# 4. iteravg itself (editable, cheap; always re-run so entry points follow pyproject.toml).
if [ "$venv" != system ] || [ -e "$here/pyproject.toml" ]; then
  pip --no-deps --no-build-isolation -e "$here"
fi
log "ok: $("$py" -c 'import mxnet, horovod, numpy; print("mxnet", mxnet.__version__, "horovod", horovod.__version__, "numpy", numpy.__version__)')"
log "horovod bindings: $(cat "$hvd_stamp")"
