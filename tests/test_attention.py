"""gptfast.attention against a plain PyTorch reference in float64: forward and every gradient, odd shapes, every
dtype, causal variants, grouped heads, strided views; bad input; backend choice; torch.compile."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from gptfast import attention_core, backend
from gptfast.attention import flash_attn_func, scaled_dot_product_attention
from gptfast.attention_core import as_bhtd, draw_dropout_seed
from gptfast.kernels.attention import (_chunk_key_range, _chunk_query_range, _key_range, _query_range,
                                      attention_backward, attention_forward)
from gptfast.kernels.attention_spec import Features, describe
from support import (BOTTOM_RIGHT, NONE, TOP_LEFT, bthd, check_against_reference, kernel_keep_mask, mask_args,
                     random_qkv, reference_attention, seed_of, shape_id)
from tolerance import DEVICE, DTYPES

# Every sequence length, head dim, dtype and mask appears, crossed so that each T meets several D and masks.
SHAPES = [  # (batch, heads, kv_heads, Tq, Tk, head_dim)
    (1, 1, 1, 1, 1, 16), (2, 3, 3, 7, 7, 24), (1, 2, 2, 100, 100, 64), (1, 1, 1, 257, 257, 80),
    (2, 2, 2, 7, 100, 96), (1, 2, 1, 100, 7, 128), (1, 1, 1, 1, 257, 256), (1, 4, 2, 257, 100, 8),
    (1, 2, 2, 33, 33, 256), (3, 1, 1, 100, 257, 40), (1, 6, 2, 7, 7, 160),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [NONE, TOP_LEFT, BOTTOM_RIGHT])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sdpa_matches_float64_reference(shape, causal, dtype):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    q, k, v = random_qkv(*shape, dtype, seed=seed_of(shape, causal))
    kwargs = mask_args(causal, seqlen_q, seqlen_k)
    with backend.use_backend("triton"):
        check_against_reference(
            q, k, v, causal, lambda q, k, v: scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs))


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 3), seqlen_q=st.integers(1, 70),
       seqlen_k=st.integers(1, 70), head_dim=st.sampled_from([8, 32, 48, 72, 112]),
       causal=st.sampled_from([NONE, TOP_LEFT, BOTTOM_RIGHT]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 10_000))
def test_hypothesis_shapes(batch, kv_heads, group, seqlen_q, seqlen_k, head_dim, causal, dtype, seed):
    q, k, v = random_qkv(batch, kv_heads * group, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed)
    kwargs = mask_args(causal, seqlen_q, seqlen_k)
    with backend.use_backend("triton"):
        check_against_reference(
            q, k, v, causal, lambda q, k, v: scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_qkv_views_need_no_copy(dtype):
    """q, k, v as views of one (B, T, 3, H, D) projection, as the GPT block makes them."""
    batch, seqlen, heads, head_dim = 2, 37, 3, 24
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim).to(DEVICE, dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and as_bhtd(q).data_ptr() == q.data_ptr()
    with backend.use_backend("triton"):
        check_against_reference(q, k, v, TOP_LEFT,
                                lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True))


def test_flash_attn_layout_and_lse():
    """flash_attn_func takes (B, T, H, D), masks bottom-right, and returns a differentiable lse."""
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = 2, 19, 45, 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen).to(DEVICE)
    k, v = (torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    with backend.use_backend("triton"):
        check_against_reference(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), BOTTOM_RIGHT,
            lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            causal=True).transpose(1, 2))
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        out, lse = flash_attn_func(qg, kg, v, causal=True, return_lse=True)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (batch, heads, seqlen_q)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    scores = q64.transpose(1, 2) @ k64.repeat_interleave(2, dim=2).permute(0, 2, 3, 1) / math.sqrt(head_dim)
    visible = torch.arange(seqlen_k)[None, :] <= torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    ref_lse = torch.logsumexp(scores.masked_fill(~visible.to(DEVICE), float("-inf")), dim=-1)
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    weight = torch.randn(lse.shape).to(DEVICE)
    (lse * weight).sum().backward()
    (ref_lse * weight).sum().backward()
    assert (qg.grad.double() - q64.grad).abs().max() < 1e-5
    assert (kg.grad.double() - k64.grad).abs().max() < 1e-5


def test_expanded_output_gradient():
    """out.sum().backward() hands the kernel a gradient with zero strides."""
    q, k, v = random_qkv(1, 2, 2, 20, 20, 16, torch.float32, seed=8)
    grads = []
    for run in (lambda *a: scaled_dot_product_attention(*a, is_causal=True),
                lambda *a: reference_attention(*a, TOP_LEFT)):
        inputs = [t.double().requires_grad_() if len(grads) else t.clone().requires_grad_() for t in (q, k, v)]
        with backend.use_backend("triton"):
            run(*inputs).sum().backward()
        grads.append([t.grad.double() for t in inputs])
    for got, ref in zip(*grads):
        assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(19, 45), (9, 4)])
def test_flash_attn_func_torch_path_matches_the_kernel(seqlen_q, seqlen_k):
    """The PyTorch fallback of flash_attn_func (SDPA, or scores formed directly when lse is wanted)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, seqlen_q, 4, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, seqlen_k, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    results = {}
    for name in ("triton", "torch"):
        with backend.use_backend(name):
            results[name] = (flash_attn_func(q, k, v, causal=True),
                             *flash_attn_func(q, k, v, causal=True, return_lse=True))
    for kernel, reference in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(kernel, reference, atol=1e-5, rtol=1e-5)


class ShiftedKernels(torch.autograd.Function):
    """The kernels' forward and backward for Features with a window of (3, -1) and softcap 5: what
    gptfast.distributed's ring runs for a pair of chunks."""

    @staticmethod
    def forward(ctx, q, k, v, features):
        out, lse = attention_forward(q, k, v, 0.25, features)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.features = features
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*attention_backward(grad_out.contiguous(), torch.zeros_like(lse), q, k, v, out, lse, 0.25,
                                    ctx.features)[:3], None)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(19, 45), (9, 4)])
def test_top_left_and_shifted_diagonals_on_both_paths(seqlen_q, seqlen_k):
    """torch's is_causal (top-left) and Features.shift (every query moved along the keys; here by Tq - Tk, which
    makes the bottom-right diagonal the top-left one), with a window and softcapping, forward and backward, on
    the kernels and on PyTorch's path: each against the float64 top-left reference."""
    q, k, v = random_qkv(2, 4, 2, seqlen_q, seqlen_k, 16, torch.float32, seed=seqlen_q)
    for causal, shift in ((attention_core.CAUSAL_TOP_LEFT, 0), (attention_core.CAUSAL_BOTTOM_RIGHT,
                                                                seqlen_q - seqlen_k)):
        features = Features(causal, (3, -1), softcap=5.0, shift=shift)
        for run in (lambda q, k, v: ShiftedKernels.apply(q, k, v, features),
                    lambda q, k, v: attention_core.torch_attention(q, k, v, causal, (3, -1), None, 5.0, None, 0.0,
                                                                   0.25, shift=shift)[0]):
            check_against_reference(q, k, v, TOP_LEFT, run, scale=0.25, window=(3, -1), softcap=5.0)


def test_rows_that_see_no_key_are_zero_with_zero_gradients():
    q, k, v = random_qkv(1, 2, 2, 9, 4, 16, torch.float32, seed=5)
    with backend.use_backend("triton"):
        check_against_reference(q, k, v, BOTTOM_RIGHT, lambda q, k, v: scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(9, 4)))
        out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                   return_lse=True)
    assert (out[:, :5] == 0).all() and torch.isinf(lse[..., :5]).all() and torch.isfinite(lse[..., 5:]).all()


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_nan_inputs_propagate_like_torch(backend_name):
    """A NaN in a query gives NaN in that query's output and lse on every path (the PyTorch fallback of
    return_lse once turned it into 0), while rows that see no key stay 0 with lse +inf."""
    q, k, v = (t.transpose(1, 2) for t in random_qkv(1, 2, 2, 9, 4, 16, torch.float32, seed=6))
    q = q.clone()
    q[0, 7, 1, 3] = float("nan")
    with backend.use_backend(backend_name):
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.isnan(out[0, 7, 1]).all() and torch.isnan(lse[0, 1, 7])
    assert (out[:, :5] == 0).all() and torch.isinf(lse[..., :5]).all()
    assert torch.isfinite(out[0, 8]).all() and torch.isfinite(out[0, 7, 0]).all()
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=causal_lower_right(9, 4)).transpose(1, 2)
    assert torch.equal(torch.isnan(out[:, 5:]), torch.isnan(expected[:, 5:]))


def test_batch_dims_like_torch():
    """(..., H, T, D): five dims, and three (no batch)."""
    gen = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 2, 11, 16), (3, 11, 16)]:
        q, k, v = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(3))
        with backend.use_backend("triton"):
            check_against_reference(q, k, v, TOP_LEFT,
                                    lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True))


def test_upper_left_bias_and_scale():
    q, k, v = random_qkv(1, 2, 2, 12, 20, 16, torch.float32, seed=2)
    with backend.use_backend("triton"):
        out = scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(12, 20), scale=0.3)
    ref = reference_attention(q.double(), k.double(), v.double(), TOP_LEFT, scale=0.3)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype, factor", [(torch.float32, 1.0001), (torch.float16, 1.005), (torch.bfloat16, 1.05)],
                         ids=str)
def test_the_accuracy_rule_can_fail(dtype, factor):
    """A result scaled slightly wrong must fail the check: the rule is not vacuous."""
    q, k, v = random_qkv(1, 2, 2, 30, 30, 32, dtype, seed=9)
    with backend.use_backend("triton"), pytest.raises(AssertionError, match="exceeds"):
        check_against_reference(q, k, v, NONE, lambda q, k, v: scaled_dot_product_attention(q, k, v) * factor)


def test_tf32_follows_torch_flag():
    q = torch.empty(1, 1, 1, 64)
    precision = lambda q: describe(q, q, q, Features(), 1.0).spec.INPUT_PRECISION
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert precision(q) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert precision(q) == "tf32"
        assert precision(q.half()) == "tf32"  # ignored for 16-bit inputs
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _qkv(shape_q=(1, 2, 8, 16), shape_k=None, shape_v=None, dtype=torch.float32):
    shape_k = shape_k or shape_q
    return (torch.randn(shape_q, dtype=dtype), torch.randn(shape_k, dtype=dtype),
            torch.randn(shape_v or shape_k, dtype=dtype))


@pytest.mark.parametrize("args, kwargs, error, match", [
    (_qkv(shape_k=(1, 2, 8, 24)), {}, ValueError, "same head_dim"),
    (_qkv(shape_k=(1, 2, 8, 16), shape_v=(1, 2, 9, 16)), {}, ValueError, "same seq_len"),
    (_qkv(shape_k=(2, 2, 8, 16)), {}, ValueError, "batch dims"),
    (_qkv(shape_k=(1, 4, 8, 16)), {}, ValueError, "heads"),
    (_qkv(shape_q=(1, 3, 8, 16), shape_k=(1, 2, 8, 16)), dict(enable_gqa=True), ValueError, "multiple"),
    (_qkv(shape_k=(1, 2, 8, 16), shape_v=(1, 1, 8, 16)), {}, ValueError, "same number of heads"),
    ((torch.randn(8), torch.randn(8), torch.randn(8)), {}, ValueError, "shape"),
    ((torch.randn(1, 2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 8, 16)), {}, ValueError, "number of dims"),
    ((torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16)), {}, TypeError, "dtype"),
    ((torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), "v"), {}, TypeError, "value must be"),
    (_qkv(), dict(is_causal=True, attn_mask=causal_lower_right(8, 8)), ValueError, "not both"),
    (_qkv(), dict(attn_mask=causal_lower_right(8, 9)), ValueError, "causal bias"),
    (_qkv(), dict(dropout_p=1.5), ValueError, "dropout_p"),
])
def test_bad_input_raises_clearly(args, kwargs, error, match):
    for name in ("auto", "triton", "torch"):
        with backend.use_backend(name), pytest.raises(error, match=match):
            scaled_dot_product_attention(*args, **kwargs)


def test_flash_attn_func_wants_four_dims():
    with pytest.raises(ValueError, match="4-dim"):
        flash_attn_func(torch.randn(8, 2, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16))


@pytest.mark.parametrize("kwargs, args, gap", [
    ({}, _qkv(dtype=torch.float64), "float64"),
    ({}, _qkv(shape_q=(1, 2, 8, 520)), "head_dim 520"),
    ({}, _qkv(shape_v=(1, 2, 8, 528)), "value head_dim 528"),
    ({}, _qkv(shape_q=(1, 2, 8, 264)), "float32 inputs at head dims past 256"),
    (dict(scale=-0.5), _qkv(), "softmax_scale -0.5"),
    (dict(scale=0.0), _qkv(), "softmax_scale 0.0"),
])
def test_unsupported_cases_fall_back_visibly_or_raise(kwargs, args, gap):
    """auto runs PyTorch (same answer as torch) and warns once per reason; a forced triton backend names what is
    missing."""
    backend._warned.clear()
    with backend.use_backend("auto"):
        with pytest.warns(UserWarning, match=f"does not support .*{gap}.*runs PyTorch"):
            out = scaled_dot_product_attention(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scaled_dot_product_attention(*args, **kwargs)  # the same reason again: no second warning
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*args, **kwargs))
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match=gap):
        scaled_dot_product_attention(*args, **kwargs)


def test_backend_choice(monkeypatch):
    """torch runs PyTorch (bit for bit); auto on a CPU without the interpreter does too; triton there raises."""
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v)
    with backend.use_backend("torch"):
        assert torch.equal(scaled_dot_product_attention(q, k, v), expected)
    monkeypatch.setattr(backend, "INTERPRETER", False)
    with backend.use_backend("auto"):
        assert torch.equal(scaled_dot_product_attention(q, k, v), expected)
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match="CUDA"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="expected one of"), backend.use_backend("fast"):
        pass
    assert backend.get_backend() == "auto"


def test_custom_ops_pass_opcheck():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 2, 9, 13, 16, torch.float32, seed=4))
    mask = torch.randn(1, 1, 9, 13).to(DEVICE).requires_grad_()
    slopes = torch.rand(1, 4).to(DEVICE)
    sinks = torch.randn(4).to(DEVICE).requires_grad_()
    for args in [(None, None, None, None, None, None, None, 0, 0, 2, -1, -1, 0, 0.0, 0.0, 0.25, False),
                 (mask, slopes, None, None, None, None, None, 0, 0, 0, 3, 2, 0, 5.0, 0.0, 0.25, True),
                 (None, None, sinks, None, None, None, None, 0, 0, 2, 3, -1, 0, 0.0, 0.0, 0.25, False),
                 (None, None, None, None, None, None, None, 0, 0, 2, -1, -1, 4, 0.0, 0.0, 0.25, False)]:
        torch.library.opcheck(torch.ops.gptfast.flash_attention.default, (q, k, v, *args))
    # varlen: batch 1 read as two packed sequences of 4 and 5 queries, 4 and 9 keys (then 3 and 6 of them used)
    cu_seqlens_q, cu_seqlens_k = (torch.tensor([0, 4, n], dtype=torch.int32, device=DEVICE) for n in (9, 13))
    for seqused_k in (None, torch.tensor([3, 6], dtype=torch.int32, device=DEVICE)):
        varlen = (None, None, None, None, cu_seqlens_q, cu_seqlens_k, seqused_k, 5, 9, 2, -1, -1, 0, 0.0, 0.0, 0.25,
                  False)
        torch.library.opcheck(torch.ops.gptfast.flash_attention.default, (q, k, v, *varlen))


def test_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 2, 2, 20, 20, 16, torch.float32, seed=6))

    def loss(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()

    with backend.use_backend("triton"):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@triton.jit
def _ranges_probe(FORWARD, BACKWARD, seqlen_q, seqlen_k, causal_offset, window_offset, diagonal, chunk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Stores the kernels' loop bounds (lo, full_start, full_end, hi) for query block i (FORWARD[i], keys) and
    key block i (BACKWARD[i], query rows)."""
    i = tl.program_id(0)
    bounds = _key_range(i * BLOCK_M, seqlen_q, seqlen_k, causal_offset, window_offset, BLOCK_M, BLOCK_N,
                        CAUSAL=CAUSAL, WINDOW=WINDOW)
    if CHUNK:
        bounds = _chunk_key_range(bounds, i * BLOCK_M, seqlen_q, diagonal, chunk, BLOCK_M, BLOCK_N)
    for j in tl.static_range(4):
        tl.store(FORWARD + 4 * i + j, bounds[j])
    bounds = _query_range(i * BLOCK_N, seqlen_q, causal_offset, window_offset, BLOCK_M, BLOCK_N, CAUSAL=CAUSAL,
                          WINDOW=WINDOW)
    if CHUNK:
        bounds = _chunk_query_range(bounds, i * BLOCK_N, diagonal, chunk, BLOCK_M, BLOCK_N)
    for j in tl.static_range(4):
        tl.store(BACKWARD + 4 * i + j, bounds[j])


def _check_loop_bounds(visible, bounds, block_rows, block_cols):
    """visible: (rows, cols) bool, rows owned in blocks of block_rows; bounds[b] = (lo, full_start, full_end, hi)
    over cols for row block b. Every loaded column block holds a visible pair, no visible pair lies outside
    [lo, hi), and columns in [full_start, full_end) are visible to every row of the block (the unmasked loop)."""
    for b in range(triton.cdiv(visible.shape[0], block_rows)):
        rows = visible[b * block_rows:(b + 1) * block_rows]
        lo, full_start, full_end, hi = bounds[b].tolist()
        assert lo <= full_start <= full_end <= hi <= visible.shape[1]
        assert lo % block_cols == 0 or lo == visible.shape[1]  # the end: nothing to load
        seen = rows.any(0).nonzero()
        if len(seen):
            assert lo <= seen.min().item() and seen.max().item() < hi
        for c in range(lo, hi, block_cols):
            assert rows[:, c:c + block_cols].any(), "a block with no visible pair was loaded"
        assert rows[:, full_start:full_end].all()


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(37, 37), (20, 70), (70, 20), (1, 50), (64, 64)])
@pytest.mark.parametrize("causal, window, chunk", [
    (TOP_LEFT, (-1, -1), 0), *((causal, window, chunk) for chunk in (0, 5, 16, 24) for causal, window in (
        (BOTTOM_RIGHT, (-1, -1)), (BOTTOM_RIGHT, (5, -1)), (NONE, (9, 3)), (NONE, (0, 0)), (NONE, (-1, 2)),
        (NONE, (20, -1))))])
def test_loops_skip_hidden_blocks_and_mask_only_the_edges(seqlen_q, seqlen_k, causal, window, chunk):
    """The causal, window and chunk loop bounds against brute force, for the forward and dq (key blocks per
    query block) and for dk, dv (query blocks per key block). Chunks of 5 are smaller than a block, of 16 one
    query block, of 24 neither; they are bottom-right aligned, as flash-attn's causal mask (no API combines them
    with torch's top-left one)."""
    block_m, block_n = 16, 8
    left, right = window
    right = 0 if causal != NONE else right
    diagonal = 0 if causal == TOP_LEFT else seqlen_k - seqlen_q
    blocks = max(triton.cdiv(seqlen_q, block_m), triton.cdiv(seqlen_k, block_n))
    forward, backward = torch.zeros(blocks, 4, dtype=torch.int32), torch.zeros(blocks, 4, dtype=torch.int32)
    _ranges_probe[(blocks,)](forward, backward, seqlen_q, seqlen_k, diagonal + max(right, 0),
                             diagonal - max(left, 0), seqlen_k - seqlen_q, max(chunk, 1), BLOCK_M=block_m,
                             BLOCK_N=block_n, CAUSAL=right >= 0, WINDOW=left >= 0, CHUNK=chunk > 0)
    j_minus_i = torch.arange(seqlen_k)[None, :] - torch.arange(seqlen_q)[:, None]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if right >= 0:
        visible &= j_minus_i <= diagonal + right
    if left >= 0:
        visible &= j_minus_i >= diagonal - left
    if chunk:  # positions i + Tk - Tq, floor division (negative positions too)
        positions = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
        visible &= torch.div(positions, chunk, rounding_mode="floor") == torch.arange(seqlen_k)[None, :] // chunk
    _check_loop_bounds(visible, forward, block_m, block_n)
    _check_loop_bounds(visible.T, backward, block_n, block_m)


# ----------------------------------------------------------------------------------------------------------------
# The features real models pass: windows, softcapping, ALiBi, dense masks and biases, dropout (issue #12)

FEATURE_SHAPES = [(1, 2, 2, 7, 7, 24), (1, 4, 2, 100, 57, 40), (2, 2, 1, 33, 100, 64), (1, 1, 1, 1, 40, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("causal, window", [(False, (9, 3)), (True, (5, -1)), (False, (0, 0)), (False, (-1, 2))])
def test_sliding_window(shape, dtype, causal, window):
    q, k, v = random_qkv(*shape, dtype, seed=seed_of(shape, window))
    with backend.use_backend("triton"):
        check_against_reference(q, k, v, BOTTOM_RIGHT if causal else NONE, lambda q, k, v: flash_attn_func(
            *bthd(q, k, v), causal=causal, window_size=window).transpose(1, 2), window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FEATURE_SHAPES[:3], ids=shape_id)
@pytest.mark.parametrize("softcap", [0.5, 30.0])
def test_softcapping(shape, dtype, softcap):
    """softcap * tanh(scores / softcap): 0.5 saturates most scores, 30 (Gemma 2's 50 scaled to these inputs)
    barely bends them."""
    q, k, v = random_qkv(*shape, dtype, seed=seed_of(shape, softcap))
    with backend.use_backend("triton"):
        check_against_reference(q, k, v, BOTTOM_RIGHT, lambda q, k, v: flash_attn_func(
            *bthd(q, k, v), causal=True, softcap=softcap).transpose(1, 2), softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FEATURE_SHAPES[1:3], ids=shape_id)
@pytest.mark.parametrize("per_batch, causal", [(False, True), (True, False)])
def test_alibi(shape, dtype, per_batch, causal):
    q, k, v = random_qkv(*shape, dtype, seed=seed_of(shape, per_batch))
    batch, heads = shape[0], shape[1]
    slopes = torch.rand(batch, heads) if per_batch else 2.0 ** -torch.arange(1, heads + 1.0)  # BLOOM's
    slopes = slopes.to(DEVICE)
    with backend.use_backend("triton"):
        check_against_reference(q, k, v, BOTTOM_RIGHT if causal else NONE, lambda q, k, v: flash_attn_func(
            *bthd(q, k, v), causal=causal, alibi_slopes=slopes).transpose(1, 2),
            alibi=slopes.expand(batch, heads))


def random_mask(shape, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool":
        return (torch.rand(shape, generator=gen) > 0.3).to(DEVICE)
    return torch.randn(shape, generator=gen).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_shape", ["BHQK", "B1QK", "1H1K", "QK"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_dense_masks_and_biases(dtype, mask_shape, kind):
    """Masks of every broadcast shape, read through their strides; an additive one's gradient is summed over
    its broadcast dims, as torch's memory-efficient backend gives it."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = 2, 4, 2, 37, 50, 32
    q, k, v = random_qkv(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed=len(mask_shape))
    sizes = {"B": batch, "H": heads, "Q": seqlen_q, "K": seqlen_k, "1": 1}
    mask = random_mask([sizes[c] for c in mask_shape], kind, seed=3)
    if kind == "additive":
        mask = mask.to(dtype).requires_grad_()
    run = lambda q, k, v, m=mask: scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    with backend.use_backend("triton"):
        check_against_reference(q, k, v, NONE, run, mask=mask)


def test_a_mask_that_hides_a_whole_row_gives_zeros():
    """Documented: a query row whose mask hides every key is 0, with zero gradients, as torch's SDPA gives it."""
    q, k, v = random_qkv(1, 2, 2, 5, 6, 16, torch.float32, seed=8)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[2] = False
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with backend.use_backend("triton"):
        out = scaled_dot_product_attention(*inputs, attn_mask=mask.to(DEVICE))
    out.sum().backward()
    assert (out[:, :, 2] == 0).all() and (inputs[0].grad[:, :, 2] == 0).all() and torch.isfinite(out).all()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(DEVICE))
    torch.testing.assert_close(out.detach(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FEATURE_SHAPES[:3], ids=shape_id)
def test_dropout_matches_the_reference_with_the_same_mask(shape, dtype):
    """The backward regenerates the forward's mask: forward and every gradient equal the float64 reference that
    applies the keep mask rebuilt from the same seed and offset."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    q, k, v = random_qkv(*shape, dtype, seed=seed_of(shape))
    p = 0.17
    keep = kernel_keep_mask(5, (batch, heads, seqlen_q, seqlen_k), p)

    def run(q, k, v):
        torch.manual_seed(5)
        return flash_attn_func(*bthd(q, k, v), dropout_p=p, causal=True).transpose(1, 2)

    with backend.use_backend("triton"):
        check_against_reference(q, k, v, BOTTOM_RIGHT, run, keep=keep, dropout_p=p)


def test_dropout_keep_rate_and_fresh_draws():
    """Over 2 x 4 x 64 x 96 scores the keep rate is 1 - p within five standard deviations, for several p; two
    calls draw different masks, and torch.manual_seed repeats a call exactly."""
    shape = (2, 4, 64, 96)
    for p in (0.1, 0.5, 0.9):
        rate = kernel_keep_mask(11, shape, p).float().mean().item()
        sigma = (p * (1 - p) / math.prod(shape)) ** 0.5
        assert abs(rate - (1 - p)) < 5 * sigma, (p, rate)
    assert not torch.equal(kernel_keep_mask(1, shape, 0.5), kernel_keep_mask(2, shape, 0.5))
    q, k, v = bthd(*random_qkv(1, 2, 2, 20, 20, 16, torch.float32, seed=3))
    with backend.use_backend("triton"):
        outs = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            outs.append(flash_attn_func(q, k, v, 0.3))
        assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
        torch.manual_seed(7)
        out, lse, s_dmask = flash_attn_func(q, k, v, 0.3, return_attn_probs=True)
    keep = kernel_keep_mask(7, (1, 2, 20, 20), 0.3)
    assert torch.equal(out, outs[0]) and torch.equal(s_dmask >= 0, keep | (s_dmask == 0))
    assert torch.allclose(s_dmask.abs().sum(-1), torch.ones(1, 2, 20))  # |S_dmask| is the softmax


def test_flash_attn_signatures_bind_like_flash_attn():
    """A positional call ported from flash-attn binds as there (dropout_p, softmax_scale, causal, ...), and the
    packed variants read views of one projection."""
    import inspect
    from gptfast.attention import flash_attn_kvpacked_func, flash_attn_qkvpacked_func
    assert list(inspect.signature(flash_attn_func).parameters)[:11] == [
        "q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
        "deterministic", "return_attn_probs"]
    qkv = torch.randn(2, 19, 3, 2, 16).to(DEVICE)
    q, k, v = qkv.unbind(2)
    with backend.use_backend("triton"):
        expected = flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, window_size=(4, 0))
        assert torch.equal(flash_attn_func(q, k, v, 0.0, 0.3, True, (4, 0)), expected)
        assert torch.equal(flash_attn_qkvpacked_func(qkv, 0.0, 0.3, True, (4, 0)), expected)
        assert torch.equal(flash_attn_kvpacked_func(q, qkv[:, :, 1:], 0.0, 0.3, True, (4, 0)), expected)
        for window in ([4, 0], torch.tensor([4, 0]), (np.int64(4), 0)):  # any pair of ints, as flash-attn takes
            assert torch.equal(flash_attn_func(q, k, v, 0.0, 0.3, True, window), expected)


def test_every_feature_at_once():
    """Window, softcap, ALiBi, an additive mask with its gradient and dropout together, GQA, odd lengths: the
    custom op itself, which the public functions call."""
    q, k, v = random_qkv(2, 4, 2, 45, 70, 40, torch.float32, seed=21)
    slopes = torch.rand(4).to(DEVICE)
    mask = (torch.randn(2, 1, 45, 70) * 0.5).to(DEVICE).requires_grad_()
    keep = kernel_keep_mask(9, (2, 4, 45, 70), 0.2)

    def run(q, k, v, mask):
        torch.manual_seed(9)
        return torch.ops.gptfast.flash_attention(q, k, v, mask, slopes, None, draw_dropout_seed(q.device), None,
                                                 None, None, 0, 0, 0, 20, 6, 0, 3.0, 0.2, 1 / math.sqrt(40),
                                                 False)[0]

    with backend.use_backend("triton"):
        check_against_reference(q, k, v, NONE, run, mask=mask, window=(20, 6), softcap=3.0,
                                alibi=slopes.expand(2, 4), keep=keep, dropout_p=0.2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=(-2, 5)), ValueError, r"window_size must be \(left, right\)"),
    (dict(window_size=(3,)), ValueError, "window_size"),
    (dict(window_size=torch.tensor([1.5, 2.0])), ValueError, "window_size"),
    (dict(window_size=(2.0, 1)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(nheads,\) = \(2,\)"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError, "alibi_slopes must be a float32"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
])
def test_bad_flash_attn_options_raise_clearly(kwargs, error, match):
    q, k, v = bthd(*_qkv())
    for name in ("auto", "triton", "torch"):
        with backend.use_backend(name), pytest.raises(error, match=match):
            flash_attn_func(q, k, v, **kwargs)


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(8, 9, dtype=torch.bool), ValueError, r"does not broadcast to \(..., Hq, Tq, Tk\)"),
    (torch.ones(3, 2, 8, 8, dtype=torch.bool), ValueError, "does not broadcast"),
    (torch.ones(8, 8, dtype=torch.int64), TypeError, "attn_mask must be bool"),
])
def test_bad_masks_raise_clearly(mask, error, match):
    for name in ("auto", "triton", "torch"):
        with backend.use_backend(name), pytest.raises(error, match=match):
            scaled_dot_product_attention(*_qkv(), attn_mask=mask)
