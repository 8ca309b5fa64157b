"""`gptfast inspect`: every kernel and tuning config compiles for sm_80 and sm_90 with no spills and within shared
memory, Hopper configs use its tensor cores (HGMMA), and a bad config is caught."""
import os
import subprocess
import sys

import pytest
import triton

from gptfast import inspect
from gptfast.kernels import attention, cross_entropy, layernorm


def _kernels(module):
    return {name for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.KernelInterface) and not name.startswith("_")
            and not isinstance(obj, triton.runtime.Autotuner) and obj.fn.__module__ == module.__name__}


def test_every_kernel_is_inspected():
    jobs = inspect.attention_jobs("sm_90") + inspect.layernorm_jobs("sm_90") + inspect.cross_entropy_jobs("sm_90")
    assert {job.kernel for job in jobs} == _kernels(attention) | _kernels(layernorm) | _kernels(cross_entropy)


@pytest.mark.parametrize("features", [False, True], ids=["plain", "features"])
@pytest.mark.parametrize("name", ["forward", "backward_dkdv", "backward_dq"])
@pytest.mark.parametrize("table", ["sm_90", "sm_80", "fp32", "interpreter"])
def test_every_head_dim_has_a_config(name, table, features):
    for block_d in attention.UP_TO_256:
        assert attention.configs_for(name, table, block_d, features), \
            f"{name} on {table}: no config for head dim {block_d}"


def test_every_row_block_has_a_layernorm_config():
    for n_cols in (1, 100, 1024, layernorm.MAX_FUSED_N, 65536):
        block_n, _ = layernorm._row_block(n_cols)
        for name in ("forward", "backward"):
            for arch in ("sm_90", "sm_80"):
                assert layernorm.configs_for(name, arch, block_n), f"{name} {arch}: no config for {n_cols} columns"


def test_a_spilling_config_is_caught():
    job = inspect.Job("layernorm", "layer_norm_backward_kernel", "sm_90", "fp32",
                      (("HAS_WEIGHT", True), ("HAS_DSUM", True), ("BLOCK_N", 8192), ("ROW_FITS", True)), 4, 1)
    (row,) = inspect.compile_jobs([job], workers=1)
    assert inspect.problems(row) == "spills"


def test_inspect_command_passes_for_both_archs():
    """The full command, as a user runs it: exit 0 (every config of every variant compiles without spills), and
    Hopper's plain attention runs on HGMMA."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "gptfast", "inspect"], capture_output=True, text=True, env=env,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("sm_")]
    assert rows and all(line.endswith(" ok") for line in rows)
    hopper_attention = [line for line in rows if line.startswith("sm_90") and "[bf16" in line
                        and ("attention_forward_kernel" in line or "dq_kernel" in line or
                             ("dkdv_kernel" in line and "BLOCK_D=256" not in line))]
    assert len(hopper_attention) > 30 and all("HGMMA" in line for line in hopper_attention)
