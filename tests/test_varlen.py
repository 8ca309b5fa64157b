"""flash_attn_varlen_func against the float64 reference run on each sequence alone: forward and every gradient,
lengths 0, 1 and mixes of short and long, Tq != Tk, GQA, odd head dims, every dtype, causal or not, with every
feature; both backward variants; PyTorch's path; bad cu_seqlens."""

import pytest
import torch

from gptfast import backend
from gptfast.attention import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                               flash_attn_varlen_qkvpacked_func)
from gptfast.kernels import attention_tuning as tuning
from support import BOTTOM_RIGHT, NONE, kernel_keep_mask, reference_attention, seed_of
from tolerance import DEVICE, DTYPES, assert_accurate


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed_inputs(lens_q, lens_k, heads, kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda total, h: torch.randn(total, h, head_dim, generator=gen).to(DEVICE, dtype)
    return make(sum(lens_q), heads), make(sum(lens_k), kv_heads), make(sum(lens_k), kv_heads)


def sequence_slices(lens_q, lens_k, used=None):
    """(query rows, key rows) of each sequence; with used, the first used[b] of its keys only."""
    cu_q, cu_k = cumulative(lens_q).tolist(), cumulative(lens_k).tolist()
    used = lens_k if used is None else used
    return [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + used[b])) for b in range(len(lens_q))]


def check_varlen(lens_q, lens_k, heads, kv_heads, head_dim, dtype, causal, seed=0, alibi=None, keep=None,
                 used=None, **options):
    """Runs flash_attn_varlen_func on fresh inputs and checks out, dq, dk, dv against reference_attention run on
    each sequence alone (alibi: (num_seqs, Hq); keep: the kernels' (num_seqs, Hq, max_q, max_k) keep mask; used:
    seqused_k as a list, each sequence's keys past it left out of the reference, their gradients 0)."""
    leaves = dict(zip("qkv", packed_inputs(lens_q, lens_k, heads, kv_heads, head_dim, dtype, seed)))
    inputs = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    seqused_k = None if used is None else torch.tensor(used, dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(*inputs.values(), cumulative(lens_q), cumulative(lens_k), max(lens_q),
                                 max(lens_k), causal=causal, alibi_slopes=alibi, seqused_k=seqused_k, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    out.backward(grad_out)
    results = {"out": out, **{f"d{n}": t.grad for n, t in inputs.items()}}

    def reference(work):
        ins = {n: t.to(work).requires_grad_() for n, t in leaves.items()}
        outs = []
        for b, (rows, keys) in enumerate(sequence_slices(lens_q, lens_k, used)):
            q, k, v = (ins[n][span].transpose(0, 1) for n, span in (("q", rows), ("k", keys), ("v", keys)))
            kept = None if keep is None else keep[b, :, :q.shape[1], :k.shape[1]]
            outs.append(reference_attention(
                q, k, v, BOTTOM_RIGHT if causal else NONE, window=options.get("window_size", (-1, -1)),
                softcap=options.get("softcap", 0.0), alibi=None if alibi is None else alibi[b], keep=kept,
                dropout_p=options.get("dropout_p", 0.0), sinks=options.get("sinks"),
                chunk=options.get("attention_chunk", 0)).transpose(0, 1))
        ref = torch.cat(outs)
        ref.backward(grad_out.to(work))
        return {"out": ref, **{f"d{n}": t.grad for n, t in ins.items()}}

    ref64, lowp = reference(torch.float64), reference(dtype)
    for name, value in results.items():
        assert value.dtype == dtype and value.shape == leaves["q" if name == "out" else name[-1]].shape
        assert_accurate(name, value, ref64[name], lowp[name], terms=head_dim)


MIXES = [  # (lengths of q, lengths of k, heads, kv heads, head dim)
    ([1], [1], 1, 1, 16), ([7, 0, 1], [7, 3, 1], 2, 2, 24), ([100, 1, 37], [100, 57, 0], 4, 2, 40),
    ([0, 0], [5, 0], 1, 1, 8),
]
LONG = ([3, 257, 7], [30, 257, 7], 2, 1, 80)  # the interpreter's slowest: two of its (causal, dtype) pairs
CASES = ([(mix, causal, dtype) for mix in MIXES for causal in (False, True) for dtype in DTYPES]
         + [(LONG, False, torch.float32), (LONG, True, torch.bfloat16)])


@pytest.mark.parametrize("mix, causal, dtype", CASES,
                         ids=lambda c: "q{}k{}H{}K{}D{}".format(*c) if isinstance(c, tuple) else str(c))
def test_varlen_matches_each_sequence_alone(mix, causal, dtype):
    with backend.use_backend("triton") if sum(mix[0]) else backend.use_backend("auto"):
        check_varlen(*mix, dtype, causal, seed=seed_of(mix, causal))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_with_every_feature(dtype):
    """A window, softcapping, per-sequence ALiBi slopes and dropout (the kernels' keep mask, drawn per sequence
    as for a (num_seqs, Hq, max_q, max_k) batch)."""
    lens_q, lens_k, heads = [19, 1, 40], [33, 6, 40], 4
    alibi = torch.rand(3, heads, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    keep = kernel_keep_mask(11, (3, heads, max(lens_q), max(lens_k)), 0.25)
    torch.manual_seed(11)
    with backend.use_backend("triton"):
        check_varlen(lens_q, lens_k, heads, 2, 24, dtype, True, alibi=alibi, keep=keep, window_size=(9, -1),
                     softcap=4.0, dropout_p=0.25)


def test_varlen_single_pass_backward():
    with backend.use_backend("triton"), tuning.forced_variants(backward="single_pass"):
        check_varlen([7, 50, 1], [9, 50, 20], 4, 2, 32, torch.float32, True)


def test_varlen_torch_path():
    """PyTorch's path (GPTFAST_BACKEND=torch, or a call the kernels cannot run) attends each sequence alone."""
    with backend.use_backend("torch"):
        check_varlen([7, 0, 20], [9, 4, 20], 2, 1, 24, torch.float32, True, window_size=(5, -1))
        check_varlen([7, 0, 20], [9, 4, 20], 2, 1, 24, torch.float32, True, used=[8, 0, 13])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_seqused_k(causal, dtype):
    """flash-attn 3's seqused_k: each sequence attends to its first seqused_k[b] keys only (none, some, all), the
    causal diagonal aligned to that count; the unused keys' gradients are 0."""
    with backend.use_backend("triton"):
        check_varlen([5, 1, 20, 3], [9, 4, 33, 2], 4, 2, 24, dtype, causal, seed=seed_of("used", causal),
                     used=[6, 0, 21, 2])


def test_seqused_k_with_every_feature():
    lens_q, lens_k, heads = [19, 1, 40], [33, 6, 40], 4
    alibi = torch.rand(3, heads, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with backend.use_backend("triton"), tuning.forced_variants(backward="single_pass"):
        check_varlen(lens_q, lens_k, heads, 2, 24, torch.float32, True, alibi=alibi, used=[30, 2, 17],
                     window_size=(9, -1), softcap=4.0, attention_chunk=8, sinks=torch.randn(heads, device=DEVICE))


def test_return_attn_probs():
    q, k, v = packed_inputs([3, 5], [4, 5], 2, 2, 16, torch.float32, seed=1)
    with backend.use_backend("triton"):
        out, lse, probs = flash_attn_varlen_func(q, k, v, cumulative([3, 5]), cumulative([4, 5]), 5, 5,
                                                 causal=True, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 8) and probs.shape == (2, 2, 5, 5)
    torch.testing.assert_close(probs[0, :, :3, :4].sum(-1), torch.ones(2, 3, device=DEVICE))
    assert probs[0, :, 3:].abs().sum() == 0 and probs[0, :, :, 4:].abs().sum() == 0


@pytest.mark.parametrize("cu_seqlens_q, max_seqlen_q, message", [
    (torch.tensor([0, 3, 8]), 5, "int32"),
    (torch.tensor([[0, 3, 8]], dtype=torch.int32), 5, "int32"),
    (torch.tensor([0, 9, 8], dtype=torch.int32), 9, "never decrease"),
    (torch.tensor([1, 3, 8], dtype=torch.int32), 5, "start at 0"),
    (torch.tensor([0, 3, 7], dtype=torch.int32), 5, "end at the number of packed tokens"),
    (torch.tensor([0, 3, 8], dtype=torch.int32), 4, r"max_seqlen_q \(4\) is below"),
    (torch.tensor([0, 8], dtype=torch.int32), 8, "as many sequences"),
])
def test_bad_cu_seqlens_raise(cu_seqlens_q, max_seqlen_q, message):
    q, k, v = packed_inputs([3, 5], [3, 5], 2, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match=message):
        flash_attn_varlen_func(q, k, v, cu_seqlens_q.to(DEVICE), cumulative([3, 5]), max_seqlen_q, 5)


@pytest.mark.parametrize("seqused_k, message", [
    (torch.tensor([3, 5]), "int32"),
    (torch.tensor([3], dtype=torch.int32), r"shape \(num_seqs,\) = \(2,\)"),
    (torch.tensor([3, 6], dtype=torch.int32), "within 0 and each sequence's key count"),
    (torch.tensor([-1, 5], dtype=torch.int32), "within 0 and each sequence's key count"),
])
def test_bad_seqused_k_raises(seqused_k, message):
    q, k, v = packed_inputs([3, 5], [3, 5], 2, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match=f"seqused_k .*{message}|{message}"):
        flash_attn_varlen_func(q, k, v, cumulative([3, 5]), cumulative([3, 5]), 5, 5, seqused_k=seqused_k.to(DEVICE))


def test_packed_forms_read_views_of_one_projection():
    """flash_attn_varlen_qkvpacked_func and _kvpacked_func bind positionally as flash-attn's and give
    flash_attn_varlen_func's result on the unbound views; a window may be a list or a tensor."""
    qkv = torch.randn(12, 3, 2, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cu_seqlens = cumulative([5, 7])
    q, k, v = qkv.unbind(1)
    with backend.use_backend("triton"):
        expected = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 7, 7, 0.0, 0.3, True, (3, 0))
        assert torch.equal(flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, 7, 0.0, 0.3, True, [3, 0]), expected)
        assert torch.equal(flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], cu_seqlens, cu_seqlens, 7, 7, 0.0, 0.3,
                                                           True, torch.tensor([3, 0])), expected)
    with pytest.raises(ValueError, match="qkv must be a 4-dim tensor"):
        flash_attn_varlen_qkvpacked_func(qkv[:, :2], cu_seqlens, 7)


def test_bad_shapes_raise():
    q, k, v = packed_inputs([3], [3], 2, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="q must be a 3-dim tensor"):
        flash_attn_varlen_func(q[None], k, v, cumulative([3]), cumulative([3]), 3, 3)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        flash_attn_varlen_func(q, k, v, cumulative([3]), cumulative([3]), 3, 3, alibi_slopes=torch.ones(3))
