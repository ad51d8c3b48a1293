#!/usr/bin/env bash
# iteravg's CUDA path, checked in one short run on a GPU machine (written for the lent H200: 1 GPU, 16 cores).
#
#   bash scripts/gpu_check.sh               # results in $OUT (the device tool's folder), else runs/gpu_check
#
# What it runs, each step under its own time limit (about 3 minutes in all; at most ~7 if every step times out):
#   0. the optional C fold kernel (gcc, setup.py's flags; numpy gives the same bits without it)
#   1. the environment: nvidia-smi, Python, torch, CUDA devices, numpy              -> env.txt
#   2. tests/test_torch_cuda.py (CUDA variants; the 2-GPU NCCL job skips on 1 GPU,
#      two ranks sharing the GPU run over Gloo)                                     -> tests-cuda.xml
#   3. examples/torch_ddp.py and examples/torch_fsdp2.py on the GPU, one process
#      (FSDP2: 2 epochs, then a resume for a 3rd); under torchrun too with >= 2 GPUs
#   4. benchmarks/bench_torch.py --device cuda (per-step paths vs AveragedModel,
#      timm, bare _foreach_lerp_ and the HBM bound)                                 -> bench-step.json
#   5. benchmarks/bench_torch.py --sync under torchrun, 2 ranks: NCCL on 2 GPUs,
#      else Gloo on the CPU cores (labelled)                                        -> bench-sync.json
#   and prints a summary (each step's exit code and seconds, the RATIOS lines) last -> summary.txt, gpu_check.log
#
# With the device tool (docs/torch.md, "Checking on a GPU"): the tool sends the session's own checkout, so this
# script and the code it checks must be committed there (on main) first. Then one call:
#   run(command="bash scripts/gpu_check.sh", timeout_s=480)
# and give_back() afterwards unless rerunning at once.
#
# Packages: the machine's image already holds what this needs -- python3 3.12 with a CUDA build of PyTorch, numpy
# 2.x, safetensors, pytest, pytest-timeout (/work/.library/device/KINDS.md). iteravg itself runs from src/
# (PYTHONPATH); its optional C kernel is compiled with gcc first if it can be (else the numpy fallback gives the
# same bits, slower). A CUDA torch
# wheel (about 1 GB with its NVIDIA libraries) could not travel anyway (64 MiB per call). Should a package be
# missing, carry it as a wheel in .whl/ (ignored by git) -- prepared on the developer machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl NAME==VERSION
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480)
# and this script installs .whl/*.whl first (pip --no-index --no-deps into /tmp/site, put first on PYTHONPATH).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/iteravg-gpu-check.XXXXXX)"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export ITERAVG_COLLECTIVE_TIMEOUT=60   # a stuck collective ends its job within a minute, with a report

say() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run under a time limit, output to the log, exit code and time to the summary.
step() {
    local name="$1" limit="$2"
    shift 2
    say ""
    say "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (TIMED OUT)"
    printf '%-34s exit %3s  %4ss%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" >>"$SUMMARY"
    return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
    step "install .whl/*.whl" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# The optional C fold kernel, built as setup.py would (same flags): without it numpy gives the same bits, slower
# (the CPU sync benchmark would measure numpy's fingerprints). A missing compiler only costs that.
SUFFIX=$("$PY" -c "import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])" 2>/dev/null | tail -n 1)
step "build the C kernel (optional)" 60 gcc -O3 -std=c99 -ffp-contract=off -fno-fast-math -fno-strict-aliasing \
    -shared -fPIC src/iteravg/core/_foldkernel.c -o "src/iteravg/core/_foldkernel${SUFFIX:-.so}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import numpy, torch
    print("numpy", numpy.__version__, "| torch", torch.__version__, "| cuda", torch.version.cuda,
          "| available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    import torch.distributed as dist
    print("nccl", dist.is_nccl_available(), "| gloo", dist.is_gloo_available())
    import iteravg, iteravg.torch, safetensors, pytest
    from iteravg.core import _kernel
    print("iteravg from", iteravg.__file__, "| C kernel", _kernel.KERNELS is not None, "| safetensors",
          safetensors.__version__, "| pytest", pytest.__version__)
except Exception as exc:  # still report what was found
    print("IMPORT PROBLEM:", type(exc).__name__, exc)
EOF
    nproc
} >"$OUT/env.txt" 2>&1
tee -a "$LOG" <"$OUT/env.txt"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null | tail -n 1)
[[ "$GPUS" =~ ^[0-9]+$ ]] || GPUS=0
say "CUDA devices: $GPUS"
if [ "$GPUS" = 0 ]; then
    say "WARNING: no CUDA device visible to $PY: the CUDA tests will skip and the benchmark falls back to the CPU"
fi
DEV=cuda
[ "$GPUS" = 0 ] && DEV=cpu
TORCHRUN=("$PY" -m torch.distributed.run --standalone)

step "tests/test_torch_cuda.py" 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_torch_cuda.py \
    --junitxml "$OUT/tests-cuda.xml"

step "example torch_ddp (1 process)" 90 "$PY" examples/torch_ddp.py --epochs 4 --out "$WORK/ddp"
step "example torch_fsdp2 (1 process)" 90 "$PY" examples/torch_fsdp2.py --epochs 2 --out "$WORK/fsdp"
step "example torch_fsdp2 --resume" 90 "$PY" examples/torch_fsdp2.py --epochs 3 --out "$WORK/fsdp" --resume
if [ "$GPUS" -ge 2 ]; then
    step "example torch_ddp (torchrun 2)" 120 "${TORCHRUN[@]}" --nproc_per_node 2 examples/torch_ddp.py \
        --epochs 4 --out "$WORK/ddp2"
    step "example torch_fsdp2 (torchrun 2)" 120 "${TORCHRUN[@]}" --nproc_per_node 2 examples/torch_fsdp2.py \
        --epochs 2 --out "$WORK/fsdp2"
fi
for f in "$WORK"/*/rank-*.json; do
    [ -f "$f" ] && say "$f: $(tr -d '\n ' <"$f" | cut -c1-400)"
done

step "bench_torch --device $DEV" 150 "$PY" benchmarks/bench_torch.py --device "$DEV" --json "$OUT/bench-step.json"

SYNC_DEV=cpu
[ "$GPUS" -ge 2 ] && SYNC_DEV=cuda
step "bench_torch --sync ($SYNC_DEV, 2 ranks)" 150 "${TORCHRUN[@]}" --nproc_per_node 2 benchmarks/bench_torch.py \
    --sync --device "$SYNC_DEV" --json "$OUT/bench-sync.json"

rm -rf "$WORK"
{
    echo ""
    echo "=== summary ($(date -u +%FT%TZ), $GPUS CUDA device(s); sync benchmark on $SYNC_DEV)"
    cat "$SUMMARY"
    grep -h -E "^(torch .* on |RATIOS|\([ab]\) |[0-9.]+M float32|epoch_end )" "$LOG" || true
    grep -h -E "^(FAILED|ERROR|SKIPPED|[0-9]+ (passed|failed))| passed| failed" "$LOG" | tail -n 20 || true
} | tee -a "$LOG" >"$OUT/summary.tmp"
mv "$OUT/summary.tmp" "$SUMMARY"
cat "$SUMMARY"
