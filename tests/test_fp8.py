"""FP8 attention (gptfast.fp8): flash_attn_func on float8 e4m3 inputs with flash-attn 3's descales, against the
float64 attention of the dequantised inputs (so the only differences are the kernel's own roundings: the weights
in float8 for P @ V, the output in bfloat16), under tests/tolerance.py's rule with PyTorch emulating those
roundings as the baseline; quantize_fp8; the fallback before sm_89; bad calls; and the error against attention on
the unquantised inputs, random and with outlier channels, which the README states."""
import itertools

import pytest
import torch

from gptfast import attention_core, backend
from gptfast.attention import flash_attn_func, quantize_fp8, scaled_dot_product_attention
from gptfast.fp8 import FP8
from gptfast.varlen import flash_attn_varlen_func
from support import BOTTOM_RIGHT, NONE, reference_attention, seed_of, shape_id
from tolerance import DEVICE, assert_accurate

SHAPES = [  # (batch, heads, kv_heads, Tq, Tk, head_dim): lengths 1, 7, 100, Tq != Tk, odd head dims, GQA
    (1, 1, 1, 1, 1, 16), (2, 4, 2, 7, 33, 40), (1, 2, 1, 100, 57, 64),
]


def quantized_inputs(shape, seed, outliers=False):
    """(q, k, v) standard normal (B, T, H, D) in float32 and their quantize_fp8 forms ((x8, descale) each); with
    outliers, keys with a few channels 20 times larger, as real models' keys have."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen)
    k, v = (torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=gen) for _ in range(2))
    if outliers:
        k[..., :3] *= 20
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    return (q, k, v), (quantize_fp8(q, kv_heads=kv_heads), quantize_fp8(k), quantize_fp8(v))


def dequantized(quantized, heads):
    """The real values of quantize_fp8's outputs as float64 (B, H, T, D) (q's descales per kv head group)."""
    reals = []
    for x8, descale in quantized:
        group = x8.shape[2] // descale.shape[1]
        reals.append(x8.double() * descale.double().repeat_interleave(group, dim=1)[:, None, :, None])
    return [t.transpose(1, 2) for t in reals]


def emulated_fp8(q, k, v, **spec):
    """PyTorch in the kernel's precision: the weights of each row, relative to its largest, times 256 in float8
    e4m3 (kernels/attention.FP8_P_SCALE) before P @ V, then the output in bfloat16."""
    eye = torch.eye(k.shape[-2], dtype=torch.float64, device=k.device).expand(*k.shape[:-1], k.shape[-2])
    weights = reference_attention(q, k, eye, **spec)
    largest = weights.amax(dim=-1, keepdim=True)
    relative = torch.where(largest > 0, weights / largest, 0.0)
    rounded = (relative * 256).to(FP8).double() / 256
    group = q.shape[-3] // v.shape[-3]
    return ((rounded @ v.repeat_interleave(group, dim=-3)) * largest).to(torch.bfloat16)


def check_fp8(shape, seed, causal=NONE, v_error=1.0, **options):
    """flash_attn_func on quantize_fp8's inputs against the float64 reference of the dequantised ones;
    v_error multiplies the v descale passed to the kernel (a wrong one must fail). options: flash_attn_func's
    window_size, softcap, alibi_slopes, sinks, attention_chunk (as reference_attention's keywords too)."""
    _, quantized = quantized_inputs(shape, seed)
    (q8, q_descale), (k8, k_descale), (v8, v_descale) = quantized
    out = flash_attn_func(q8, k8, v8, causal=causal != NONE, q_descale=q_descale, k_descale=k_descale,
                          v_descale=v_descale * v_error, **options)
    assert out.dtype == torch.bfloat16 and out.shape == (*q8.shape[:3], v8.shape[3])
    q, k, v = dequantized(quantized, shape[1])
    spec = dict(window=options.get("window_size", (-1, -1)), softcap=options.get("softcap", 0.0),
                alibi=options.get("alibi_slopes"), sinks=options.get("sinks"), chunk=options.get("attention_chunk", 0))
    if spec["alibi"] is not None:
        spec["alibi"] = spec["alibi"].expand(shape[0], shape[1])
    reference = reference_attention(q, k, v, causal, **spec).transpose(1, 2)
    emulated = emulated_fp8(q, k, v, causal=causal, **spec).transpose(1, 2)
    assert_accurate("out", out, reference, emulated, terms=shape[4])


@pytest.mark.parametrize("causal", [NONE, BOTTOM_RIGHT])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fp8_forward_matches_the_reference(shape, causal, kernels_only):
    check_fp8(shape, seed_of(shape, causal), causal)


def test_fp8_with_a_window_softcap_alibi_sinks_and_chunks(kernels_only):
    slopes, sinks = torch.rand(4).to(DEVICE), torch.randn(4).to(DEVICE)
    check_fp8((2, 4, 2, 45, 70, 32), 5, BOTTOM_RIGHT, window_size=(30, 0), softcap=8.0, alibi_slopes=slopes,
              sinks=sinks, attention_chunk=24)


def test_a_wrong_descale_fails_the_check(kernels_only):
    """The rule is not vacuous: a v descale off by 6% (half a float8 e4m3 step, the weights' own rounding) is
    caught."""
    with pytest.raises(AssertionError, match="max error"):
        check_fp8((2, 4, 2, 7, 33, 40), 7, BOTTOM_RIGHT, v_error=1.06)


def test_fp8_descale_forms_and_out_dtype(kernels_only):
    """Scalar descales broadcast, None is 1, out_dtype sets the output's dtype; return_lse gives the lse."""
    (q, k, v), _ = quantized_inputs((1, 2, 2, 9, 9, 16), 11)
    q8, k8, v8 = (t.to(FP8) for t in (q, k, v))
    one = torch.tensor(1.0, device=DEVICE)
    plain, lse = flash_attn_func(q8, k8, v8, causal=True, return_lse=True)
    scaled = flash_attn_func(q8, k8, v8, causal=True, q_descale=one, k_descale=one, v_descale=2 * one,
                             out_dtype=torch.float16)
    assert scaled.dtype == torch.float16 and lse.shape == (1, 2, 9)
    torch.testing.assert_close(scaled.float(), 2 * plain.float(), rtol=1e-2, atol=1e-2)


def test_fp8_falls_back_before_sm_89(monkeypatch):
    """On an sm_80 GPU auto warns and runs PyTorch on the dequantised inputs; triton raises."""
    monkeypatch.setattr(attention_core, "compute_capability", lambda device: (8, 0))
    _, quantized = quantized_inputs((1, 2, 2, 9, 9, 16), 13)
    (q8, qd), (k8, kd), (v8, vd) = quantized
    backend._warned.clear()
    call = lambda: flash_attn_func(q8, k8, v8, causal=True, q_descale=qd, k_descale=kd, v_descale=vd)  # noqa: E731
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match="before sm_89"):
        call()
    with backend.use_backend("auto"), pytest.warns(UserWarning, match="before sm_89"):
        out = call()
    q, k, v = dequantized(quantized, 2)
    expected = reference_attention(q, k, v, BOTTOM_RIGHT).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_fp8_varlen_matches_each_sequence():
    """flash_attn_varlen_func on float8 sequences packed along T (query lengths 1, 7, 40; key lengths 9, 7, 57),
    per-(sequence, kv head) descales, GQA, causal with a window: the packed output matches each sequence's
    reference, on the kernels and on PyTorch's path (each sequence alone on its dequantised inputs)."""
    _, quantized = quantized_inputs((3, 4, 2, 40, 57, 40), 23)
    (q8, qd), (k8, kd), (v8, vd) = quantized
    lengths_q, lengths_k = [1, 7, 40], [9, 7, 57]
    q, k, v = dequantized(quantized, 4)
    spec = dict(causal=BOTTOM_RIGHT, window=(20, 0))
    parts = [(q[b:b + 1, :, :tq], k[b:b + 1, :, :tk], v[b:b + 1, :, :tk]) for b, (tq, tk)
             in enumerate(zip(lengths_q, lengths_k))]
    reference = torch.cat([reference_attention(*part, **spec)[0].transpose(0, 1) for part in parts])
    emulated = torch.cat([emulated_fp8(*part, **spec)[0].transpose(0, 1) for part in parts])

    def packed(t, lengths):
        return torch.cat([t[b, :n] for b, n in enumerate(lengths)])

    cu_seqlens_q, cu_seqlens_k = (torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32,
                                               device=DEVICE) for lengths in (lengths_q, lengths_k))
    for kernels in ("triton", "torch"):
        with backend.use_backend(kernels):
            out = flash_attn_varlen_func(packed(q8, lengths_q), packed(k8, lengths_k), packed(v8, lengths_k),
                                         cu_seqlens_q, cu_seqlens_k, 40, 57, causal=True, window_size=(20, 0),
                                         q_descale=qd, k_descale=kd, v_descale=vd)
        assert out.dtype == torch.bfloat16
        assert_accurate("out", out, reference, emulated, terms=57)


def test_fp8_rejects_what_it_cannot_run():
    """Mixed dtypes, gradients, dropout, attention probabilities, bad descales and out_dtypes; and float8 inputs to
    an API without descales (torch's SDPA signature), which the kernels do not take."""
    (q, k, v), _ = quantized_inputs((1, 2, 2, 5, 5, 16), 17)
    q8, k8, v8 = (t.to(FP8) for t in (q, k, v))
    with pytest.raises(TypeError, match="must share a dtype"):
        flash_attn_func(q8, k, v8)
    with pytest.raises(TypeError, match="q is torch.float32"):
        flash_attn_func(q, k, v, v_descale=torch.ones(1, 2))
    with pytest.raises(ValueError, match="forward-only"):
        flash_attn_func(q8, k8, v8.clone().requires_grad_())
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        flash_attn_func(q8, k8, v8, dropout_p=0.1)
    with pytest.raises(ValueError, match="return_attn_probs"):
        flash_attn_func(q8, k8, v8, return_attn_probs=True)
    with pytest.raises(ValueError, match=r"q_descale must have shape \(batch, nheads_k\) = \(1, 2\)"):
        flash_attn_func(q8, k8, v8, q_descale=torch.ones(2, 2))
    with pytest.raises(TypeError, match="k_descale must be a float32 tensor"):
        flash_attn_func(q8, k8, v8, k_descale=torch.ones(1, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        flash_attn_func(q8, k8, v8, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out_dtype applies to FP8 inputs only"):
        flash_attn_func(q, k, v, out_dtype=torch.bfloat16)
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match="float8_e4m3fn"):
        scaled_dot_product_attention(q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2))  # no descales
    cu_seqlens = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="out_dtype applies to FP8 inputs only"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, 5, 5, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="FP8 inputs do not take block_table"):
        pool = torch.zeros(1, 16, 2, 16, device=DEVICE).to(FP8)
        flash_attn_varlen_func(q8[0], pool, pool, cu_seqlens, cu_seqlens, 5, 5,
                               block_table=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE))


def test_quantize_fp8_per_head_per_group_and_per_tensor():
    """The largest magnitude of each slice lands on 448, nothing saturates to inf, zeros stay zeros with descale
    1, and the round trip keeps e4m3's precision (a relative error of at most 2^-4)."""
    x = torch.randn(2, 5, 4, 8)
    x[1, :, 3] = 0
    x[0, 0, 0, 0] = 1e6  # one huge value: its slice's others lose precision, none becomes inf
    for per, kv_heads, shape in (("head", None, (2, 4)), ("head", 2, (2, 2)), ("tensor", None, ())):
        x8, descale = quantize_fp8(x, per=per, kv_heads=kv_heads)
        assert x8.dtype == FP8 and descale.dtype == torch.float32 and descale.shape == shape
        assert torch.isfinite(x8.float()).all() and x8.float().abs().max() == 448
        group = 1 if per == "tensor" else 4 // shape[1]
        expanded = descale if per == "tensor" else descale.repeat_interleave(group, dim=1)[:, None, :, None]
        back = x8.float() * expanded
        assert ((back - x).abs() <= 2 ** -4 * x.abs() + 2 ** -9 * expanded).all()
    assert quantize_fp8(x)[1][1, 3] == 1
    with pytest.raises(ValueError, match="kv_heads must divide"):
        quantize_fp8(x, kv_heads=3)
    with pytest.raises(ValueError, match="per must be"):
        quantize_fp8(x, per="row")


@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outlier keys"])
def test_fp8_error_against_the_unquantised_attention(outliers, kernels_only, capsys):
    """What quantising costs beside the kernel's roundings, reported (and bounded) as the output's error relative
    to its RMS, against float32 attention on the inputs before quantize_fp8."""
    shape = (1, 4, 2, 64, 64, 64)
    (q, k, v), quantized = quantized_inputs(shape, 19, outliers)
    (q8, qd), (k8, kd), (v8, vd) = quantized
    out = flash_attn_func(q8, k8, v8, causal=True, q_descale=qd, k_descale=kd, v_descale=vd).double()
    exact = reference_attention(*(t.double().transpose(1, 2) for t in (q, k, v)), BOTTOM_RIGHT).transpose(1, 2)
    relative = ((out - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()
    with capsys.disabled():
        print(f"\nFP8 attention, {'outlier keys' if outliers else 'random inputs'}: output error {relative:.2%} of "
              f"its RMS against the unquantised inputs")
    assert relative < 0.1
