"""Ring attention: context parallelism by passing keys and values around the ranks of a process group.

Each rank keeps its shard of the queries and, N times, attends to one rank's shard of the keys and values while
the next shard is already on its way (torch.distributed.batch_isend_irecv), merging the partial outputs exactly
through their log-sum-exp: out = sum_s e^(lse_s - lse) out_s with lse = log sum_s e^lse_s (Liu, Zaharia and
Abbeel, 2023, "Ring Attention with Blockwise Transformers"; zhuzilin's ring-flash-attention). The backward passes
the keys and values around again, each rank adding its queries' share of dk and dv into accumulators that travel
with them; every block's gradient comes from the whole output and lse (dscores = p * (dp - delta), p = e^(s -
lse)), which gptfast's backward kernels take as they are.

A block is one pair of sequence pieces: this rank's queries of one piece against another rank's keys of one piece
(zigzag shards hold two, gptfast.distributed.zigzag). A pair whose every key is visible runs without a mask (pairs
that share a side are merged into one call); one whose keys are all hidden (the causal future, outside the window)
is skipped; the rest run with the causal bound and window placed by attention_spec.Features.shift, the distance
between the two pieces' first positions, so the kernels skip the hidden tiles as on one GPU. Packed sequences
(cu_seqlens) are each split over the ranks on their own, and each sequence's pairs are blocks of their own.
Chunks (Llama 4's) hide the pairs of pieces in different chunks, or give a piece that holds whole chunks its own
keys only, under the kernels' chunk bound (pair).

Forward and backward are custom ops with the messages inside, so torch.compile takes a call whole.
"""
import functools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from gptfast import backend
from gptfast.attention_core import (CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, check_flash_options, check_sinks, chunk_size,
                                    kernel_gap, softmax_scale_for, torch_attention, work_dtype)
from gptfast.custom_ops import custom_op
from gptfast.distributed.shapes import check_shards
from gptfast.distributed.zigzag import check_layout, chunks
from gptfast.varlen import check_boundaries, check_cu_tensor, check_packed, sequence_slopes


class Options(NamedTuple):
    """A ring_attention call's flags, checked: flash_attn_func's meanings, over the whole sequence (alibi_slopes
    None or float32, broadcastable to (B, Hq), or (num_seqs, Hq) with lengths); lengths: None, or each packed
    sequence's token count on this rank; chunk: flash-attn 3's attention_chunk (check_chunk has checked it)."""
    scale: float
    causal: bool
    window: tuple
    softcap: float
    alibi_slopes: torch.Tensor | None = None
    lengths: tuple | None = None
    chunk: int = 0

    def steps(self, layout, ring, source, local_length):
        """The calls of a step, each as (query rows, key rows, Features): plan's, or for packed sequences each
        sequence's in turn, its rows offset to where it starts."""
        if self.lengths is None:
            return self._calls(layout, ring, source, local_length, 0, self.alibi_slopes)
        calls, start = [], 0
        for b, length in enumerate(self.lengths):
            calls += self._calls(layout, ring, source, length, start, sequence_slopes(self.alibi_slopes, b))
            start += length
        return calls

    def _calls(self, layout, ring, source, length, start, slopes):
        if length == 0:
            return []
        calls = plan(layout, ring.rank, source, ring.world, length, self.causal, self.window, slopes is None,
                     self.chunk)
        at = lambda rows: slice(rows.start + start, rows.stop + start)  # noqa: E731
        return [(at(rows), at(key_rows), block_features(self, shift, kind, slopes))
                for rows, key_rows, shift, kind in calls]


class Ring:
    """Point-to-point exchanges with the neighbours of this rank in a process group: send to rank + 1, receive from
    rank - 1."""

    def __init__(self, group):
        self.group = group or dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.send_to = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.receive_from = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def pass_on(self, tensors):
        """Starts sending each contiguous tensor on and receiving as many alike; returns (received, wait): the
        received tensors hold their data once wait() has returned."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [op for sent, into in zip(tensors, received)
               for op in (dist.P2POp(dist.isend, sent, self.send_to, self.group),
                          dist.P2POp(dist.irecv, into, self.receive_from, self.group))]
        requests = dist.batch_isend_irecv(ops)
        return received, lambda: [request.wait() for request in requests]


def pair(q_start, k_start, length, causal, window, chunk=0):
    """How the queries at positions [q_start, + length) see the keys at [k_start, + length): "none", "all" or
    "some", under the causal bound and flash-attn's window (left, right), -1 unbounded; with chunks of chunk
    positions (one of chunk and length a multiple of the other, check_chunk), pieces in different chunks see
    nothing, and a piece that holds several chunks sees its own keys "chunked" (the kernels' chunk bound then
    applies as on one GPU: the piece starts on a chunk's first position)."""
    if chunk and length % chunk == 0 and chunk < length:
        return "chunked" if q_start == k_start else "none"
    if chunk and q_start // chunk != k_start // chunk:  # each piece lies inside one chunk
        return "none"
    left, right = window
    if causal:
        right = 0
    shift = q_start - k_start  # query i minus key j ranges over shift -+ (length - 1)
    fewest, most = shift - (length - 1), shift + (length - 1)
    lowest = -right if right >= 0 else -math.inf  # key <= query + right
    highest = left if left >= 0 else math.inf  # key >= query - left
    if most < lowest or fewest > highest:
        return "none"
    return "all" if lowest <= fewest and most <= highest else "some"


@functools.cache
def plan(layout, rank, source, world, local_length, causal, window, merge, chunk=0):
    """The calls of the step where this rank's queries meet source's keys: [(query rows, key rows, shift, kind)]:
    slices of the two shards; shift, the distance between the two pieces' first positions (attention_spec.Features
    .shift), None for a merged call; kind, pair's: "all", "some" (the causal bound or the window hide some keys)
    or "chunked" (so do chunks). With merge (not with ALiBi, whose distances need each pair's own shift), pairs
    that see everything are merged along a side they share (a shard holds at most two adjacent pieces of equal
    length)."""
    calls, seen_whole = [], {}
    for q_start, q_row, length in chunks(layout, rank, world, local_length):
        for k_start, k_row, _ in chunks(layout, source, world, local_length):
            kind = pair(q_start, k_start, length, causal, window, chunk)
            if kind != "none" and (kind != "all" or not merge):
                calls.append((slice(q_row, q_row + length), slice(k_row, k_row + length), q_start - k_start, kind))
            elif kind == "all":
                seen_whole.setdefault(q_row, []).append(k_row)
    by_keys = {}
    for q_row, k_rows in seen_whole.items():
        by_keys.setdefault((k_rows[0], k_rows[-1] + length), []).append(q_row)
    for (k_first, k_end), q_rows in by_keys.items():
        calls.append((slice(q_rows[0], q_rows[-1] + length), slice(k_first, k_end), None, "all"))
    return calls


def block_features(options, shift, kind, alibi_slopes):
    """The attention_spec.Features of one call of the plan, of pair's kind."""
    from gptfast.kernels.attention_spec import Features
    masked = kind != "all"
    causal = CAUSAL_BOTTOM_RIGHT if options.causal and masked else CAUSAL_NONE
    return Features(causal, options.window if masked else (-1, -1), alibi_slopes=alibi_slopes,
                    softcap=options.softcap, chunk=options.chunk if kind == "chunked" else 0, shift=shift or 0)


def block_forward(q, k, v, features, scale, kernels):
    """One call's partial attention: (out (B, Hq, Tq, Dv) float32 (float64 for float64 inputs), lse (B, Hq, Tq),
    -inf where a row sees no key), on the kernels or on PyTorch. q, k, v (B, H, T, D) views."""
    if kernels:
        from gptfast.kernels.attention import attention_forward
        out, lse = attention_forward(q, k, v, scale, features, torch.float32)
    else:
        work = work_dtype(q.dtype)
        out, lse = _torch_block(*(t.to(work) for t in (q, k, v)), features, scale)
    return out, lse.masked_fill(lse == math.inf, -math.inf)


def block_backward(grad_out, grad_lse, q, k, v, out, lse, features, scale, kernels):
    """One call's (dq, dk, dv) given the whole attention's out, lse and their gradients (the rows' own slices,
    lse +inf for a row that sees no key at all, grad_lse float32 (B, Hq, rows), contiguous): the gradient of
    this block's share of them."""
    if kernels:
        from gptfast.kernels.attention import attention_backward
        return attention_backward(grad_out, grad_lse, q, k, v, out, lse, scale, features)[:3]
    # PyTorch: the block recomputed under torch.func.vjp (which works inside a custom op, below autograd). out =
    # sum_b w_b out_b and lse = log sum_b e^lse_b with w_b = e^(lse_b - lse), so the block's out_b receives
    # w_b dO and its lse_b receives w_b (dO . out_b - dO . out + dlse).
    work = work_dtype(q.dtype)
    (block_out, block_lse), vjp = torch.func.vjp(lambda *qkv: block_forward(*qkv, features, scale, False),
                                                 *(t.to(work) for t in (q, k, v)))
    weight = torch.exp(block_lse - lse)
    grad_out = grad_out.to(work)
    delta = (grad_out * out.to(work)).sum(-1) - grad_lse
    return vjp((weight[..., None] * grad_out, weight * ((grad_out * block_out).sum(-1) - delta)))


def _torch_block(q, k, v, features, scale):
    """(out, lse) of a call on PyTorch's path, with the kernels' meaning of features."""
    return torch_attention(q, k, v, features.causal, features.window, None, features.softcap, features.alibi_slopes,
                           0.0, scale, chunk=features.chunk, shift=features.shift)[:2]


def merge(out, lse, rows, block_out, block_lse):
    """Adds a call's partial attention into rows of the running out (B, Hq, T, Dv) and lse (B, Hq, T), exactly
    (-inf: nothing seen yet)."""
    old = lse[:, :, rows]
    new = torch.logaddexp(old, block_lse)
    keep, take = (torch.exp(part - new).nan_to_num(0.0) for part in (old, block_lse))  # -inf - -inf: none seen
    out[:, :, rows] = out[:, :, rows] * keep[..., None] + block_out * take[..., None]
    lse[:, :, rows] = new


def ring_forward(q, k, v, ring, layout, options, kernels):
    """(out, lse): out (B, Hq, T, Dv) in (B, T, Hq, Dv) memory and lse (B, Hq, T), -inf for rows that saw nothing,
    float32 (float64 for float64 inputs); q (B, T, Hq, D), k, v (B, T, Hkv, D) contiguous: this rank's shards."""
    batch, length, heads = q.shape[:3]
    work = work_dtype(q.dtype)
    out = q.new_zeros((batch, length, heads, v.shape[3]), dtype=work).transpose(1, 2)
    lse = q.new_full((batch, heads, length), -math.inf, dtype=work)
    keys_values = (k, v)
    for step in range(ring.world):
        if step + 1 < ring.world:  # the next shard travels while this one is attended
            incoming, wait = ring.pass_on(keys_values)
        source = (ring.rank - step) % ring.world
        keys, values = (t.transpose(1, 2) for t in keys_values)
        for rows, key_rows, features in options.steps(layout, ring, source, length):
            block_out, block_lse = block_forward(rows_of(q, rows), keys[:, :, key_rows], values[:, :, key_rows],
                                                 features, options.scale, kernels)
            merge(out, lse, rows, block_out, block_lse)
        if step + 1 < ring.world:
            wait()
            keys_values = incoming
    return out, lse


def rows_of(t, rows):
    """Rows of a (B, T, H, D) tensor as a (B, H, rows, D) view."""
    return t.transpose(1, 2)[:, :, rows]


def ring_backward(grad_out, grad_lse, q, k, v, out, lse, ring, layout, options, kernels):
    """(dq, dk, dv) in float32 (float64 for float64 inputs), (B, H, T, D) each, for this rank's shards (q, k, v,
    grad_out and out (B, T, H, D) contiguous; lse (B, Hq, T) the whole attention's, grad_lse its gradient, of
    lse's dtype). The accumulators of dk and dv travel with the keys and values they belong to and, after the last
    step, reach their own rank."""
    length = q.shape[1]
    work = work_dtype(q.dtype)
    grad_q = torch.zeros(q.transpose(1, 2).shape, dtype=work, device=q.device)
    keys_values, arriving, arrived = (k, v), None, None
    for step in range(ring.world):
        if step + 1 < ring.world:
            incoming, wait = ring.pass_on(keys_values)
        source = (ring.rank - step) % ring.world
        grads = [torch.zeros(t.transpose(1, 2).shape, dtype=work, device=q.device) for t in keys_values]
        for rows, key_rows, features in options.steps(layout, ring, source, length):
            block = block_backward(rows_of(grad_out, rows), grad_lse[:, :, rows].contiguous(), rows_of(q, rows),
                                   rows_of(keys_values[0], key_rows), rows_of(keys_values[1], key_rows),
                                   rows_of(out, rows), lse[:, :, rows].contiguous(), features, options.scale,
                                   kernels)
            grad_q[:, :, rows] += block[0]
            grads[0][:, :, key_rows] += block[1]
            grads[1][:, :, key_rows] += block[2]
        if arriving is not None:  # what the ranks before added for these keys, sent while this step ran
            arriving()
            grads = [mine + theirs for mine, theirs in zip(grads, arrived)]
        if ring.world > 1:
            arrived, arriving = ring.pass_on(grads)
        if step + 1 < ring.world:
            wait()
            keys_values = incoming
    if arriving is not None:
        arriving()
        grads = arrived
    return grad_q, *grads


@custom_op("gptfast::ring_attention")
def ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                      alibi_slopes: torch.Tensor | None, group_name: str, layout: str, scale: float, causal: bool,
                      window_left: int, window_right: int, softcap: float, chunk: int, lengths: list[int] | None,
                      kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ring_attention's forward as a custom op (torch.compile takes it whole; the messages are inside): (out (B, T,
    Hq, Dv) in q's dtype, contiguous; lse (B, Hq, T) float32 (float64 for float64 inputs), the sinks' included,
    +inf for rows that saw nothing, as the backward kernels take it). group_name names the process group."""
    ring, options = _ring_options(group_name, scale, causal, window_left, window_right, softcap, chunk, alibi_slopes,
                                  lengths)
    out, lse = ring_forward(q.contiguous(), k.contiguous(), v.contiguous(), ring, layout, options, kernels)
    if sinks is not None:  # a logit per head in every row's denominator, taking no value
        with_sinks = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])
        out = out * torch.exp(lse - with_sinks).nan_to_num(0.0)[..., None]
        lse = with_sinks
    return out.to(q.dtype).transpose(1, 2), lse.masked_fill(lse == -math.inf, math.inf)


@ring_attention_op.register_fake
def _(q, k, v, sinks, alibi_slopes, group_name, layout, scale, causal, window_left, window_right, softcap, chunk,
      lengths, kernels):
    batch, length, heads = q.shape[:3]
    return (q.new_empty((batch, length, heads, v.shape[3])),
            q.new_empty((batch, heads, length), dtype=work_dtype(q.dtype)))


@custom_op("gptfast::ring_attention_backward")
def ring_attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, sinks: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                               alibi_slopes: torch.Tensor | None, group_name: str, layout: str, scale: float,
                               causal: bool, window_left: int, window_right: int, softcap: float, chunk: int,
                               lengths: list[int] | None, kernels: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks) for ring_attention_op's (out, lse) and their gradients: dsinks (Hq,) this rank's rows'
    share in sinks' dtype, empty without sinks."""
    ring, options = _ring_options(group_name, scale, causal, window_left, window_right, softcap, chunk, alibi_slopes,
                                  lengths)
    q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out.to(q.dtype)))
    grad_lse = grad_lse.to(lse.dtype).contiguous()
    grads = ring_backward(grad_out, grad_lse, q, k, v, out, lse, ring, layout, options, kernels)
    dq, dk, dv = (g.transpose(1, 2).to(t.dtype) for g, t in zip(grads, (q, k, v)))
    if sinks is None:
        return dq, dk, dv, q.new_empty(0)
    # a sink's logit joins lse and takes its weight e^(sink - lse) from every value: d/dsink = that weight times
    # (dlse - dO . out)
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(1, 2) - grad_lse
    return dq, dk, dv, -(torch.exp(sinks.to(lse.dtype)[None, :, None] - lse) * delta).sum((0, 2)).to(sinks.dtype)


@ring_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, sinks, out, lse, alibi_slopes, group_name, layout, scale, causal, window_left,
      window_right, softcap, chunk, lengths, kernels):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(0) if sinks is None else torch.empty_like(sinks))


def _ring_options(group_name, scale, causal, window_left, window_right, softcap, chunk, alibi_slopes, lengths):
    """The Ring of the named group and the call's Options."""
    group = dist.distributed_c10d._resolve_process_group(group_name)  # as torch's functional collectives name groups
    return Ring(group), Options(scale, causal, (window_left, window_right), softcap, alibi_slopes,
                                None if lengths is None else tuple(lengths), chunk)


def _setup_context(ctx, inputs, output):
    q, k, v, sinks, alibi_slopes, *flags = inputs
    ctx.save_for_backward(q, k, v, sinks, alibi_slopes, *output)
    ctx.flags = flags


def _backward(ctx, grad_out, grad_lse):
    q, k, v, sinks, alibi_slopes, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    dq, dk, dv, dsinks = ring_attention_backward_op(grad_out, grad_lse, q, k, v, sinks, out, lse, alibi_slopes,
                                                    *ctx.flags)
    return dq, dk, dv, dsinks if ctx.needs_input_grad[3] else None, *([None] * (1 + len(ctx.flags)))


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(q, k, v, group=None, causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None, sinks=None, layout="zigzag", cu_seqlens=None, return_lse=False,
                   attention_chunk=0):
    """Attention over a sequence sharded across the ranks of group, by passing keys and values around the ring.

    Args:
        q: (B, T / N, Hq, D), k, v: (B, T / N, Hkv, D) and (.., .., Hkv, Dv): this rank's shard of the sequence,
            flash-attn's layout, laid out as `layout` says (gptfast.distributed.zigzag: "zigzag", pieces r and
            2N - 1 - r of 2N, which balances causal work; or "contiguous"); Hq a multiple of Hkv. Every rank
            passes the same shapes (checked once per shape). With cu_seqlens: (total / N, Hq, D) and (total / N,
            Hkv, D | Dv), flash_attn_varlen_func's layout: this rank's part of each packed sequence, one after
            another (zigzag_shard(x, rank, N, dim=0, layout=layout, cu_seqlens=the whole's) lays them out).
        group: the process group (default: the whole world); N its size.
        causal, softmax_scale, window_size, softcap, alibi_slopes: as flash_attn_func's (flash_attn_varlen_func's
            with cu_seqlens), over the whole sequence (ALiBi's distances are positions in it).
        sinks: None or (Hq,) learned logits in every row's softmax denominator (gpt-oss); its gradient is this
            rank's rows' share (sum it over the group, as DDP does for every weight).
        cu_seqlens: None, or int32 (num_seqs + 1,) cumulative lengths of the packed sequences' parts on this rank
            (the whole sequences' // N; each sequence splits as layout says; the same on every rank). Its values
            are read: on the CPU that costs no synchronisation.
        return_lse: also return the lse.
        attention_chunk: 0, or flash-attn 3's chunk size C (Llama 4's chunked attention: query i sees only keys in
            its chunk of C positions, on top of causal and window_size). A piece of the sequence (T / 2N tokens
            for zigzag, T / N contiguous; each packed sequence's own) and C must be multiples one of the other:
            a piece then lies inside one chunk, or starts on a chunk's first position.
    Returns:
        out (B, T / N, Hq, Dv) (with cu_seqlens (total / N, Hq, Dv)) in q's dtype: this rank's rows of the whole
        sequence's attention; with return_lse (out, lse): lse (B, Hq, T / N) (with cu_seqlens (Hq, total / N))
        float32 (float64 for float64 inputs), natural log, the sinks' included, +inf for a row that sees no key.
        Differentiable in q, k, v and sinks.
    The kernels run each block (Features.shift places the causal bound and window; each packed sequence is a
    block of its own); where they cannot run, PyTorch does (warned once under ``auto``). Forward and backward are
    custom ops, so torch.compile takes a call whole (cu_seqlens' values are read before: a graph break). Not yet:
    dropout.
    """
    group = group or dist.group.WORLD
    packed = cu_seqlens is not None
    if packed:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_packed(name, t, "(total / N, heads, head_dim)")
        lengths = local_lengths(cu_seqlens, q.shape[0], dist.get_world_size(group), layout)
        q, k, v = (t.unsqueeze(0) for t in (q, k, v))
    check_shards(q, k, v, group, layout, lengths if packed else ())
    batch = len(lengths) if packed else q.shape[0]
    window = check_flash_options(batch, q.shape[2], q.device, 0.0, window_size, softcap, alibi_slopes)
    check_sinks(sinks, q.shape[2], q.device)
    chunk = check_chunk(attention_chunk, layout, dist.get_world_size(group), lengths if packed else [q.shape[1]])
    scale = softmax_scale_for(q.shape[-1], softmax_scale)
    kernels = backend.use_triton("ring_attention", q.device,
                                 kernel_gap(q.transpose(1, 2), v.transpose(1, 2), scale, chunk))
    out, lse = ring_attention_op(q, k, v, sinks, alibi_slopes, group.group_name, layout, scale, bool(causal),
                                 window[0], window[1], float(softcap), chunk, lengths if packed else None, kernels)
    if packed:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def check_chunk(attention_chunk, layout, world, local_lengths):
    """attention_chunk as an int, checked against the pieces of each sequence (local_lengths: its tokens on this
    rank) that the ring pairs: one of a piece's length and the chunk size must be a multiple of the other."""
    chunk = chunk_size(attention_chunk)
    for length in local_lengths:
        piece = chunks(layout, 0, world, length)[0][2]
        if chunk and piece and piece % chunk and chunk % piece:
            raise ValueError(f"attention_chunk {chunk} with the ring's pieces of {piece} tokens ({layout} over "
                             f"{world} ranks): one must be a multiple of the other")
    return chunk


def local_lengths(cu_seqlens, total, world, layout):
    """Each packed sequence's token count on this rank, from cu_seqlens (read), checked: int32 (num_seqs + 1,)
    from 0 to total, never decreasing, each length one that layout splits (2 pieces for zigzag)."""
    check_cu_tensor("cu_seqlens", cu_seqlens)
    lengths = check_boundaries("cu_seqlens", cu_seqlens.tolist(), total)
    for b, length in enumerate(lengths):
        check_layout(layout, length * world, world, f"sequence {b} ({length} tokens per rank)")
    return lengths
