"""How a sequence is sharded over the ranks of a context-parallel group.

"contiguous": rank r holds tokens [r * T / N, (r + 1) * T / N). "zigzag": the sequence is cut into 2N chunks of
T / 2N tokens and rank r holds chunks r and 2N - 1 - r, one after the other: under a causal mask the early chunks
see few keys and the late ones many, so each rank gets one of each and the same work (the load balancing of
zhuzilin's ring-flash-attention and of PyTorch's context_parallel, whose "head-tail" split it is).
"""
import torch

LAYOUTS = ("zigzag", "contiguous")


def chunks(layout, rank, world, local_length):
    """[(first position in the sequence, first row in the shard, length)] of the rank's pieces of the sequence."""
    if layout == "zigzag":
        half = local_length // 2
        return [(rank * half, 0, half), ((2 * world - 1 - rank) * half, half, half)]
    return [(rank * local_length, 0, local_length)]


def check_layout(layout, seqlen, world, name="the sequence"):
    """Raises a clear error unless layout is one of LAYOUTS and seqlen splits evenly under it."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = 2 * world if layout == "zigzag" else world
    if seqlen % parts:
        raise ValueError(f"{name} has {seqlen} tokens: a {layout} split over {world} ranks needs a multiple of "
                         f"{parts}; pad it (and mask the padding out of the loss)")


def positions(seqlen, rank, world, layout="zigzag", device=None):
    """int64 (seqlen / world,): the positions in the whole sequence of the tokens rank holds, in its order."""
    check_layout(layout, seqlen, world)
    local = seqlen // world
    return torch.cat([torch.arange(start, start + length, device=device)
                      for start, _, length in chunks(layout, rank, world, local)])


def packed_rows(cu_seqlens, rank, world, layout="zigzag", device=None):
    """int64 (total / world,): the rows of the packed whole (sequences one after another, as cu_seqlens, int32
    (num_seqs + 1,) cumulative lengths, describes them) that rank holds: each sequence split as layout says, rank's
    part of the first sequence, then of the second, ... (the local cumulative lengths are cu_seqlens // world)."""
    bounds = _bounds(cu_seqlens)
    rows = []
    for b, (start, end) in enumerate(zip(bounds, bounds[1:])):
        check_layout(layout, end - start, world, f"sequence {b}")
        rows.append(start + positions(end - start, rank, world, layout, device))
    return torch.cat(rows)


def _bounds(cu_seqlens):
    return cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)


def _packed_bounds(cu_seqlens, x, dim):
    """cu_seqlens as a list ([0, T] for None), checked to end at x's token count along dim."""
    bounds = [0, x.shape[dim]] if cu_seqlens is None else _bounds(cu_seqlens)
    if bounds[-1] != x.shape[dim]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but x has {x.shape[dim]} tokens along dim {dim}")
    return bounds


def zigzag_shard(x, rank, world, dim=1, layout="zigzag", cu_seqlens=None):
    """Rank's shard of x along dim (the sequence): (..., T / world, ...), a copy for zigzag. With cu_seqlens (the
    whole sequences' cumulative lengths), x holds sequences packed along dim and each is split (packed_rows)."""
    if cu_seqlens is None and layout == "contiguous":
        check_layout(layout, x.shape[dim], world)
        return x.chunk(world, dim)[rank]
    bounds = _packed_bounds(cu_seqlens, x, dim)
    return x.index_select(dim, packed_rows(bounds, rank, world, layout, x.device))


def zigzag_unshard(shards, dim=1, layout="zigzag", cu_seqlens=None):
    """The whole sequence (or with cu_seqlens the packed sequences) from every rank's shard, in rank order (as
    all_gather returns them)."""
    whole = torch.cat(shards, dim)
    if cu_seqlens is None and layout == "contiguous":
        return whole
    bounds = _packed_bounds(cu_seqlens, whole, dim)
    world = len(shards)
    order = torch.cat([packed_rows(bounds, rank, world, layout, whole.device) for rank in range(world)])
    return whole.index_select(dim, torch.argsort(order))
