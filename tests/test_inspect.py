"""`gptfast inspect`: every kernel and tuning config compiles for every listed architecture with no spills and within
its shared memory (in every run sm_90's 16-bit configs at head dim 64; all seven archs, every head dim and
both dtypes under `pytest -m slow`), Hopper configs use its tensor cores (HGMMA) and its TMA variants TMA loads,
every (kernel, head dim, dtype) has two configs or more on every architecture, and a bad config is caught."""
import os
import subprocess
import sys

import pytest
import triton

from gptfast import inspect
from gptfast.kernels import attention, attention_tuning, block_mask, cross_entropy, decode, layernorm


def _kernels(module):
    return {name for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.KernelInterface) and not name.startswith("_")
            and not isinstance(obj, triton.runtime.Autotuner) and obj.fn.__module__ == module.__name__}


def test_every_kernel_is_inspected():
    jobs = [job for make in (inspect.attention_jobs, inspect.flex_jobs, inspect.decode_jobs, inspect.layernorm_jobs,
                             inspect.cross_entropy_jobs) for job in make("sm_90")]
    assert {job.kernel for job in jobs} == {name for module in (attention, block_mask, decode, layernorm,
                                                                cross_entropy) for name in _kernels(module)}
    assert {job.flex for job in jobs if job.flex} == set(inspect.flex_variants())


@pytest.mark.parametrize("features", ["plain", "features", "mods"])
@pytest.mark.parametrize("name", attention_tuning.KERNELS)
@pytest.mark.parametrize("table", [arch for arch in inspect.ARCHS if arch != "sm_75"] + ["fp32", "interpreter"])
def test_every_head_dim_has_two_configs(name, table, features):
    """Two or more per (kernel, head dim, dtype, arch), plain, with features, and with gptfast.flex's mods, so
    the autotuner always has a choice; one in the interpreter, which times nothing. The single pass serves head
    dims up to 128."""
    wanted = 1 if table == "interpreter" else 2
    served = attention_tuning.UP_TO_128 if name == "backward_single_pass" else attention_tuning.UP_TO_256
    for block_d in served:
        configs = attention_tuning.configs_for(name, table, block_d, features != "plain", modded=features == "mods")
        assert len(configs) >= wanted, f"{name} on {table}: fewer than {wanted} configs for head dim {block_d}"


@pytest.mark.parametrize("features", [False, True], ids=["plain", "features"])
@pytest.mark.parametrize("name", ["forward", "backward_dkdv", "backward_dq"])
@pytest.mark.parametrize("table", [arch for arch in inspect.ARCHS if arch != "sm_75"] + ["interpreter"])
def test_head_dim_512_has_configs(name, table, features):
    """Head dim 512 runs 16-bit inputs without flex mods (attention_core.kernel_gap): two configs or more per
    16-bit table, but one for the dk/dv and dq kernels' feature tiles (the one that fits each arch) and in the
    interpreter; none in float32 nor for mods, which run PyTorch."""
    wanted = 1 if table == "interpreter" or (features and name != "forward") else 2
    configs = attention_tuning.configs_for(name, table, 512, features)
    assert len(configs) >= wanted, f"{name} on {table}: fewer than {wanted} configs for head dim 512"
    assert not attention_tuning.configs_for(name, "fp32", 512, features)
    assert table == "interpreter" or not attention_tuning.configs_for(name, table, 512, True, modded=True)


def test_every_row_block_has_a_layernorm_config():
    for n_cols in (1, 100, 1024, layernorm.MAX_FUSED_N, 65536):
        block_n, _ = layernorm._row_block(n_cols)
        for name in ("forward", "backward"):
            for arch in inspect.ARCHS:
                assert layernorm.configs_for(name, arch, block_n), f"{name} {arch}: no config for {n_cols} columns"


def test_a_spilling_config_is_caught():
    job = inspect.Job("layernorm", "layer_norm_backward_kernel", "sm_90", "fp32",
                      (("HAS_WEIGHT", True), ("HAS_DSUM", True), ("BLOCK_N", 8192), ("ROW_FITS", True)), 4, 1)
    before = os.environ.get("TRITON_INTERPRET")
    (row,) = inspect.compile_jobs([job], workers=1)
    assert inspect.problems(row) == "spills"
    # the worker compiled; this process interprets as before (a Triton module imported later checks it)
    assert os.environ.get("TRITON_INTERPRET") == before


def test_a_block_past_the_register_file_is_caught():
    """16 warps of 208 registers each (a head-dim-512 tile ptxas compiled so) cannot launch: 106,496 > 65,536."""
    job = inspect.Job("attention", "attention_backward_dq_kernel", "sm_90", "bf16", (), 16, 1, 255)
    row = {"job": job, "registers": 208, "spill_bytes": 0, "shared": 65536}
    assert inspect.problems(row) == "registers past the register file"
    assert inspect.problems({**row, "registers": 128}) is None


def inspect_rows(*archs, dtypes=(), head_dims=(), kernels=()):
    """`gptfast inspect` as a user runs it, for archs (and dtypes, head dims, kernel groups; default all): asserts
    exit 0 (every config of every variant compiles without spills and within shared memory) and returns its
    table's rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "gptfast", "inspect", *(f"--arch={arch}" for arch in archs),
               *(f"--dtype={dtype}" for dtype in dtypes), *(f"--head-dim={d}" for d in head_dims),
               *(f"--kernel={kernel}" for kernel in kernels)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("sm_")]
    assert rows and all(line.endswith(" ok") for line in rows)
    return rows


def check_hopper(rows):
    """Hopper's plain attention runs on HGMMA in every load variant (at head dim 256 the dk/dv kernel and one dq
    tile run HMMA; at 512, where 16 or 32 rows fit, every kernel does), and its TMA variants issue TMA loads
    (UTMALDG). The single pass's extra product has BLOCK_M rows: some of its tiles run HGMMA, the rest HMMA (at
    head dim 128 every 64-row tile spills)."""
    hopper = [line for line in rows if line.startswith("sm_90") and "bf16" in line and "+features" not in line
              and "+flex:" not in line
              and any(f"attention_{kernel}_kernel" in line for kernel in ("forward", "backward_dq", "backward_dkdv"))]
    two_kernel = [line for line in hopper if "+single-pass" not in line and "BLOCK_D=512" not in line and (
        "attention_forward_kernel" in line or "BLOCK_D=256" not in line)]
    assert len(two_kernel) > 20 and all("HGMMA" in line for line in two_kernel)
    assert any("HGMMA" in line for line in hopper if "+single-pass" in line)
    tma = [line for line in rows if line.startswith("sm_90") and "+tma" in line]
    assert len(tma) > 10 and all("UTMALDG" in line for line in tma)


def test_inspect_command_passes_for_h100():
    """sm_90's attention and decoding kernels with 16-bit inputs at GPT-2's head dim (64): CI's time (the whole of
    sm_90 with both dtypes took 17 minutes of it, head dims 64 and 128 five). Every head dim, float32's tiles, the
    other archs, LayerNorm's and the loss's kernels (31 configs, about a minute) and gptfast.flex's variants on
    every tile run under -m slow (here the flex jobs added 90 s)."""
    kernels = ["attention", "decode"]
    check_hopper(inspect_rows("sm_90", dtypes=["bf16"], head_dims=[64], kernels=kernels))


def test_flex_variants_compile_for_h100():
    """Each gptfast.flex variant in each attention kernel on sm_90 (16-bit, head dim 64, the first tile that
    serves mods) and create_block_mask's kernel: no spills, within shared memory; the forward keeps HGMMA."""
    jobs, seen = [], set()
    for job in inspect.flex_jobs("sm_90", ("bf16",)):
        if job.block_d() in (None, 64) and (job.kernel, job.flex) not in seen:
            seen.add((job.kernel, job.flex))
            jobs.append(job)
    rows = list(inspect.compile_jobs(jobs, workers=2))
    assert len(rows) == 4 * 3 + 3  # four variants in three kernels (the single pass is dk/dv's), block states x3
    assert [inspect.problems(row) for row in rows] == [None] * len(rows)
    assert all(row["tensor_cores"] == "HGMMA" for row in rows if row["job"].kernel == "attention_forward_kernel")


def test_fp8_kernels_compile_on_tensor_cores():
    """The FP8 forward (gptfast.fp8), its first plain tile at head dim 64 on each FP8 arch: no spills, within shared
    memory, on the arch's FP8 tensor-core instructions (Ada's and consumer Blackwell's mma QMMA, Hopper's wgmma
    QGMMA, Blackwell's tcgen05 UTCQMMA); the decoding kernel reading float8 caches (gptfast.kvcache), its first
    tile there, on the 16-bit ones it widens them for (HMMA, HGMMA, UTCHMMA); no FP8 configs before sm_89. Every
    FP8 config runs under -m slow."""
    jobs = [next(job for job in make(arch, ("fp8",)) if job.block_d() == 64)
            for make in (inspect.attention_jobs, inspect.decode_jobs) for arch in inspect.FP8_ARCHS]
    rows = list(inspect.compile_jobs(jobs, workers=2))
    assert [inspect.problems(row) for row in rows] == [None] * 8
    assert [row["tensor_cores"] for row in rows] == ["QMMA", "QGMMA", "UTCQMMA", "QMMA",
                                                     "HMMA", "HGMMA", "UTCHMMA", "HMMA"]
    assert not [job for make in (inspect.attention_jobs, inspect.decode_jobs)
                for job in make("sm_80", ("fp8",)) if job.dtype == "fp8"]


@pytest.mark.slow
def test_inspect_command_passes_for_every_arch():
    """Every listed arch; Blackwell's data-center chip runs its own tensor-core instructions (tcgen05, UTC*MMA)."""
    rows = inspect_rows(*inspect.ARCHS)
    assert {line.split()[0] for line in rows} == set(inspect.ARCHS)
    check_hopper(rows)
    assert any("UTCHMMA" in line for line in rows if line.startswith("sm_100 "))
