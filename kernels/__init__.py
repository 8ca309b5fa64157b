"""gptfast's Triton kernels and their launchers, installed as ``gptfast.kernels``.

Launchers take tensors already checked by the public API in ``gptfast`` and trust them; each module documents
the layouts it expects.

GPTFAST_AUTOTUNE=0 makes every launcher use the first config of its tuning list instead of timing them: for
correctness runs on a GPU, where compiling every config of every test shape would take longer than the tests.
GPTFAST_AUTOTUNE=all times every config, where the default tunes in stages (gptfast.kernels.autotune)."""
import functools
import os
import warnings

import torch

AUTOTUNE = os.environ.get("GPTFAST_AUTOTUNE", "1") != "0"
EXHAUSTIVE = os.environ.get("GPTFAST_AUTOTUNE") == "all"


# The architectures with a tuning table of their own, by compute capability: Turing (T4; float16 only), Ampere
# A100 and consumer/A10 chips (99 KiB of shared memory), Ada, Hopper, Blackwell B200, Blackwell RTX 50xx (99 KiB).
ARCHS = {(7, 5): "sm_75", (8, 0): "sm_80", (8, 6): "sm_86", (8, 9): "sm_89", (9, 0): "sm_90", (10, 0): "sm_100",
         (12, 0): "sm_120"}


def device_arch(device):
    """The tuning-table key of a device: 'interpreter' on the CPU, else 'sm_XY' for its compute capability. A
    capability without a table of its own takes the nearest older one (the oldest for older chips), with a
    warning once."""
    return "interpreter" if device.type != "cuda" else arch_of(cuda_capability(device))


# Memos of host work that hold a variant choice (gptfast.attention_plan's plans): forced variants
# (attention_tuning.forced_variants) empty them when they change.
CHOICE_MEMOS = []


def forget_choices():
    """Empties the memos that hold a variant choice (CHOICE_MEMOS)."""
    for memo in CHOICE_MEMOS:
        memo.clear()


def remember(memo, key, value, limit=4096):
    """memo[key] = value; returns value. A memo of host work per signature (shapes and flags) empties itself when
    it holds limit entries rather than grow without bound (generation meets a new key length each step; packed
    batches bring new sequence lengths)."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value


def cuda_capability(device):
    """(major, minor) of a CUDA device, kept per numbered device (a tensor's): torch's query costs microseconds a
    call."""
    return _numbered_capability(device) if device.index is not None else torch.cuda.get_device_capability(device)


@functools.cache
def _numbered_capability(device):
    return torch.cuda.get_device_capability(device)


@functools.cache
def arch_of(capability):
    """The tuning-table key for a (major, minor) compute capability (see device_arch)."""
    if capability in ARCHS:
        return ARCHS[capability]
    older = [known for known in ARCHS if known < capability]
    arch = ARCHS[max(older)] if older else ARCHS[min(ARCHS)]
    warnings.warn(f"gptfast.kernels: no tuning table for compute capability {capability[0]}.{capability[1]}; "
                  f"using {arch}'s (check it with `gptfast inspect --arch {arch}`)", stacklevel=3)
    return arch


@functools.cache
def multiprocessors(device):
    """The device's streaming multiprocessors, or 3 in the interpreter, so that tests of grids sized from it
    still cross program boundaries."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def input_precision(dtype):
    """tl.dot's input_precision for tensors of dtype: float32 uses tf32 only where torch allows it for matmuls
    (torch.backends.cuda.matmul.allow_tf32), as torch's own attention does."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def next_power_of_2(n):
    """The least power of two >= n (1 for n <= 1): triton.next_power_of_2's value without its cost (a
    ConstexprFunction, about 5 us a call on this repository's CPU, on a host path that makes several)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a, b):
    """ceil(a / b) for positive ints: triton.cdiv's value without its cost (about 5 us a call, as
    next_power_of_2's): grids evaluate it at every launch."""
    return -(-a // b)


def padded_head_dim(head_dim, fp8=False):
    """The block a head dim is padded to: the next power of two, at least 16 (tl.dot's smallest K), 32 for float8
    inputs (tl.dot's smallest K for them)."""
    return max(FP8_MIN_K if fp8 else 16, next_power_of_2(head_dim))


FP8_MIN_K = 32
