"""The check that every rank of a group passes tensors of one shape: a rank that sent or awaited a differently
sized message would otherwise wait until the group's timeout, or read garbage."""
import torch
import torch.distributed as dist

from gptfast.distributed.zigzag import check_layout
from gptfast.kernels import remember

_agreed = {}  # (group, local signature) pairs every rank has confirmed


def check_same_shapes(group, *tensors, lengths=()):
    """Raises a ValueError on every rank unless every rank of group passes tensors of the same shapes and dtypes
    (and the same packed sequence lengths): one all_gather of the signatures per new local signature (skipped
    under torch.compile). A shape that changes on some ranks only, later, is left to the group's timeout."""
    if torch.compiler.is_compiling():
        return
    signature = tuple((tuple(t.shape), str(t.dtype)) for t in tensors) + tuple(lengths)
    if (id(group), signature) in _agreed:
        return
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, signature, group=group)
    if any(other != signature for other in everyone):
        raise ValueError(f"every rank of the group must pass tensors of the same shapes and dtypes (and sequence "
                         f"lengths); got, by rank: {everyone}")
    remember(_agreed, (id(group), signature), True)


def check_shards(q, k, v, group, layout, lengths=()):
    """Raises a clear error for shards no rank can attend: q (B, T / N, Hq, D), k (B, T / N, Hkv, D), v (B, T / N,
    Hkv, Dv) of one dtype and device with Hq a multiple of Hkv, a length layout can split over the group's N
    ranks, and the same shapes (and lengths, each packed sequence's on this rank) on every rank."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (batch, seq_len / world, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must share a dtype and a device, got {q.dtype}, {k.dtype}, {v.dtype} on "
                         f"{q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q (B, T, Hq, D), k (B, T, Hkv, D) and v (B, T, Hkv, Dv) must share B and T, k and v "
                         f"their heads, q and k D, with Hq a multiple of Hkv; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    world = dist.get_world_size(group)
    check_layout(layout, q.shape[1] * world, world, f"the sequence ({q.shape[1]} tokens per rank)")
    check_same_shapes(group, q, k, v, lengths=lengths)
