"""gptfast.attention against a plain PyTorch reference in float64: forward and every gradient, odd shapes, every
dtype, causal variants, grouped heads, strided views; bad input; backend choice; torch.compile."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from gptfast import backend
from gptfast.attention import _as_bhtd, flash_attn_func, scaled_dot_product_attention
from gptfast.kernels.attention import _key_range, _query_range
from tolerance import DEVICE, DTYPES, assert_accurate

NONE, TOP_LEFT, BOTTOM_RIGHT = "none", "top_left", "bottom_right"


def reference_attention(q, k, v, causal, scale=None):
    """Plain attention in q's dtype: scores, masked softmax in float32 (as torch's math backend), weighted sum.
    q: (..., Hq, Tq, D), k and v: (..., Hkv, Tk, D). A row that sees no key gives 0."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal != NONE:
        tq, tk = q.shape[-2], k.shape[-2]
        offset = tk - tq if causal == BOTTOM_RIGHT else 0
        visible = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tq, device=q.device)[:, None] + offset
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1).nan_to_num(0.0)
    return weights.to(q.dtype) @ v


def random_qkv(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h, t: torch.randn(batch, h, t, head_dim, generator=gen).to(DEVICE, dtype)
    return make(heads, seqlen_q), make(kv_heads, seqlen_k), make(kv_heads, seqlen_k)


def mask_args(causal, seqlen_q, seqlen_k):
    if causal == TOP_LEFT:
        return dict(is_causal=True)
    if causal == BOTTOM_RIGHT:
        return dict(attn_mask=causal_lower_right(seqlen_q, seqlen_k))
    return {}


def check_against_reference(q, k, v, causal, run, seed=0):
    """run(q, k, v) -> out with q's layout (..., Hq, Tq, D). Checks the output and dq, dk, dv."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = run(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    out.backward(grad_out)
    results = {"out": out}
    results.update({f"d{n}": t.grad for n, t in zip("qkv", inputs)})

    def reference(dtype):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*ins, causal)
        ref.backward(grad_out.to(dtype))
        return {"out": ref, **{f"d{n}": t.grad for n, t in zip("qkv", ins)}}

    ref64, lowp = reference(torch.float64), reference(q.dtype)
    for name, value in results.items():
        assert value.dtype == q.dtype
        assert_accurate(name, value, ref64[name], lowp[name], terms=q.shape[-1])


# Every sequence length, head dim, dtype and mask appears, crossed so that each T meets several D and masks.
SHAPES = [  # (batch, heads, kv_heads, Tq, Tk, head_dim)
    (1, 1, 1, 1, 1, 16), (2, 3, 3, 7, 7, 24), (1, 2, 2, 100, 100, 64), (1, 1, 1, 257, 257, 80),
    (2, 2, 2, 7, 100, 96), (1, 2, 1, 100, 7, 128), (1, 1, 1, 1, 257, 256), (1, 4, 2, 257, 100, 8),
    (1, 2, 2, 33, 33, 256), (3, 1, 1, 100, 257, 40), (1, 6, 2, 7, 7, 160),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [NONE, TOP_LEFT, BOTTOM_RIGHT])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}K{}Tq{}Tk{}D{}".format(*s))
def test_sdpa_matches_float64_reference(shape, causal, dtype):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    q, k, v = random_qkv(*shape, dtype, seed=zlib.crc32(repr((shape, causal)).encode()))
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
    assert not q.is_contiguous() and _as_bhtd(q).data_ptr() == q.data_ptr()
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
    from gptfast.kernels.attention import _kernel_constants
    q = torch.empty(1, 1, 1, 64)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _kernel_constants(q, 0)["INPUT_PRECISION"] == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _kernel_constants(q, 0)["INPUT_PRECISION"] == "tf32"
        assert _kernel_constants(q.half(), 0)["INPUT_PRECISION"] == "tf32"  # ignored for 16-bit inputs
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
    (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool).tril()), _qkv(), "dense attn_mask"),
    (dict(dropout_p=0.1), _qkv(), "dropout_p"),
    ({}, _qkv(dtype=torch.float64), "float64"),
    ({}, _qkv(shape_q=(1, 2, 8, 12)), "head_dim 12"),
    ({}, _qkv(shape_q=(1, 2, 8, 264)), "head_dim 264"),
    ({}, _qkv(shape_v=(1, 2, 8, 32)), "value head_dim"),
])
def test_unsupported_cases_fall_back_or_raise(kwargs, args, gap):
    """auto runs PyTorch (same answer as torch); a forced triton backend names what is missing."""
    with backend.use_backend("auto"):
        torch.manual_seed(0)
        out = scaled_dot_product_attention(*args, **kwargs)
    torch.manual_seed(0)
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
    torch.library.opcheck(torch.ops.gptfast.flash_attention.default, (q, k, v, 2, 0.25))


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
def _ranges_probe(FORWARD, BACKWARD, seqlen_q, seqlen_k, causal_offset, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Stores the kernels' causal loop bounds for query block i (FORWARD[i] = full_end, stop) and key block i
    (BACKWARD[i] = start, full_start)."""
    i = tl.program_id(0)
    full_end, stop = _key_range(i * BLOCK_M, seqlen_q, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, True)
    tl.store(FORWARD + 2 * i, full_end)
    tl.store(FORWARD + 2 * i + 1, stop)
    start, full_start = _query_range(i * BLOCK_N, seqlen_q, causal_offset, BLOCK_M, BLOCK_N, True)
    tl.store(BACKWARD + 2 * i, start)
    tl.store(BACKWARD + 2 * i + 1, full_start)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(37, 37), (20, 70), (70, 20), (1, 50), (64, 64)])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_causal_loops_skip_hidden_blocks_and_mask_only_the_diagonal(seqlen_q, seqlen_k, bottom_right):
    """The loop bounds against brute force: every loaded block holds a visible (query, key) pair, no visible pair
    is left out, and the blocks run without a mask hold only visible pairs."""
    block_m, block_n = 16, 8
    offset = seqlen_k - seqlen_q if bottom_right else 0
    blocks = max(triton.cdiv(seqlen_q, block_m), triton.cdiv(seqlen_k, block_n))
    forward, backward = torch.zeros(blocks, 2, dtype=torch.int32), torch.zeros(blocks, 2, dtype=torch.int32)
    _ranges_probe[(blocks,)](forward, backward, seqlen_q, seqlen_k, offset, BLOCK_M=block_m, BLOCK_N=block_n)
    visible = (torch.arange(seqlen_k)[None, :] <= torch.arange(seqlen_q)[:, None] + offset)
    for m in range(triton.cdiv(seqlen_q, block_m)):
        rows = visible[m * block_m:(m + 1) * block_m]
        full_end, stop = forward[m].tolist()
        seen = rows.any(0).nonzero()
        assert stop == (seen.max().item() + 1 if len(seen) else 0)  # no visible key past stop, none dropped
        for n in range(0, stop, block_n):
            assert rows[:, n:n + block_n].any(), "a block with no visible pair was loaded"
        assert full_end % block_n == 0 and rows[:, :full_end].all() and full_end <= stop
    for n in range(triton.cdiv(seqlen_k, block_n)):
        columns = visible[:, n * block_n:(n + 1) * block_n]
        start, full_start = backward[n].tolist()
        seen = columns.any(1).nonzero()
        if len(seen):  # the first loaded query block is the first to see this key block
            assert start <= seen.min().item() < start + block_m and full_start >= start
        else:  # nobody sees it: both loops, [start, full_start) and [full_start, Tq), are empty
            assert start >= full_start >= seqlen_q
        assert columns[full_start:].all()
