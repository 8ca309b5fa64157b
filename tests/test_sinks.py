"""Learnable attention sinks (gpt-oss) on the kernels: flash_attn_func and flash_attn_varlen_func with sinks, the
output and every gradient (the sinks' included) against the float64 reference, with the other features and both
backward variants; rows that see no key; a check that would catch ignored sinks; bad sinks."""
import pytest
import torch

from gptfast import backend
from gptfast.attention import flash_attn_func, flash_attn_varlen_func
from gptfast.kernels import attention_tuning as tuning
from support import BOTTOM_RIGHT, NONE, bthd, check_against_reference, random_qkv, seed_of, shape_id
from tolerance import DEVICE, DTYPES, assert_accurate

SHAPES = [  # (batch, heads, kv_heads, Tq, Tk, head_dim): lengths 1, 7, 100, 257, Tq != Tk, odd head dims, GQA
    (1, 1, 1, 1, 1, 16), (2, 4, 2, 7, 100, 24), (1, 2, 2, 100, 57, 64), (1, 2, 1, 257, 30, 40),
]


def random_sinks(heads, seed):
    """float32 (heads,) logits of the scores' size, so that they matter."""
    return (2 * torch.randn(heads, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


def attention_with_sinks(**options):
    """run(q, k, v, sinks) for check_against_reference: flash_attn_func on (B, H, T, D) views."""
    return lambda q, k, v, sinks: flash_attn_func(*bthd(q, k, v), sinks=sinks, **options).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [NONE, BOTTOM_RIGHT])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sinks_match_the_reference(shape, causal, dtype, kernels_only):
    seed = seed_of(shape, causal, dtype)
    q, k, v = random_qkv(*shape, dtype, seed=seed)
    check_against_reference(q, k, v, causal, attention_with_sinks(causal=causal != NONE), seed=seed,
                            sinks=random_sinks(shape[1], seed))


@pytest.mark.parametrize("backward", tuning.BACKWARD_VARIANTS)
def test_sinks_with_a_window_softcap_and_alibi(backward, kernels_only):
    """Every feature that changes the scores at once, GQA, odd lengths, each backward variant."""
    q, k, v = random_qkv(2, 4, 2, 45, 70, 40, torch.float32, seed=31)
    slopes = torch.rand(4).to(DEVICE)
    run = attention_with_sinks(causal=True, window_size=(20, 6), softcap=3.0, alibi_slopes=slopes)
    with tuning.forced_variants(backward=backward):
        check_against_reference(q, k, v, BOTTOM_RIGHT, run, seed=31, sinks=random_sinks(4, 31), window=(20, 6),
                                softcap=3.0, alibi=slopes.expand(2, 4))


def test_a_row_that_sees_no_key_gives_zero_and_the_sinks_lse(kernels_only):
    """Tq = 5 > Tk = 2 bottom-right causal: rows 0-2 see no key, so their output is 0 and their lse the sink."""
    q, k, v = bthd(*random_qkv(1, 2, 2, 5, 2, 16, torch.float32, seed=3))
    sinks = random_sinks(2, 3)
    out, lse = flash_attn_func(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.allclose(lse[0, :, :3], sinks[:, None].expand(2, 3))


def test_ignoring_the_sinks_fails_the_check(kernels_only):
    """The check is not vacuous: attention that drops the sinks is far outside the rule."""
    q, k, v = random_qkv(1, 2, 2, 30, 30, 32, torch.float32, seed=9)
    ignored = lambda q, k, v, sinks: flash_attn_func(*bthd(q, k, v), causal=True).transpose(1, 2)
    with pytest.raises(AssertionError, match="exceeds"):
        check_against_reference(q, k, v, BOTTOM_RIGHT, ignored, sinks=random_sinks(2, 9))


def _varlen_run(q, k, v, sinks, cu_seqlens, longest):
    """flash_attn_varlen_func's output and gradients for packed q, k, v (total, H, D) with sinks."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    out = flash_attn_varlen_func(*leaves[:3], cu_seqlens, cu_seqlens, longest, longest, causal=True,
                                 sinks=leaves[3])
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out))
    return {"out": out, **{f"d{name}": t.grad for name, t in zip("qkv", leaves[:3])}, "dsinks": leaves[3].grad}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_sinks_match_pytorch_in_float64(dtype):
    """Packed sequences of lengths 7, 1 and 40 with GQA: the kernels against PyTorch's per-sequence path in float64
    (and in the input dtype, for the rule's baseline)."""
    lengths = [7, 1, 40]
    cu_seqlens = torch.tensor([0, 7, 8, 48], dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lengths), 4, 24, generator=generator).to(DEVICE)
    k, v = (torch.randn(sum(lengths), 2, 24, generator=generator).to(DEVICE) for _ in range(2))
    sinks = random_sinks(4, 5)
    with backend.use_backend("triton"):
        got = _varlen_run(q.to(dtype), k.to(dtype), v.to(dtype), sinks, cu_seqlens, max(lengths))
    with backend.use_backend("torch"):
        ref64 = _varlen_run(q.double(), k.double(), v.double(), sinks.double(), cu_seqlens, max(lengths))
        lowp = _varlen_run(q.to(dtype), k.to(dtype), v.to(dtype), sinks, cu_seqlens, max(lengths))
    for name, value in got.items():
        assert_accurate(f"varlen {name}", value, ref64[name], lowp[name], terms=24, dtype=dtype)


@pytest.mark.parametrize("sinks, error, message", [
    (torch.zeros(3), ValueError, r"sinks must have shape \(nheads,\) = \(2,\)"),
    (torch.zeros(2, dtype=torch.int64), TypeError, "sinks must be a floating tensor"),
    ([0.0, 1.0], TypeError, "sinks must be a floating tensor"),
], ids=["shape", "dtype", "list"])
def test_bad_sinks_raise_a_clear_error(sinks, error, message):
    q, k, v = bthd(*random_qkv(1, 2, 2, 4, 4, 16, torch.float32, seed=1))
    with pytest.raises(error, match=message):
        flash_attn_func(q, k, v, sinks=sinks.to(DEVICE) if isinstance(sinks, torch.Tensor) else sinks)
