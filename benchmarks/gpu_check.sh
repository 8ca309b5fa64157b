#!/usr/bin/env bash
# The one-call GPU check, for a CUDA machine with no network (an H200 lent for a few minutes):
#   versions and the GPU; 1. the ceilings (copy bandwidth, bf16 matmul rate); 2. the kernel tests on CUDA,
#   compiled, not interpreted, while other processes build what the benchmarks will run; 3. the benchmark suites
#   at full size (torch.compile baselines last); 4. a markdown report and PNG charts; then the first training
#   step's time in a new process, with Triton's cache empty, warm, and after `gptfast warmup`.
# Everything lands in OUTDIR; a short table ends the output. It runs on the machine's own python3 and packages
# (torch 2.11 and triton 3.6 expected, not our pins) and imports gptfast from a copy of this checkout, so nothing
# is installed. Each phase has its own time limit, so one slow phase cannot take the others' results with it:
# 30+120+150+30+40+20+30+15+20+30+20+30+45 s, about 9.5 minutes (the compiled baselines also get the time the others
# left unused), and for the first step 90+30+120+30 s at most, about 2.5 minutes expected.
# A limit sends SIGINT: pytest stops and still writes its summary and the benchmarks it finished.
#
# usage: benchmarks/gpu_check.sh OUTDIR
# env:   PYTHON (default python3); GPU_CHECK_SMALL=1 for a CPU dry run of every phase at tiny sizes (but the
#        torch.compile baselines where no GPU is: they build on CUDA only);
#        GPU_CHECK_TESTS (pytest arguments for phase 2, paths relative to the repository; default the kernel
#        and model test files).
set -uo pipefail
if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'  # the comment above
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SMALL=${GPU_CHECK_SMALL:-0}
LOG="$OUT/check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

# gptfast/ with kernels/ inside it, importable without pip; run from there so it shadows nothing else.
PKG=$(mktemp -d)
cp -r "$REPO/gptfast" "$PKG/gptfast" && cp -r "$REPO/kernels" "$PKG/gptfast/kernels"
export PYTHONPATH="$PKG" PYTHONUNBUFFERED=1
# Kernels compile on the GPU. On a CPU dry run the tests interpret them (tests/conftest.py turns that on) and
# the benchmarks measure gptfast's CPU path, as `pytest benchmarks` does on any CPU machine.
unset TRITON_INTERPRET
# Started from inside a pytest-xdist worker (the dry-run test), pytest-benchmark would switch itself off.
unset PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT PYTEST_XDIST_TESTRUNUID PYTEST_CURRENT_TEST
cd "$PKG" || exit 1
PYTEST=("$PY" -m pytest -p no:cacheprovider --rootdir "$REPO" -c "$REPO/setup.cfg")

say "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}  gpu {gpu}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total \
    --format=csv,noheader 2>&1 | tee -a "$LOG"

# limit SECONDS COMMAND...: SIGINT at the limit, SIGKILL 15 s later if that was not enough; works even where this
# script was started with SIGINT ignored (in the background), see benchmarks/limit.py. The limits are the GPU
# run's: a CPU dry run checks that every phase runs and reports, not how fast a CPU shared with other tests is,
# so it runs each command to its end (tests/test_gpu_check.py tests limit.py itself).
if [ "$SMALL" = 1 ]; then
    limit() { shift; "$@"; }
else
    limit() { "$PY" "$REPO/benchmarks/limit.py" "$@"; }
fi

say "== 1/4 ceilings"
limit 30 "$PY" "$REPO/benchmarks/ceilings.py" --output "$OUT/ceilings.json" $([ "$SMALL" = 1 ] && echo --small) \
    2>&1 | tee -a "$LOG"

say "== 2/4 tests on the device (first tuning config per kernel: GPTFAST_AUTOTUNE=0); meanwhile other processes"
say "   build the benchmarks' kernels and compiled baselines, running each once, untimed"
# Triton compiles an autotuned kernel's configs one after another, about a second each (some 90 for the suites),
# and torch.compile builds GPT-2's training step for about a minute. Built here, in parallel with the tests (which
# time nothing), they land in Triton's and Inductor's on-disk caches, where the timed runs find them; the
# autotuner still times every config itself, alone on the GPU.
BUILT=()
for suite in attention layernorm gpt loss decode varlen flex models ring; do
    BUILT+=("$REPO/benchmarks/bench_$suite.py")
done
# A CPU dry run builds one suite: the interpreter compiles nothing, so there building checks only the command.
[ "$SMALL" = 1 ] && BUILT=("$REPO/benchmarks/bench_layernorm.py")
limit 120 "${PYTEST[@]}" -q -n "$([ "$SMALL" = 1 ] && echo 2 || echo 6)" --benchmark-disable -k "gptfast or compiled" \
    "${BUILT[@]}" > "$OUT/build.txt" 2>&1 &
BUILD=$!
TESTS=()
for arg in ${GPU_CHECK_TESTS:-tests/test_attention.py tests/test_attention_variants.py tests/test_varlen.py tests/test_kvcache.py tests/test_layernorm.py tests/test_model.py tests/test_packing.py tests/test_hf.py tests/test_flex.py tests/test_sinks.py tests/test_head_dims.py tests/test_chunked.py tests/test_paged.py tests/test_fp8.py -n 10}; do
    if [ -e "$REPO/${arg%%::*}" ]; then TESTS+=("$REPO/$arg"); else TESTS+=("$arg"); fi  # paths are the repo's
done
# The whole output goes to the log, its end to the screen; up to 10 failures, so one does not hide the rest.
GPTFAST_AUTOTUNE=0 limit 120 "${PYTEST[@]}" -q -rf --tb=short --maxfail=10 "${TESTS[@]}" > "$OUT/tests.txt" 2>&1
say "tests exit status: $?"
tail -n 25 "$OUT/tests.txt"
cat "$OUT/tests.txt" >> "$LOG"
wait "$BUILD"
say "building exit status: $? after $SECONDS s in all; $(tail -n 1 "$OUT/build.txt")"
cat "$OUT/build.txt" >> "$LOG"
rm -f "$OUT/tests.txt" "$OUT/build.txt"

say "== 3/4 benchmarks"
# One pytest run per suite, each with its own limit (pytest-benchmark writes its JSON only at the end of a run).
BENCH=("${PYTEST[@]}" -q --benchmark-columns=median,rounds --benchmark-sort=name)
run_suite() {  # name, seconds, pytest arguments...
    local name=$1 seconds=$2
    shift 2
    limit "$seconds" "${BENCH[@]}" "$@" --benchmark-json "$OUT/part_$name.json" > "$OUT/part_$name.txt" 2>&1
    say "$name: exit status $? after $SECONDS s in all; $(tail -n 1 "$OUT/part_$name.txt")"
    cat "$OUT/part_$name.txt" >> "$LOG"
    rm -f "$OUT/part_$name.txt"
}
run_suite attention 150 "$REPO/benchmarks/bench_attention.py"
run_suite layernorm 30 "$REPO/benchmarks/bench_layernorm.py" -m "not compiled"
run_suite gpt 40 "$REPO/benchmarks/bench_gpt.py" -m "not compiled"
run_suite loss 20 "$REPO/benchmarks/bench_loss.py"
run_suite decode 30 "$REPO/benchmarks/bench_decode.py"
run_suite varlen 15 "$REPO/benchmarks/bench_varlen.py"
run_suite flex 20 "$REPO/benchmarks/bench_flex.py" -m "not compiled"
run_suite models 30 "$REPO/benchmarks/bench_models.py"
run_suite ring 20 "$REPO/benchmarks/bench_ring.py"
# Ring attention over real ranks where the machine has several GPUs (two gloo processes on a CPU dry run).
GPUS=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null) | grep -c '^GPU')
if [ "$GPUS" -ge 2 ] || [ "$SMALL" = 1 ]; then
    limit 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$([ "$GPUS" -ge 2 ] && echo "$GPUS" || echo 2)" \
        "$REPO/benchmarks/bench_ring.py" "$OUT/ring_ranks.jsonl" > "$OUT/ring_ranks.txt" 2>&1
    say "ring over $GPUS GPUs: exit status $?; $(tail -n 1 "$OUT/ring_ranks.jsonl" 2>/dev/null)"
    cat "$OUT/ring_ranks.txt" >> "$LOG"
    rm -f "$OUT/ring_ranks.txt"
fi
# torch.compile baselines last: building them takes most of their time, and a run cut short loses only itself.
# They also share what the phases before them left unused of their limits, the whole check ending by 555 s.
if [ "$SMALL" = 1 ] && [ "$GPUS" -eq 0 ]; then
    say "compiled baselines: not run (a CPU dry run: they build on CUDA only)"
else
    SPARE=$((555 - SECONDS - 105)); [ "$SPARE" -lt 0 ] && SPARE=0
    run_suite layernorm_compiled $((30 + SPARE / 4)) "$REPO/benchmarks/bench_layernorm.py" -m compiled
    run_suite flex_compiled $((30 + SPARE / 4)) "$REPO/benchmarks/bench_flex.py" -m compiled
    LAST=$((555 - SECONDS)); [ "$LAST" -lt 45 ] && LAST=45
    run_suite gpt_compiled "$LAST" "$REPO/benchmarks/bench_gpt.py" -m compiled
fi

say "== 4/4 report"
PARTS=()
for f in "$OUT"/part_*.json; do [ -s "$f" ] && PARTS+=("$f"); done
if [ ${#PARTS[@]} -gt 0 ]; then
    "$PY" "$REPO/benchmarks/report.py" --ceilings "$OUT/ceilings.json" --output "$OUT/report.md" \
        --merged-json "$OUT/results.json" "${PARTS[@]}" >> "$LOG" 2>&1
    rm -f "${PARTS[@]}"
    "$PY" "$REPO/benchmarks/plot.py" --output-dir "$OUT" "$OUT/results.json" 2>&1 | tee -a "$LOG"
    say "== summary (full table in report.md)"
    grep -E '^Machine|T=4096|T=16384|N=4096|gpt2|lm loss|Tk=65536|varlen|flex|create_block|gpt-oss|deepseek|llama4|gemma4' "$OUT/report.md" | head -n 60 | tee -a "$LOG"
else
    say "no benchmark results to report"
fi

say "== first step: a GPT-2 small training step in a new process, Triton's cache empty, then warm, then after"
say "   gptfast warmup filled a new one (benchmarks/first_step.py; load, first and second step in seconds)"
# Last, so that a device run cut short loses only this. Each process gets a cache directory of its own choosing.
FIRST=("$PY" "$REPO/benchmarks/first_step.py")
SHAPE=$([ "$SMALL" = 1 ] && echo 2x32 || echo 8x1024)
"${FIRST[@]}" save "$PKG/model" $([ "$SMALL" = 1 ] && echo --small) 2>&1 | tee -a "$LOG"
for run in "empty cache:cold:90" "warm cache:cold:30" "warmup:warmup:120" "after gptfast warmup:warmup:30"; do
    IFS=: read -r label cache seconds <<< "$run"
    if [ "$label" = warmup ]; then
        TRITON_CACHE_DIR="$PKG/cache_$cache" limit "$seconds" "$PY" -m gptfast warmup --model "$PKG/model" \
            --train "$SHAPE" --prefill 16 2>&1 | tail -n 1 | tee -a "$LOG"
    else
        TRITON_CACHE_DIR="$PKG/cache_$cache" limit "$seconds" "${FIRST[@]}" step "$PKG/model" "$SHAPE" "$label" \
            "$OUT/first_step.jsonl" 2>&1 | tail -n 1 | tee -a "$LOG"
    fi
done
rm -rf "$PKG"
