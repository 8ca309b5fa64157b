"""Head dims past the usual on the kernels: a value head dim unlike the query's (DeepSeek's MLA attends with
192-wide queries and keys and 128-wide values), head dims that are not multiples of 8 (flash-attn's own tests
use 59 and 111), head dims past 256 (Gemma 4's global layers: 512), against the float64 reference: output and
every gradient, with the other features, varlen, both backward variants and gptfast.flex."""
import warnings

import pytest
import torch

from gptfast import backend
from gptfast.attention import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from gptfast.flex import create_block_mask, flex_attention, noop_mask, reference_flex
from gptfast.flex_mods import causal_mask
from gptfast.kernels import attention_tuning as tuning
from support import (BOTTOM_RIGHT, NONE, TOP_LEFT, bthd, check_against_reference, mask_args, random_qkv, seed_of,
                     shape_id)
from tolerance import DEVICE, assert_accurate

# (batch, heads, kv_heads, Tq, Tk, head_dim, head_dim_v), each with a dtype and a causal mode, so that every
# length (1, 7, 100, 257), Tq != Tk, GQA and each dtype meet a value head dim unlike the query's or an odd one.
CASES = [
    ((1, 2, 1, 1, 1, 192, 128), TOP_LEFT, torch.bfloat16),
    ((2, 2, 2, 7, 7, 24, 40), NONE, torch.float32),
    ((1, 4, 2, 100, 57, 40, 16), BOTTOM_RIGHT, torch.float16),
    ((1, 1, 1, 257, 30, 16, 72), BOTTOM_RIGHT, torch.bfloat16),
    ((1, 2, 2, 7, 100, 59, 59), NONE, torch.float16),
    ((1, 2, 1, 100, 7, 111, 111), TOP_LEFT, torch.float32),
    ((2, 1, 1, 33, 33, 3, 250), TOP_LEFT, torch.bfloat16),
]

# Past 256 (padded to 512): 16-bit inputs, lengths 1, 7 and 33, Tq != Tk both ways, GQA, D != Dv.
WIDE_CASES = [
    ((1, 2, 1, 7, 7, 512, 512), TOP_LEFT, torch.bfloat16),
    ((1, 1, 1, 1, 20, 300, 300), BOTTOM_RIGHT, torch.float16),
    ((1, 2, 2, 33, 17, 384, 264), NONE, torch.bfloat16),
]


def case_id(case):
    shape, causal, dtype = case
    return f"{shape_id(shape[:6])}Dv{shape[6]}-{causal}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES + WIDE_CASES, ids=case_id)
def test_head_dims_match_the_reference(case, kernels_only):
    shape, causal, dtype = case
    seed = seed_of(*case)
    q, k, v = random_qkv(*shape[:6], dtype, seed=seed, head_dim_v=shape[6])
    kwargs = mask_args(causal, shape[3], shape[4])
    check_against_reference(q, k, v, causal, lambda q, k, v: scaled_dot_product_attention(
        q, k, v, enable_gqa=True, **kwargs), seed=seed)


@pytest.mark.parametrize("backward, dtype", [("two_kernel", torch.float32), ("single_pass", torch.bfloat16)])
def test_mla_head_dims_with_every_score_feature(backward, dtype, kernels_only):
    """D 48 and Dv 24 (MLA's 3:2, small) with a window, softcapping, ALiBi and sinks, GQA, each backward variant."""
    q, k, v = random_qkv(2, 4, 2, 30, 45, 48, dtype, seed=17, head_dim_v=24)
    slopes = torch.rand(4).to(DEVICE)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(17)).to(DEVICE)
    options = dict(causal=True, window_size=(20, 6), softcap=3.0, alibi_slopes=slopes)
    run = lambda q, k, v, sinks: flash_attn_func(*bthd(q, k, v), sinks=sinks, **options).transpose(1, 2)
    with tuning.forced_variants(backward=backward):
        check_against_reference(q, k, v, BOTTOM_RIGHT, run, seed=17, sinks=sinks, window=(20, 6), softcap=3.0,
                                alibi=slopes.expand(2, 4))


def _varlen_run(q, k, v, cu_seqlens, longest):
    """flash_attn_varlen_func's output and gradients for packed q, k, v (total, H, D)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu_seqlens, cu_seqlens, longest, longest, causal=True)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out))
    return {"out": out, **{f"d{name}": t.grad for name, t in zip("qkv", leaves)}}


def test_varlen_value_head_dim():
    """Packed sequences of lengths 7, 1 and 40, D 40 and Dv 24, GQA: the kernels against PyTorch's per-sequence
    path in float64 (and in float16, the rule's baseline)."""
    cu_seqlens = torch.tensor([0, 7, 8, 48], dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(5)
    q, k = torch.randn(48, 4, 40, generator=generator), torch.randn(48, 2, 40, generator=generator)
    v = torch.randn(48, 2, 24, generator=generator)
    with backend.use_backend("triton"):
        got = _varlen_run(*(t.to(DEVICE, torch.float16) for t in (q, k, v)), cu_seqlens, 40)
    with backend.use_backend("torch"):
        ref64 = _varlen_run(*(t.to(DEVICE, torch.float64) for t in (q, k, v)), cu_seqlens, 40)
        lowp = _varlen_run(*(t.to(DEVICE, torch.float16) for t in (q, k, v)), cu_seqlens, 40)
    for name, value in got.items():
        assert value.shape == ref64[name].shape
        assert_accurate(f"varlen {name}", value, ref64[name], lowp[name], terms=40, dtype=torch.float16)


def test_flex_value_head_dim(kernels_only):
    """gptfast.flex with a block mask, D 32 and Dv 48: output and gradients against its float64 reference."""
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 70, 70, 32, torch.float32, seed=4, head_dim_v=48))
    block_mask = create_block_mask(causal_mask, None, None, 70, 70, DEVICE, BLOCK_SIZE=16)
    out = flex_attention(q, k, v, block_mask=block_mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_flex(*inputs64, None, block_mask.mask_mod, 32 ** -0.5)
    refs = torch.autograd.grad(ref, inputs64, grad_out.double())
    lowp, _ = reference_flex(q, k, v, None, block_mask.mask_mod, 32 ** -0.5)
    lowp_grads = torch.autograd.grad(lowp, (q, k, v), grad_out)
    for name, got, want, baseline in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *refs), (lowp, *lowp_grads)):
        assert_accurate(name, got, want, baseline, terms=48)


def test_a_kernel_that_drops_a_value_column_fails_the_check(kernels_only):
    """The checks are not vacuous: attention over v without its last column (zero there) is outside the rule."""
    q, k, v = random_qkv(1, 2, 2, 30, 30, 32, torch.float32, seed=9, head_dim_v=24)
    dropped = lambda q, k, v: scaled_dot_product_attention(q, k, torch.cat([v[..., :-1], 0 * v[..., -1:]], -1))
    with pytest.raises(AssertionError, match="exceeds"):
        check_against_reference(q, k, v, NONE, dropped)


def test_head_dim_512_with_every_feature_but_dropout(kernels_only):
    """Head dim 320 (padded to 512) with a window, softcapping, ALiBi and sinks, GQA: the feature tiles of 512."""
    q, k, v = random_qkv(1, 4, 2, 20, 27, 320, torch.bfloat16, seed=23)
    slopes = torch.rand(4).to(DEVICE)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(23)).to(DEVICE)
    options = dict(causal=True, window_size=(9, 3), softcap=3.0, alibi_slopes=slopes)
    run = lambda q, k, v, sinks: flash_attn_func(*bthd(q, k, v), sinks=sinks, **options).transpose(1, 2)
    check_against_reference(q, k, v, BOTTOM_RIGHT, run, seed=23, sinks=sinks, window=(9, 3), softcap=3.0,
                            alibi=slopes.expand(1, 4))


@pytest.mark.parametrize("dtype, options, gap", [
    (torch.bfloat16, dict(dropout_p=0.1), "dropout at head dims past 256"),
    (torch.float32, {}, "float32 inputs at head dims past 256"),
])
def test_what_head_dims_past_256_leave_out_runs_pytorch_visibly(dtype, options, gap, monkeypatch):
    """The 512-wide tiles hold neither dropout nor float32 (attention_core.kernel_gap): such a call warns and runs
    PyTorch, or raises under the Triton backend."""
    monkeypatch.setattr(backend, "_warned", set())
    q, k, v = bthd(*random_qkv(1, 2, 2, 9, 9, 264, dtype, seed=3))
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match=gap):
        flash_attn_func(q, k, v, causal=True, **options)
    with pytest.warns(UserWarning, match=gap):
        out = flash_attn_func(q, k, v, causal=True, **options)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_flex_past_256_runs_pytorch_visibly(monkeypatch):
    """gptfast.flex's mods past 256 run its reference (kernel_gap), with the same answer."""
    monkeypatch.setattr(backend, "_warned", set())
    q, k, v = random_qkv(1, 2, 2, 9, 9, 300, torch.bfloat16, seed=6)
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match="flex's mods at head dims past"):
        flex_attention(q, k, v)
    with pytest.warns(UserWarning, match="flex's mods at head dims past"):
        out = flex_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(out, reference_flex(q, k, v, None, noop_mask, 300 ** -0.5)[0])
