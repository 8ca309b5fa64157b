"""gptfast's Triton kernels and their launchers, installed as ``gptfast.kernels``.

Launchers take tensors already checked by the public API in ``gptfast`` and trust them; each module documents
the layouts it expects.

GPTFAST_AUTOTUNE=0 makes every launcher use the first config of its tuning list instead of timing them all: for
correctness runs on a GPU, where compiling every config of every test shape would take longer than the tests."""
import os

import torch

AUTOTUNE = os.environ.get("GPTFAST_AUTOTUNE", "1") != "0"


def tuned(configs):
    """The configs the autotuner times: all of them, or only the first when GPTFAST_AUTOTUNE=0."""
    return configs if AUTOTUNE else configs[:1]


def device_arch(device):
    """The tuning-table key for a device: 'interpreter' on the CPU, else 'sm_90' for Hopper and 'sm_80' below."""
    if device.type != "cuda":
        return "interpreter"
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"
