#!/usr/bin/env bash
# make gpu-check: everything a session with a GPU (H100 / H200) should run, in one call, in under 8 minutes.
#
#   environment   versions, nvidia-smi, `python -m promptkd.info` (promptkd imports from the checkout root itself:
#                 promptkd/kernels is a committed link to kernels/; `pip install -e .` offline builds the native
#                 library where the image can)
#   wheels        bench/wheels/*.whl installed with pip --no-deps --no-index (liger-kernel, flash-attn: the
#                 GPU baselines; the image has no internet), and which of the two are missing
#   test-gpu      what `make test-gpu` runs (pytest -m gpu), with 4 xdist workers when pytest-xdist is
#                 installed so that the Triton kernels compile in parallel
#   kd-*          bench/bench_kd_loss.py at N=8192 D=4096 V=128256 bf16, forward_kl, one process per impl
#                 (eager, chunked, triton, liger when installed), so that one failure loses one row
#   prefix-attn   bench/bench_prefix_attention.py, the kernel case at P=1024 N=1024 (SDPA flash, flex, triton)
#   promptkd-step bench/bench_promptkd_step.py on CUDA (B=8 N=512 V=128256 bf16)
#   sparse-kd     the benchmark suite's sparse_kd and topk groups on CUDA (N=8192 D=4096 V=128256 bf16; rows in
#                 bench/results/sparse_kd.csv, no peak-memory processes)
#
# Every step runs under `timeout` (SIGINT, then SIGKILL 10 s later), its cap cut to what is left of the whole
# budget (GPU_CHECK_BUDGET seconds, default 450; the last 30 s are kept for the kill grace and the summary, so
# the script ends within the budget); steps are skipped when no time is left; a failing step never stops it.
# Output in GPU_CHECK_OUT (default bench/results/gpu/): logs/<step>.log, info.json, the CSVs the benchmarks
# append to (kd_loss.csv, prefix_attention.csv, promptkd_step.csv) and summary.log (each step's status and
# time, then this run's benchmark rows as tables), printed last.
#
#   make gpu-check                      # or: bash bench/gpu_check.sh
#   GPU_CHECK_DRY=1 make gpu-check      # print the steps' commands, run nothing (no GPU needed)
#   GPU_CHECK_OUT=$OUT make gpu-check   # results where a remote runner collects them
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-bench/results/gpu}
BUDGET=${GPU_CHECK_BUDGET:-450}
DRY=${GPU_CHECK_DRY:-0}
STARTED=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)  # the benchmarks' timestamp format: this run's rows sort after it
mkdir -p "$OUT/logs"
SUMMARY=$OUT/summary.log
: >"$SUMMARY"
unset TRITON_INTERPRET  # the gpu tests and benchmarks need compiled kernels

section() { printf '\n===== %s  (%ss of %ss used) =====\n' "$1" "$SECONDS" "$BUDGET"; }
# cap CAP: CAP seconds, or what is left of the budget before its last 30 s when that is less.
cap() {
    local left=$((BUDGET - SECONDS - 30))
    echo $(($1 < left ? $1 : left))
}
record() { printf '%-16s %-28s %5ss\n' "$1" "$2" "$3" >>"$SUMMARY"; }

# step NAME CAP CMD...: CMD under timeout, output to the console and logs/NAME.log; status into the summary.
step() {
    local name=$1 cap=$2
    shift 2
    local t
    t=$(cap "$cap")
    section "$name"
    if ((t < 10)); then
        echo "skipped, the budget is spent: $*"
        record "$name" "SKIPPED (no time left)" 0
        return 0
    fi
    echo "+ timeout -s INT -k 10 $t $*"
    if [[ $DRY == 1 ]]; then
        record "$name" "dry run" 0
        return 0
    fi
    local t0=$SECONDS rc status
    timeout -s INT -k 10 "$t" "$@" </dev/null 2>&1 | tee "$OUT/logs/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${t}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    record "$name" "$status" $((SECONDS - t0))
    return 0
}

has_module() {
    local t
    t=$(cap 30)
    [[ $DRY != 1 ]] && ((t > 0)) && timeout -k 5 "$t" "$PY" -c "import $1" >/dev/null 2>&1
}

# --- environment -------------------------------------------------------------------------------------------
section "environment"
echo "repo $ROOT, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); python $PY; results in $OUT"
[[ $DRY == 1 ]] && echo "GPU_CHECK_DRY=1: printing the steps, running nothing"
step nvidia-smi 20 nvidia-smi
step versions 60 "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError as e:
    print('triton: not importable:', e)
print('cuda available:', torch.cuda.is_available(), '| devices:',
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
"
if [[ $DRY != 1 ]] && ! timeout -k 5 "$(cap 60)" "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device visible to torch: the gpu checks cannot run" >>"$SUMMARY"
    echo
    cat "$SUMMARY"
    exit 1
fi

section "promptkd importable"
if has_module promptkd.kernels; then
    echo "promptkd (with promptkd.kernels) imports"
elif [[ $DRY == 1 ]]; then
    echo "(if promptkd does not import: pip install --no-deps --no-build-isolation --no-index -e .)"
else
    step pip-install-e 150 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    has_module promptkd.kernels || echo "promptkd does not import (promptkd/kernels must link to ../kernels): the" \
        "steps below will fail"
fi
step promptkd-info 60 bash -c '"$0" -m promptkd.info && "$0" -m promptkd.info --json >"$1"' "$PY" "$OUT/info.json"

# --- carried wheels ----------------------------------------------------------------------------------------
section "wheels"
shopt -s nullglob
wheels=(bench/wheels/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
    step wheels 90 "$PY" -m pip install --no-deps --no-index "${wheels[@]}"
else
    echo "no bench/wheels/*.whl"
fi
for pkg in liger_kernel flash_attn; do
    if [[ $DRY == 1 ]]; then
        echo "(would check: import $pkg)"
    elif (($(cap 30) <= 0)); then
        echo "$pkg: not checked (no time left)" | tee -a "$SUMMARY"
    elif has_module $pkg; then
        echo "$pkg: installed" | tee -a "$SUMMARY"
    else
        echo "$pkg: MISSING (carry its wheel in bench/wheels/ for that baseline)" | tee -a "$SUMMARY"
    fi
done

# --- tests on the GPU --------------------------------------------------------------------------------------
if has_module xdist || [[ $DRY == 1 ]]; then
    step test-gpu 170 "$PY" -m pytest -q -m gpu -n 4 -p no:cacheprovider tests
else
    step test-gpu 170 make test-gpu PYTHON="$PY"
fi

# --- KD loss benchmark -------------------------------------------------------------------------------------
kd_impls=(eager chunked triton)
if has_module liger_kernel || [[ $DRY == 1 ]]; then kd_impls+=(liger); fi
for impl in "${kd_impls[@]}"; do
    step "kd-$impl" 90 "$PY" bench/bench_kd_loss.py --device cuda --n 8192 --d 4096 --v 128256 --dtype bfloat16 \
        --divergences forward_kl --impls "$impl" --reps 5 --out "$OUT/kd_loss.csv"
done

# --- prefix attention and the PromptKD step ----------------------------------------------------------------
step prefix-attn 100 "$PY" bench/bench_prefix_attention.py --device cuda --cases kernel --kernel-shapes 1024:1024 \
    --reps 3 --out "$OUT/prefix_attention.csv"
step promptkd-step 100 "$PY" bench/bench_promptkd_step.py --device cuda --reps 3 --out "$OUT/promptkd_step.csv"
step sparse-kd 100 "$PY" -m pytest -q -p no:cacheprovider bench/test_benchmarks.py -k "sparse_kd or topk" \
    --bench-device cuda --bench-no-memory --benchmark-only --benchmark-min-rounds 3 --benchmark-max-time 1

# --- summary -----------------------------------------------------------------------------------------------
section "summary"
if [[ $DRY != 1 ]]; then
    timeout -k 2 15 "$PY" - "$OUT" "$STARTED" >>"$SUMMARY" 2>&1 <<'EOF'
import csv
import sys
from pathlib import Path

out, started = Path(sys.argv[1]), sys.argv[2]


def this_run(path):
    return [r for r in csv.DictReader(path.open()) if r["timestamp"] >= started] if path.exists() else []


def fmt(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


rows = this_run(out / "kd_loss.csv")
if rows:
    eager = {r["divergence"]: float(r["median_s"]) for r in rows if r["impl"] == "eager"}
    print("\nKD loss, forward+backward (student hidden and weight gradients)")
    print(f"{'impl':10s} {'div':11s} {'N':>5s} {'D':>5s} {'V':>7s} {'dtype':9s} {'median ms':>10s} {'x eager':>8s} "
          f"{'x GEMMs':>8s} {'peak MB':>9s}")
    for r in rows:
        t = float(r["median_s"])
        base = eager.get(r["divergence"])
        print(f"{r['impl']:10s} {r['divergence']:11s} {r['n']:>5s} {r['d']:>5s} {r['v']:>7s} {r['dtype']:9s} "
              f"{t * 1e3:10.1f} {t / base if base else float('nan'):8.2f} {t / float(r['gemm_floor_s']):8.2f} "
              f"{float(r['peak_extra_mb']):9.1f}")
for name, keys in (("prefix_attention.csv", ("case", "shape", "impl", "median_s", "time_vs_baseline", "peak_extra_mb")),
                   ("promptkd_step.csv", ("way", "median_s", "time_vs_reference", "peak_extra_mb"))):
    if this_run(out / name):
        print(f"\n{name}")
        for r in this_run(out / name):
            print("  " + "  ".join(f"{k}={fmt(r.get(k, ''))}" for k in keys))
EOF
fi
printf 'total %ss of a %ss budget\n' "$SECONDS" "$BUDGET" >>"$SUMMARY"
echo
cat "$SUMMARY"
