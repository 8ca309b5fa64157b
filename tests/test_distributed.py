"""Context parallelism (gptfast.distributed) on gloo process groups of 2 and 4 CPU processes: ring and all-to-all
attention against the float64 attention of the whole sequence on one process, output and every gradient (dq, dk,
dv of each rank's shard; the sinks' summed over the ranks), under tests/tolerance.py's rule; causal and not, GQA,
windows, softcapping, ALiBi, sinks, zigzag and contiguous shards, odd piece lengths; the kernels through the
interpreter at tiny sizes and PyTorch's path at larger ones; the zigzag helpers; shapes that differ between ranks,
and other bad input."""
import datetime
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
               causal=True, window=(-1, -1), softcap=0.0, with_sinks=False, with_alibi=False, seed=0):
    """One call of method ("ring" or "all-to-all") on this rank's shards of random inputs that every rank draws
    alike, against the whole sequence's float64 reference (and PyTorch in dtype, the rule's baseline)."""
    gen = torch.Generator().manual_seed(seed)
    length = length or 10 * world
    q = torch.randn(batch, length, heads, head_dim, generator=gen)
    k, v = (torch.randn(batch, length, kv_heads, head_dim, generator=gen) for _ in range(2))
    grad = torch.randn(batch, length, heads, head_dim, generator=gen)
    sinks = torch.randn(heads, generator=gen) if with_sinks else None
    slopes = torch.rand(batch, heads, generator=gen) if with_alibi else None
    spec = dict(causal=BOTTOM_RIGHT if causal else NONE, window=window, softcap=softcap, alibi=slopes)
    references = [_whole_sequence(q, k, v, sinks, grad, work, spec) for work in (torch.float64, dtype)]
    leaves = [zigzag_shard(t, rank, world, layout=layout).to(dtype).requires_grad_() for t in (q, k, v)]
    local_sinks = None if sinks is None else sinks.clone().requires_grad_()
    options = dict(causal=causal, window_size=window, softcap=softcap, sinks=local_sinks, alibi_slopes=slopes)
    with backend.use_backend("triton" if kernels else "torch"):
        if method == "ring":
            out = ring_attention(*leaves, layout=layout, **options)
        else:
            out = all_to_all_attention(*leaves, layout=layout, **options)
        out.backward(zigzag_shard(grad, rank, world, layout=layout).to(dtype))
    results = [out, *(t.grad for t in leaves)]
    for name, got, exact, lowp in zip(("out", "dq", "dk", "dv"), results, *references):
        shard = lambda t: zigzag_shard(t, rank, world, layout=layout)  # noqa: E731
        assert_accurate(f"{method} {layout} rank {rank}: {name}", got, shard(exact), shard(lowp), terms=length)
    if sinks is not None:
        dist.all_reduce(local_sinks.grad)  # each rank's share: its rows' (ring) or its heads' (all-to-all)
        assert_accurate(f"{method} {layout} dsinks", local_sinks.grad, references[0][4], references[1][4],
                        terms=length, dtype=dtype)


def _whole_sequence(q, k, v, sinks, grad, work, spec):
    """(out, dq, dk, dv, dsinks) of the whole sequence's attention in work, in flash-attn's layout."""
    leaves = [t.to(work, copy=True).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    sink = None if sinks is None else sinks.to(work, copy=True).requires_grad_()
    out = reference_attention(*leaves, sinks=sink, **spec)
    out.backward(grad.to(work).transpose(1, 2))
    flash = lambda t: t.transpose(1, 2)  # noqa: E731
    return flash(out.detach()), *(flash(t.grad) for t in leaves), None if sink is None else sink.grad


def check_mismatched_shapes(rank, world):
    """A rank passing another length than the others gets a ValueError on every rank, not a hang."""
    q = torch.randn(1, 4 + 2 * rank, 2, 16)
    for attention in (ring_attention, all_to_all_attention):
        with pytest.raises(ValueError, match="same shapes"):
            attention(q, q, q)


def check_all_to_all_compiles(rank, world):
    """torch.compile captures all_to_all_attention whole (fullgraph; aot_eager, as no C++ compiler is needed), and
    the compiled call gives the eager output and gradients."""
    gen = torch.Generator().manual_seed(14 + rank)
    q, k, v = (torch.randn(1, 8, 4, 16, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(1, 8, 4, 16, generator=gen)
    compiled = torch.compile(all_to_all_attention, backend="aot_eager", fullgraph=True)
    results = []
    with backend.use_backend("triton"):
        for attention in (all_to_all_attention, compiled):
            out = attention(q, k, v, layout="zigzag", causal=True, window_size=(5, 0))
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
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
]
FOUR_RANKS = [
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=True, length=24, window=(7, 0), seed=8),
    dict(method="ring", layout="zigzag", dtype=torch.float32, kernels=False, length=96, causal=False, seed=9),
    dict(method="all-to-all", layout="zigzag", dtype=torch.float32, kernels=True, length=24, kv_heads=4, seed=10),
]


def test_two_ranks_match_one_process():
    run_ranks(2, [(check_case, case) for case in TWO_RANKS] + [(check_mismatched_shapes, {}),
                                                                 (check_all_to_all_compiles, {})])


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
    with pytest.raises(ValueError, match="needs a multiple of 6"):
        zigzag_shard(torch.zeros(1, 10), 0, 3)
    with pytest.raises(ValueError, match="layout must be one of"):
        zigzag_shard(x, 0, 3, layout="striped")
