"""All-to-all context parallelism (DeepSpeed Ulysses: Jacobs et al., 2023): each rank trades its sequence shard
of every head for the whole sequence of 1/N of the heads, attends to them locally with any feature of
flash_attn_func, and trades back: an all-to-all for each of q, k and v, and one for the output; no ring."""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from gptfast.attention import flash_attn_func
from gptfast.distributed.shapes import check_shards
from gptfast.distributed.zigzag import positions


def swap(x, group, to_heads, order):
    """to_heads: this rank's shard (B, T / N, H, D) of every head -> the whole sequence (B, T, H / N, D) of its
    heads (rank r takes heads [r H / N, (r + 1) H / N)); else back. order: None (contiguous shards), or the
    position in the sequence of each token in rank order (zigzag shards), which the whole sequence is sorted by.
    Differentiable (the gradient swaps back) and traceable by torch.compile: torch's functional all-to-all."""
    world = dist.get_world_size(group)
    if to_heads:
        batch, length, heads, dim = x.shape
        sent = x.reshape(batch, length, world, heads // world, dim).permute(2, 0, 1, 3, 4).contiguous()
        received = funcol.all_to_all_single_autograd(sent, None, None, group)  # [s]: rank s's tokens, my heads
        whole = received.permute(1, 0, 2, 3, 4).reshape(batch, world * length, heads // world, dim)
        return whole if order is None else whole[:, torch.argsort(order)]
    if order is not None:
        x = x[:, order]
    batch, length, heads, dim = x.shape
    sent = x.reshape(batch, world, length // world, heads, dim).transpose(0, 1).contiguous()
    received = funcol.all_to_all_single_autograd(sent, None, None, group)  # [s]: my tokens, rank s's heads
    return received.permute(1, 2, 0, 3, 4).reshape(batch, length // world, world * heads, dim)


def all_to_all_attention(q, k, v, group=None, layout="contiguous", **options):
    """Attention over a sequence sharded across the ranks of group, by all-to-alls between sequence and head
    shards (Ulysses).

    Args:
        q: (B, T / N, Hq, D), k, v: (B, T / N, Hkv, D): this rank's shard of the sequence ("contiguous", or
            "zigzag" as gptfast.distributed.zigzag lays it out); Hq and Hkv multiples of N, the group's size.
        options: flash_attn_func's keywords (causal, window_size, softcap, alibi_slopes, sinks, dropout_p, ...),
            over the whole sequence; alibi_slopes and sinks are given for every head (each rank takes its own).
    Returns:
        out (B, T / N, Hq, Dv) in q's dtype, this rank's rows; differentiable.
    """
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_shards(q, k, v, group, layout)
    if k.shape[2] % world:
        raise ValueError(f"all_to_all_attention gives each of the group's {world} ranks a share of the heads: q's and "
                         f"k's heads must be multiples of {world}, got {q.shape[2]} and {k.shape[2]}")
    if options.get("return_lse") or options.get("return_attn_probs"):
        raise ValueError("all_to_all_attention returns the output only (no return_lse or return_attn_probs)")
    length = q.shape[1] * world
    heads = slice(rank * q.shape[2] // world, (rank + 1) * q.shape[2] // world)
    for name in ("alibi_slopes", "sinks"):  # per-head arguments: this rank's heads
        if options.get(name) is not None:
            options[name] = options[name][..., heads]
    order = None if layout == "contiguous" else torch.cat(
        [positions(length, r, world, layout, q.device) for r in range(world)])
    out = flash_attn_func(*(swap(t, group, True, order) for t in (q, k, v)), **options)
    return swap(out, group, False, order)
