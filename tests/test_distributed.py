"""Context parallelism (gptfast.distributed) on gloo process groups of 2 and 4 CPU processes: ring and all-to-all
attention against the float64 attention of the whole sequence on one process, output and every gradient (dq, dk,
dv of each rank's shard; the sinks' summed over the ranks), under tests/tolerance.py's rule; causal and not, GQA,
windows, softcapping, ALiBi, sinks, zigzag and contiguous shards, odd piece lengths, packed sequences; the kernels
through the interpreter at tiny sizes and PyTorch's path at larger ones; the zigzag helpers; shapes that differ
between ranks, and other bad input."""
import datetime
import itertools
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

from gptfast import backend
from gptfast.distributed import all_to_all_attention, positions, ring_attention, zigzag_shard, zigzag_unshard
from support import BOTTOM_RIGHT, NONE, reference_attention
from tolerance import assert_accurate

TIMEOUT = datetime.timedelta(seconds=120)  # a failing rank ends the others' collectives instead of hanging them


def run_ranks(world, checks):
    """Runs each check(rank, world, **options) of checks, (check, options) pairs, on world processes joined in one
    gloo group; a failure in any rank fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_rank_main, args=(world, folder, checks), nprocs=world, join=True)


def _rank_main(rank, world, folder, checks):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        for check, options in checks:
            check(rank, world, **options)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Seen in CI, once: a rank that had passed every check aborted as the process ended ("terminate called without
    # an active exception", gloo's threads torn down); gptfast.train.finish_distributed met the like. Once every
    # rank is done, leave directly.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_case(rank, world, method, layout, dtype, kernels, batch=1, heads=4, kv_heads=2, length=None, head_dim=24,
               causal=True, window=(-1, -1), softcap=0.0, with_sinks=False, with_alibi=False, seed=0, lengths=None,
               chunk=0):
    """One call of method ("ring" or "all-to-all") on this rank's shards of random inputs that every rank draws
    alike, against the whole sequence's float64 reference (and PyTorch in dtype, the rule's baseline). With
    lengths (ring only): sequences of those lengths packed along one axis (batch 1), cu_seqlens given."""
    gen = torch.Generator().manual_seed(seed)
    length = sum(lengths) if lengths else length or 10 * world
    q = torch.randn(batch, length, heads, head_dim, generator=gen)
    k, v = (torch.randn(batch, length, kv_heads, head_dim, generator=gen) for _ in range(2))
    grad = torch.randn(batch, length, heads, head_dim, generator=gen)
    grad_lse = torch.randn(batch, length, heads, generator=gen) * (method == "ring")  # all-to-all returns no lse
    sinks = torch.randn(heads, generator=gen) if with_sinks else None
    slopes = torch.rand(len(lengths) if lengths else batch, heads, generator=gen) if with_alibi else None
    spec = dict(causal=BOTTOM_RIGHT if causal else NONE, window=window, softcap=softcap, alibi=slopes, chunk=chunk)
    references = [_whole_sequences(q, k, v, sinks, grad, grad_lse, work, spec, lengths)
                  for work in (torch.float64, dtype)]
    cu_seqlens = None if lengths is None else torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    if cu_seqlens is None:
        shard = lambda t: zigzag_shard(t, rank, world, layout=layout)  # noqa: E731
    else:  # flash_attn_varlen_func's layout, (total / N, H, D), and the local cumulative lengths
        shard = lambda t: zigzag_shard(t[0], rank, world, dim=0, layout=layout, cu_seqlens=cu_seqlens)  # noqa: E731
    leaves = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
    local_sinks = None if sinks is None else sinks.clone().requires_grad_()
    options = dict(causal=causal, window_size=window, softcap=softcap, sinks=local_sinks, alibi_slopes=slopes,
                   attention_chunk=chunk)
    if cu_seqlens is not None:
        options["cu_seqlens"] = cu_seqlens // world
    with backend.use_backend("triton" if kernels else "torch"):
        if method == "ring":  # lse (B, Hq, T / N), packed (Hq, total / N): compared and differentiated too
            out, lse = ring_attention(*leaves, layout=layout, return_lse=True, **options)
            torch.autograd.backward([out, lse], [shard(grad).to(dtype), shard(grad_lse).transpose(-1, -2)])
            lse = lse.transpose(-1, -2)
        else:
            out, lse = all_to_all_attention(*leaves, layout=layout, **options), None
            out.backward(shard(grad).to(dtype))
    results = [out, lse, *(t.grad for t in leaves)]
    for name, got, exact, lowp in zip(("out", "lse", "dq", "dk", "dv"), results, *references):
        if got is not None:
            assert_accurate(f"{method} {layout} rank {rank}: {name}", got, shard(exact), shard(lowp), terms=length)
    if sinks is not None:
        dist.all_reduce(local_sinks.grad)  # each rank's share: its rows' (ring) or its heads' (all-to-all)
        assert_accurate(f"{method} {layout} dsinks", local_sinks.grad, references[0][5], references[1][5],
                        terms=length, dtype=dtype)


def _whole_sequences(q, k, v, sinks, grad, grad_lse, work, spec, lengths):
    """(out, lse, dq, dk, dv, dsinks) of the whole sequence's attention in work, in flash-attn's layout (lse (B, T,
    Hq)), grad and grad_lse the gradients of out and lse; with lengths, each packed sequence's alone (ALiBi's
    slopes one row per sequence), joined again."""
    if lengths is None:
        return _whole_sequence(q, k, v, sinks, grad, grad_lse, work, spec)
    parts, start = [], 0
    for b, length in enumerate(lengths):
        rows = slice(start, start + length)
        slopes = None if spec["alibi"] is None else spec["alibi"][b:b + 1]
        parts.append(_whole_sequence(*(t[:, rows] for t in (q, k, v)), sinks, grad[:, rows], grad_lse[:, rows], work,
                                     {**spec, "alibi": slopes}))
        start += length
    joined = [torch.cat(tensors, 1) for tensors in zip(*(part[:5] for part in parts))]
    return (*joined, None if sinks is None else sum(part[5] for part in parts))


def _whole_sequence(q, k, v, sinks, grad, grad_lse, work, spec):
    """(out, lse, dq, dk, dv, dsinks) of the whole sequence's attention in work, in flash-attn's layout."""
    leaves = [t.to(work, copy=True).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    sink = None if sinks is None else sinks.to(work, copy=True).requires_grad_()
    out, lse = reference_attention(*leaves, sinks=sink, need_lse=True, **spec)
    torch.autograd.backward([out, lse], [grad.to(work).transpose(1, 2), grad_lse.to(lse.dtype).transpose(1, 2)])
    flash = lambda t: t.detach().transpose(1, 2)  # noqa: E731
    return flash(out), flash(lse), *(flash(t.grad) for t in leaves), None if sink is None else sink.grad


def check_mismatched_shapes(rank, world):
    """A rank passing another length than the others (or other packed sequences) gets a ValueError on every rank,
    not a hang; bad packings get theirs."""
    q = torch.randn(1, 4 + 2 * rank, 2, 16)
    for attention in (ring_attention, all_to_all_attention):
        with pytest.raises(ValueError, match="same shapes"):
            attention(q, q, q)
    packed = torch.randn(8, 2, 16)  # packed sequences whose lengths differ between the ranks, or are bad anywhere
    with pytest.raises(ValueError, match="same shapes"):
        ring_attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 2 + 2 * rank, 8], dtype=torch.int32))
    for cu_seqlens, match in (([0, 3, 8], "sequence 0 .3 tokens per rank. .* needs a multiple of 4"),
                              ([0, 2, 6], r"end at the number of packed tokens \(8\)"),
                              ([0, 6, 4, 8], "start at 0 and never decrease")):
        with pytest.raises(ValueError, match=match):
            ring_attention(packed, packed, packed, cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be an int32"):
        ring_attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="attention_chunk 3 with the ring's pieces of 2 tokens"):
        ring_attention(q[:, :4], q[:, :4], q[:, :4], attention_chunk=3)
    with pytest.raises(ValueError, match="q must be a 3-dim"):
        ring_attention(q, q, q, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


def check_compiles(rank, world, method):
    """torch.compile captures ring or all-to-all attention whole (fullgraph; aot_eager, as no C++ compiler is
    needed), and the compiled call gives the eager output and gradients (the sinks' too)."""
    gen = torch.Generator().manual_seed(14 + rank)
    q, k, v = (torch.randn(1, 8, 4, 16, generator=gen).requires_grad_() for _ in range(3))
    sinks = torch.randn(4, generator=gen).requires_grad_()
    grad = torch.randn(1, 8, 4, 16, generator=gen)
    attention = ring_attention if method == "ring" else all_to_all_attention
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    results = []
    with backend.use_backend("triton"):
        for call in (attention, compiled):
            out = call(q, k, v, layout="zigzag", causal=True, window_size=(5, 0), sinks=sinks)
            results.append((out, *torch.autograd.grad(out, (q, k, v, sinks), grad)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


TWO_RANKS = [
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=True),
    dict(method="ring", layout="zigzag", dtype=torch.bfloat16, kernels=True, batch=2, seed=1),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=True, window=(6, 0), softcap=5.0,
         with_sinks=True, seed=2),
    dict(method="ring", layout="contiguous", dtype=torch.float32, kernels=True, causal=False, kv_heads=4, seed=3),
    dict(method="all-to-all", layout="contiguous", dtype=torch.bfloat16, kernels=True, window=(5, 0), seed=4),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=True, batch=2, with_alibi=True, seed=11),
    dict(method="all-to-all", layout="zigzag", dtype=torch.float32, kernels=True, with_alibi=True, seed=12),
    dict(method="all-to-all", layout="zigzag", dtype=torch.float32, kernels=True, with_sinks=True, seed=5),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=False, length=256, head_dim=32,
         window=(70, 0), seed=6),
    dict(method="all-to-all", layout="zigzag", dtype=torch.float32, kernels=False, length=256, head_dim=32, seed=7),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=False, length=96, window=(30, 0),
         with_alibi=True, seed=13),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=True, lengths=(12, 4, 20), window=(5, 0),
         with_alibi=True, with_sinks=True, seed=15),
    dict(method="ring", layout="contiguous", dtype=torch.float32, kernels=False, lengths=(64, 8, 120), causal=False,
         softcap=5.0, seed=17),
    # Llama 4's chunks: pieces of 10 tokens holding two chunks each; pieces of 24 inside chunks of 48
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=True, chunk=5, window=(6, 0), seed=19),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=False, length=96, chunk=48, seed=20),
    dict(method="all-to-all", layout="zigzag", dtype=torch.float32, kernels=False, length=96, chunk=20, seed=21),
]
FOUR_RANKS = [
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=True, length=24, window=(7, 0), seed=8),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=False, length=96, causal=False, seed=9),
    dict(method="all-to-all", layout="zigzag", dtype=torch.float32, kernels=True, length=24, kv_heads=4, seed=10),
]


def test_two_ranks_match_one_process():
    run_ranks(2, [(check_case, case) for case in TWO_RANKS] + [(check_mismatched_shapes, {}),
                                                                 (check_compiles, dict(method="all-to-all")),
                                                                 (check_compiles, dict(method="ring"))])


def test_four_ranks_match_one_process():
    run_ranks(4, [(check_case, case) for case in FOUR_RANKS])


def test_zigzag_shards_and_unshards():
    """Rank r holds pieces r and 2N - 1 - r of 2N; positions says where each of its tokens sits; unshard
    inverts."""
    x = torch.arange(12)[None]
    shards = [zigzag_shard(x, rank, 3) for rank in range(3)]
    assert [s.tolist() for s in shards] == [[[0, 1, 10, 11]], [[2, 3, 8, 9]], [[4, 5, 6, 7]]]
    assert positions(12, 1, 3).tolist() == [2, 3, 8, 9]
    assert torch.equal(zigzag_unshard(shards), x)
    assert torch.equal(zigzag_unshard([zigzag_shard(x, r, 3, layout="contiguous") for r in range(3)],
                                      layout="contiguous"), x)
    cu_seqlens = torch.tensor([0, 4, 4, 12], dtype=torch.int32)  # packed sequences, each split alone
    packed = [zigzag_shard(x[0], rank, 2, dim=0, cu_seqlens=cu_seqlens) for rank in range(2)]
    assert [s.tolist() for s in packed] == [[0, 3, 4, 5, 10, 11], [1, 2, 6, 7, 8, 9]]
    assert torch.equal(zigzag_unshard(packed, dim=0, cu_seqlens=cu_seqlens), x[0])
    with pytest.raises(ValueError, match="needs a multiple of 6"):
        zigzag_shard(torch.zeros(1, 10), 0, 3)
    with pytest.raises(ValueError, match="sequence 1 has 6 tokens"):
        zigzag_shard(x[0], 0, 2, dim=0, cu_seqlens=[0, 4, 10, 12])
    with pytest.raises(ValueError, match="cu_seqlens ends at 8 but x has 12"):
        zigzag_shard(x[0], 0, 2, dim=0, cu_seqlens=[0, 4, 8])
    with pytest.raises(ValueError, match="layout must be one of"):
        zigzag_shard(x, 0, 3, layout="striped")
