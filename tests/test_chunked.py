"""Chunked attention (Llama 4's attention_chunk_size, flash-attn 3's attention_chunk) on the kernels: each query
sees only keys of its own chunk of positions (bottom-right aligned, per sequence with varlen), with causal, windows,
softcapping, sinks and GQA; the output and every gradient against the float64 reference, both backward
variants; a check that would catch an ignored chunk; bad chunk sizes."""
import pytest
import torch

from gptfast import backend
from gptfast.attention import flash_attn_func, flash_attn_varlen_func
from gptfast.kernels import attention_tuning as tuning
from support import BOTTOM_RIGHT, NONE, bthd, check_against_reference, random_qkv, seed_of, shape_id
from tolerance import DEVICE, DTYPES, assert_accurate

SHAPES = [  # (batch, heads, kv_heads, Tq, Tk, head_dim, chunk): lengths 1, 7, 100, 257, Tq != Tk both ways, GQA,
    # chunks smaller than a tile, of one, and not dividing the lengths
    (1, 1, 1, 1, 1, 16, 1), (2, 4, 2, 7, 100, 24, 16), (1, 2, 2, 100, 57, 64, 5), (1, 2, 1, 257, 257, 40, 48),
    (1, 2, 2, 60, 33, 16, 7),
]


def chunked(**options):
    """run(q, k, v) for check_against_reference: flash_attn_func on (B, H, T, D) views."""
    return lambda q, k, v: flash_attn_func(*bthd(q, k, v), **options).transpose(1, 2)


# Each (shape, causal) case in one dtype, the dtypes taking turns: every dtype meets both causal modes and
# chunks both smaller and larger than the tiles.
CASES = [(shape, causal, DTYPES[(2 * i + j) % len(DTYPES)]) for i, shape in enumerate(SHAPES)
         for j, causal in enumerate((NONE, BOTTOM_RIGHT))]


@pytest.mark.parametrize("shape, causal, dtype", CASES,
                         ids=[f"{shape_id(s[:6])}-C{s[6]}-{c}-{d}" for s, c, d in CASES])
def test_chunks_match_the_reference(shape, causal, dtype, kernels_only):
    *shape, chunk = shape
    seed = seed_of(shape, causal, dtype)
    q, k, v = random_qkv(*shape, dtype, seed=seed)
    check_against_reference(q, k, v, causal, chunked(causal=causal != NONE, attention_chunk=chunk), seed=seed,
                            chunk=chunk)


@pytest.mark.parametrize("backward", tuning.BACKWARD_VARIANTS)
def test_chunks_with_a_window_softcap_and_sinks(backward, kernels_only):
    """Chunks with every bound and a feature at once, GQA, odd lengths, each backward variant."""
    q, k, v = random_qkv(2, 4, 2, 45, 70, 40, torch.float32, seed=41)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(41)).to(DEVICE)
    run = lambda q, k, v, sinks: flash_attn_func(*bthd(q, k, v), causal=True, window_size=(20, 6), softcap=3.0,
                                                 sinks=sinks, attention_chunk=24).transpose(1, 2)
    with tuning.forced_variants(backward=backward):
        check_against_reference(q, k, v, BOTTOM_RIGHT, run, seed=41, sinks=sinks, window=(20, 6), softcap=3.0,
                                chunk=24)


def test_ignoring_the_chunks_fails_the_check(kernels_only):
    """The check is not vacuous: attention over the whole causal prefix is far outside the rule."""
    q, k, v = random_qkv(1, 2, 2, 40, 40, 32, torch.float32, seed=9)
    with pytest.raises(AssertionError, match="exceeds"):
        check_against_reference(q, k, v, BOTTOM_RIGHT, chunked(causal=True), chunk=16)


def _varlen_run(q, k, v, cu_seqlens_q, cu_seqlens_k, longest, chunk):
    """flash_attn_varlen_func's output and gradients for packed q, k, v (total, H, D)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu_seqlens_q, cu_seqlens_k, *longest, causal=True,
                                 attention_chunk=chunk)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out))
    return {"out": out, **{f"d{name}": t.grad for name, t in zip("qkv", leaves)}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_chunks_count_from_each_sequence(dtype):
    """Packed sequences of (Tq, Tk) (7, 30), (1, 1), (40, 40) with GQA: the chunks of each sequence are aligned
    to its own end; the kernels against PyTorch's per-sequence path in float64 (and in the input dtype, for the
    rule's baseline)."""
    cu_seqlens_q = torch.tensor([0, 7, 8, 48], dtype=torch.int32, device=DEVICE)
    cu_seqlens_k = torch.tensor([0, 30, 31, 71], dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(48, 4, 24, generator=generator).to(DEVICE)
    k, v = (torch.randn(71, 2, 24, generator=generator).to(DEVICE) for _ in range(2))
    args = (cu_seqlens_q, cu_seqlens_k, (40, 40), 12)
    with backend.use_backend("triton"):
        got = _varlen_run(q.to(dtype), k.to(dtype), v.to(dtype), *args)
    with backend.use_backend("torch"):
        ref64 = _varlen_run(q.double(), k.double(), v.double(), *args)
        lowp = _varlen_run(q.to(dtype), k.to(dtype), v.to(dtype), *args)
    for name, value in got.items():
        assert_accurate(f"varlen {name}", value, ref64[name], lowp[name], terms=24, dtype=dtype)


@pytest.mark.parametrize("chunk", [-1, 2.0, "8", None])
def test_a_bad_chunk_size_raises_a_clear_error(chunk):
    q, k, v = bthd(*random_qkv(1, 2, 2, 4, 4, 16, torch.float32, seed=1))
    with pytest.raises(ValueError, match="attention_chunk must be an int"):
        flash_attn_func(q, k, v, attention_chunk=chunk)


def test_chunks_with_dropout_run_pytorch_visibly(monkeypatch):
    """The chunked tiles leave dropout out (attention_spec.Spec.chunked): such a call warns and runs PyTorch, or
    raises under the Triton backend."""
    monkeypatch.setattr(backend, "_warned", set())
    q, k, v = bthd(*random_qkv(1, 2, 2, 9, 9, 16, torch.float32, seed=2))
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match="attention_chunk with dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1, causal=True, attention_chunk=4)
    with pytest.warns(UserWarning, match="attention_chunk with dropout"):
        out = flash_attn_func(q, k, v, dropout_p=0.1, causal=True, attention_chunk=4)
    assert out.shape == q.shape and torch.isfinite(out).all()
