"""Attention, forward and forward+backward: gptfast (the autotuner's choice, and each variant forced: the
pointer-loading forward with the two-kernel backward, and the TMA forward, plain or persistent, with the single-pass
backward; kernels/attention_tuning.py; and the FP8 forward on float8 inputs, gptfast.fp8, beside bfloat16's) against
torch's SDPA (its default choice and each of its flash, cuDNN, efficient and math backends), and flash_attn when it
is installed.

FLOPs are counted as FlashAttention's benchmarks count them: 4 * B * H * Tq * Tk * D for the forward (two
matrix products of 2 * Tq * Tk * D each), halved when causal; the backward does 2.5 times the forward's work, so
forward+backward counts 3.5 times it. Every case keeps B * T = 16k tokens and H * D = 2048 (FlashAttention's
benchmark setting) on the GPU; on a CPU the sizes are small.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness import DEVICE, FULL, GPTFAST_BACKEND, measure, rotating
from gptfast import use_backend
from gptfast.attention import flash_attn_func, scaled_dot_product_attention
from gptfast.kernels.attention_tuning import VariantUnavailable, forced_variants

if FULL:
    TOKENS, WIDTH, SEQLENS = 16384, 2048, (512, 1024, 2048, 4096, 8192, 16384)
    SETTINGS = ([(torch.bfloat16, d, c) for c in (True, False) for d in (64, 128)] + [(torch.float16, 128, True)]
                + [(torch.bfloat16, 256, True)])
    MATH_MAX_SEQLEN = 4096  # the math backend materialises (B, H, T, T) scores
else:
    TOKENS, WIDTH, SEQLENS = 512, 256, (128, 256)
    SETTINGS = [(torch.bfloat16, 64, c) for c in (True, False)]
    MATH_MAX_SEQLEN = 256


def _sdpa_with(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _gptfast(q, k, v, causal):
    with use_backend(GPTFAST_BACKEND):
        return scaled_dot_product_attention(q, k, v, is_causal=causal)


def _gptfast_fp8(q, k, v, causal):
    """The FP8 forward (gptfast.fp8) on float8 inputs made beforehand (make_inputs), descales 1."""
    with use_backend(GPTFAST_BACKEND):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


def _flash_attn(q, k, v, causal):
    from flash_attn import flash_attn_func
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


IMPLS = {
    "gptfast": _gptfast,
    "gptfast-pointers-two-kernel": _gptfast,
    "gptfast-tma-single-pass": _gptfast,
    "gptfast-persistent-single-pass": _gptfast,
    "gptfast-fp8": _gptfast_fp8,
    "torch-sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "torch-flash": _sdpa_with(SDPBackend.FLASH_ATTENTION),
    "torch-cudnn": _sdpa_with(SDPBackend.CUDNN_ATTENTION),
    "torch-efficient": _sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
    "torch-math": _sdpa_with(SDPBackend.MATH),
    "flash_attn": _flash_attn,
}
# gptfast's variants, forced for the whole step (forward and backward): attention_tuning's docstring.
FORCED = {"gptfast-pointers-two-kernel": ("pointers", "two_kernel"), "gptfast-tma-single-pass": ("tma", "single_pass"),
          "gptfast-persistent-single-pass": ("tma_persistent", "single_pass")}
GPU_ONLY = {"torch-flash", "torch-cudnn", "torch-efficient", "flash_attn", "gptfast-fp8", *FORCED}


def cannot_run(impl, error):
    """Whether error is the documented "this implementation does not take this case": a forced gptfast variant
    outside its limits, or a forced SDPA backend with no kernel for these inputs. Anything else is a failure."""
    if impl in FORCED:
        return isinstance(error, VariantUnavailable)
    return impl.startswith("torch-") and impl != "torch-sdpa" and "No available kernel" in str(error)


def attention_flops(batch, heads, seqlen, head_dim, causal, mode):
    forward = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


# Setting by setting, most used first (SETTINGS' order), so that a run cut short by its time limit loses the
# last settings whole rather than every setting's backward.
CASES = [(mode, dtype, head_dim, causal, seqlen) for dtype, head_dim, causal in SETTINGS
         for mode in ("fwd", "fwd_bwd") for seqlen in SEQLENS]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-D{c[2]}-{'causal' if c[3] else 'full'}"
                                                       f"-T{c[4]}")
def test_attention(benchmark, case, impl):
    mode, dtype, head_dim, causal, seqlen = case
    if impl in GPU_ONLY and DEVICE != "cuda":
        pytest.skip(f"{impl} needs a CUDA GPU")
    if impl == "torch-math" and seqlen > MATH_MAX_SEQLEN:
        pytest.skip(f"the math backend materialises the T x T scores; skipped past T={MATH_MAX_SEQLEN}")
    if impl == "flash_attn":
        pytest.importorskip("flash_attn")
    if impl == "gptfast-fp8" and (mode != "fwd" or dtype != torch.bfloat16 or head_dim > 128
                                  or torch.cuda.get_device_capability() < (8, 9)):
        pytest.skip("the FP8 forward is timed beside bfloat16's at head dims 64 and 128, on sm_89 and newer")
    batch, heads = TOKENS // seqlen, WIDTH // head_dim
    backward = mode == "fwd_bwd"
    inputs_dtype = torch.float8_e4m3fn if impl == "gptfast-fp8" else dtype

    def make_inputs():
        make = lambda: torch.randn(batch, heads, seqlen, head_dim, device=DEVICE, dtype=dtype,
                                   requires_grad=backward).to(inputs_dtype)
        return make(), make(), make(), torch.randn(batch, heads, seqlen, head_dim, device=DEVICE, dtype=dtype)

    take = rotating(make_inputs, 4 * batch * heads * seqlen * head_dim * dtype.itemsize)
    attend = IMPLS[impl]
    def step():
        q, k, v, grad_out = take()
        with forced_variants(*FORCED.get(impl, (None, None))):
            if not backward:
                return attend(q, k, v, causal)
            q.grad = k.grad = v.grad = None
            attend(q, k, v, causal).backward(grad_out)

    try:
        step()
    except (RuntimeError, ValueError) as error:
        if not cannot_run(impl, error):
            raise
        pytest.skip(f"{impl} does not run this case: {str(error).splitlines()[0][:150]}")

    group = f"attention {mode} {str(dtype)[6:]} D={head_dim} {'causal' if causal else 'full'} T={seqlen}"
    measure(benchmark, step, cpu_twin="torch-sdpa", group=group, impl=impl,
            flops=attention_flops(batch, heads, seqlen, head_dim, causal, mode), op="attention", mode=mode,
            dtype=str(dtype)[6:], head_dim=head_dim, causal=causal, seqlen=seqlen)
