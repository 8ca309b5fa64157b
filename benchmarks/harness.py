"""What the pytest-benchmark suites share: gptfast and its PyTorch baselines side by side, in one process.

Timing: every benchmark's clock synchronises the GPU before it reads the time, so a round of N calls is measured
from idle to idle (pytest-benchmark warms up first and reports the median of many rounds). On the GPU a round
lasts at least 1 ms (pytest-benchmark calibrates N to that), so the synchronisation and the first launch's
latency, some 10 us, stay near 1% of it even for the shortest kernels, and calls queue back to back as they do
in a model. Inputs rotate among enough copies to exceed the GPU's L2 cache, so repeated calls do not measure the
cache.
Sizes: full on a CUDA machine; small on a CPU-only one, where the suite runs PyTorch and gptfast's CPU path in
under two minutes and GPU-only cases skip with a reason.
Throughput goes into each benchmark's extra_info (tflops or gb_per_s), with the implementation and the case.
On a CPU (without Triton's interpreter) gptfast's ops run PyTorch itself: each gptfast record then names the
baseline whose code it ran (same_code_as), and the summary says so rather than report noise as a speed-up.
"""
import os
import time

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = DEVICE == "cuda"
# gptfast's kernels, compiled, on the GPU (an error if they cannot run, never a silent fallback); its CPU path
# elsewhere.
GPTFAST_BACKEND = "triton" if DEVICE == "cuda" else "auto"
KERNELS_RUN = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
L2_BYTES = 64 << 20  # H200: 60 MB; inputs rotate through at least 4x this


def synchronized_clock():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# The GPU check's CPU dry run (GPU_CHECK_SMALL=1) checks that every case runs and reports, not what it measures:
# one round each, no warm-up.
DRY_RUN = os.environ.get("GPU_CHECK_SMALL") == "1"


def benchmark_marker():
    """pytest-benchmark's settings for every benchmark here: the synchronising clock, warm-up, enough rounds."""
    if DRY_RUN:
        return pytest.mark.benchmark(timer=synchronized_clock, warmup=False, min_rounds=1, max_time=0.0)
    return pytest.mark.benchmark(timer=synchronized_clock, warmup=True, warmup_iterations=2, min_rounds=5,
                                 min_time=1e-3 if FULL else 5e-6, max_time=0.15 if FULL else 0.05)


def rotating(make_inputs, bytes_per_set):
    """A callable returning input sets in turn: enough sets that their total exceeds 4x the L2 cache (one set on
    the CPU, where caches are not the question)."""
    count = max(1, min(16, -(-4 * L2_BYTES // max(bytes_per_set, 1)))) if FULL else 1
    sets = [make_inputs() for _ in range(count)]
    state = {"next": 0}

    def take():
        inputs = sets[state["next"] % count]
        state["next"] += 1
        return inputs

    return take


def measure(benchmark, fn, *, group, impl, cpu_twin, flops=None, bytes_moved=None, **case):
    """Runs the benchmark and records throughput from its median: flops -> TFLOP/s, bytes -> GB/s,
    tokens -> tokens/s. cpu_twin: the baseline whose very code gptfast runs where its kernels cannot."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, **case)
    if impl.startswith("gptfast") and not KERNELS_RUN:
        benchmark.extra_info["same_code_as"] = cpu_twin
    benchmark(fn)
    if benchmark.stats is None:  # --benchmark-disable (or under xdist): the case ran once, as a smoke test
        return
    median = benchmark.stats.stats.median
    if "tokens" in case:
        benchmark.extra_info["tokens_per_s"] = case["tokens"] / median
    if flops is not None:
        benchmark.extra_info["tflops"] = flops / median / 1e12
    if bytes_moved is not None:
        benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e9
