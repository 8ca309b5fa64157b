"""flash-attn 2's ``flash_attn_varlen_func`` (and its qkv- and kv-packed forms) on gptfast's kernels: sequences of
different lengths packed along one token axis and described by int32 cumulative lengths (``cu_seqlens``), so that
nothing is padded and no token attends across a sequence's boundary (documents packed into one training row,
prompts of a batch).

The kernels take the packed tensors as they are: each program reads its sequence's first row and length from
cu_seqlens (the VARLEN switch of gptfast.kernels.attention), forward and backward, with every feature of
flash_attn_func (dropout, sliding windows, softcapping, ALiBi, sinks).
"""
import torch

from gptfast import backend
from gptfast.kvcache import capturing
from gptfast.paged import check_paged, gather_pages, key_counts, paged_kernel_attention
from gptfast.fp8 import check_fp8, dequantized, fp8_descales, fp8_kernel_attention, is_fp8_call
from gptfast.attention_core import (CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, attend, check_flash_options, check_inputs,
                                    check_sinks, chunk_size, draw_dropout_seed, flash_attention_op, kernel_gap,
                                    kernel_sinks, softmax_scale_for, torch_attention)


def check_packed(name, t, dims, parts=None):
    """t is a 3-dim tensor, or with parts a 4-dim one holding that many tensors along dim 1 (qkv, kv)."""
    if not isinstance(t, torch.Tensor) or t.dim() != (3 if parts is None else 4) or parts and t.shape[1] != parts:
        raise ValueError(f"{name} must be a {3 if parts is None else 4}-dim tensor {dims}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k, device,
                     seqused_k=None):
    """Raises a clear error unless both are int32 (num_seqs + 1,) tensors on device, starting at 0,
    non-decreasing, ending at the totals (total_k None: any, for a paged pool), with no length past the max_seqlen
    given, and seqused_k None or int32 (num_seqs,) on device, each from 0 to its sequence's length in cu_seqlens_k.
    Reads their values (one synchronisation), except under torch.compile or CUDA-graph capture, where only types
    and shapes are checked."""
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
        check_cu_tensor(name, cu)
        if cu.device != device:
            raise ValueError(f"{name} is on {cu.device} but q is on {device}")
        if not isinstance(longest, int) or longest < 0:
            raise ValueError(f"max_seqlen_{name[-1]} must be an int >= 0, got {longest!r}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    _check_seqused(seqused_k, cu_seqlens_k.numel() - 1, device)
    if capturing(device):
        return
    values = torch.stack((cu_seqlens_q, cu_seqlens_k)).tolist()
    if seqused_k is not None:
        used, lengths = seqused_k.tolist(), [b - a for a, b in zip(values[1], values[1][1:])]
        if any(not 0 <= u <= n for u, n in zip(used, lengths)):
            raise ValueError(f"seqused_k must be within 0 and each sequence's key count in cu_seqlens_k {lengths}, "
                             f"got {used}")
    for name, cu, total, longest in (("cu_seqlens_q", values[0], total_q, max_seqlen_q),
                                     ("cu_seqlens_k", values[1], total_k, max_seqlen_k)):
        lengths = check_boundaries(name, cu, total)
        if max(lengths) > longest:
            raise ValueError(f"max_seqlen_{name[-1]} ({longest}) is below the longest sequence of {name} "
                             f"({max(lengths)})")


def check_cu_tensor(name, cu):
    """cu (named name) is an int32 (num_seqs + 1,) tensor."""
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be an int32 tensor of shape (num_seqs + 1,), got "
                         f"{(cu.dtype, tuple(cu.shape)) if isinstance(cu, torch.Tensor) else type(cu).__name__}")


def check_boundaries(name, bounds, total):
    """The sequence lengths of cumulative lengths bounds (a list, named name), checked to start at 0, never
    decrease and end at total (None: anywhere)."""
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or min(lengths) < 0:
        raise ValueError(f"{name} must start at 0 and never decrease, got {bounds}")
    if total is not None and bounds[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {bounds[-1]}")
    return lengths


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, sinks=None,
                           attention_chunk=0, seqused_k=None, q_descale=None, k_descale=None, v_descale=None,
                           out_dtype=None):
    """flash-attn 2's ``flash_attn_varlen_func``, same signature and argument order, on gptfast's kernels.

    Args:
        q: (total_q, Hq, D), the queries of every sequence one after another; k, v: (total_k, Hkv, D). Any
            strides. Hq a multiple of Hkv, as in flash_attn_func.
        cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,): sequence b's queries are rows [cu_seqlens_q[b],
            cu_seqlens_q[b + 1]) of q, its keys rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v. Lengths
            may be 0.
        max_seqlen_q, max_seqlen_k: ints, at least the longest sequence's lengths (they size the grid).
        block_table: None, or int32 (num_seqs, pages per sequence) (paged prefill, gptfast.paged): k and v are
            then a paged pool (num_pages, page_size, Hkv, D), page_size a power of two from 16, and sequence b's
            keys are its first cu_seqlens_k[b + 1] - cu_seqlens_k[b] (or seqused_k[b]) positions in the pages
            block_table[b] lists, in order.
        The rest as flash_attn_func, per sequence: causal and window_size are aligned to each sequence's
        bottom-right corner, alibi_slopes is (Hq,) or (num_seqs, Hq).
        sinks, attention_chunk (keyword only): as flash_attn_func's (chunks counted from each sequence's start,
            bottom-right aligned).
        seqused_k (keyword only): None, or int32 (num_seqs,) (flash-attn 3's): sequence b uses only its first
            seqused_k[b] keys (rows [cu_seqlens_k[b], + seqused_k[b])), which make its Tk for the masks'
            alignment; the rest of its rows take no part (their gradients are 0).
        q_descale, k_descale, v_descale, out_dtype (keyword only, flash-attn 3's FP8 forward, gptfast.fp8): with
            torch.float8_e4m3fn q, k and v, float32 (num_seqs, Hkv) descales or scalar tensors (None for 1); the
            output is out_dtype (default bfloat16). Forward only; not with block_table.
    Returns:
        out (total_q, Hq, D) in q's dtype; with return_attn_probs (out, lse (Hq, total_q) float32, S_dmask
        (num_seqs, Hq, max_seqlen_q, max_seqlen_k): each sequence's weights, dropped ones negated, zero-padded).
    """
    check_packed("q", q, "(total_q, nheads, head_dim)")
    paged = block_table is not None
    if not paged:
        check_packed("k", k, "(total_k, nheads_k, head_dim)")
        check_packed("v", v, "(total_k, nheads_k, head_dim)")
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], None if paged else k.shape[0], max_seqlen_q,
                     max_seqlen_k, q.device, seqused_k)
    num_seqs = cu_seqlens_q.numel() - 1
    if paged:
        check_paged(k, v, block_table, num_seqs, key_counts(cu_seqlens_k, seqused_k), q.device)
    window_size = check_flash_options(num_seqs, q.shape[1], q.device, dropout_p, window_size, softcap, alibi_slopes)
    check_sinks(sinks, q.shape[1], q.device)
    chunk = chunk_size(attention_chunk)
    check_inputs(*(t.transpose(0, 1) for t in (q, *(t.flatten(0, 1) if paged else t for t in (k, v)))),
                 enable_gqa=True)
    if is_fp8_call(q, k, v, (q_descale, k_descale, v_descale)):
        out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
        check_fp8(q, k, v, dropout_p, return_attn_probs, out_dtype)
        if paged:
            raise ValueError("FP8 inputs do not take block_table; flash_attn_with_kvcache reads float8 caches")
        descale = fp8_descales(num_seqs, k.shape[1], q.device, q_descale, k_descale, v_descale)
        return _fp8_varlen(q, k, v, descale, out_dtype, (cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                                          max_seqlen_k), softmax_scale, causal, window_size, softcap,
                           alibi_slopes, sinks, chunk)
    if out_dtype is not None:
        raise ValueError("out_dtype applies to FP8 inputs only (the output is in q's dtype)")
    if paged:
        return _paged_attention(q, k, v, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                return_attn_probs, sinks, chunk, seqused_k)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                            return_attn_probs, sinks=sinks, chunk=chunk, seqused_k=seqused_k)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn 2's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, D), the packed sequences' fused
    projection, read as views (no copy); cu_seqlens and max_seqlen serve queries and keys. Everything else as
    flash_attn_varlen_func."""
    check_packed("qkv", qkv, "(total, 3, nheads, head_dim)", parts=3)
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's ``flash_attn_varlen_kvpacked_func``: kv (total_k, 2, Hkv, D), keys then values, read as
    views. Everything else as flash_attn_varlen_func."""
    check_packed("kv", kv, "(total_k, 2, nheads_k, head_dim)", parts=2)
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _paged_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                     return_attn_probs, sinks, chunk, seqused_k):
    """flash_attn_varlen_func over a paged pool (gptfast.paged), for checked arguments: the split-KV kernel
    reading the pages where it can run the call, else the pages gathered into packed keys and values."""
    counts = key_counts(cu_seqlens_k, seqused_k)
    tensors = (q, k_cache, v_cache) if sinks is None else (q, k_cache, v_cache, sinks)
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    scale = softmax_scale_for(q.shape[-1], softmax_scale)
    if not (differentiated or dropout_p > 0 or return_attn_probs) and backend.use_triton(
            "flash_attn_varlen_func", q.device, kernel_gap(q, v_cache, scale, chunk, decode=True)):
        return paged_kernel_attention(q, k_cache, v_cache, block_table, counts, cu_seqlens_q, max_seqlen_q, scale,
                                      causal, window_size, float(softcap), alibi_slopes, kernel_sinks(sinks),
                                      chunk)[0]
    k, v, cu_seqlens_k = gather_pages(k_cache, v_cache, block_table, counts)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                            causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                            sinks=sinks, chunk=chunk)


def _fp8_varlen(q, k, v, descale, out_dtype, sequences, softmax_scale, causal, window_size, softcap, alibi_slopes,
                sinks, chunk):
    """flash_attn_varlen_func's FP8 forward for checked float8 q (total_q, Hq, D), k, v (total_k, Hkv, D) and
    their descale (fp8_descales'): out (total_q, Hq, Dv) in out_dtype, on the kernels or, where they cannot run,
    each sequence attended alone on the dequantised inputs."""
    packed = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, total, D) views
    options = _options(q, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, chunk)
    if backend.use_triton("flash_attn_varlen_func", q.device, kernel_gap(packed[0], packed[2],
                                                                         options["softmax_scale"], chunk, fp8=True)):
        out = fp8_kernel_attention(*packed, descale, out_dtype, **options, sequences=sequences)[0]
    else:
        tokens = [torch.repeat_interleave(torch.arange(len(cu) - 1, device=q.device), cu.diff(), output_size=total)
                  for cu, total in ((sequences[0], q.shape[0]), (sequences[1], k.shape[0]))]
        out = _per_sequence(*dequantized(*packed, descale, tokens), sequences, options, 0.0, False)[0].to(out_dtype)
    return out[0].transpose(0, 1)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     deterministic=False, return_attn_probs=False, *, sinks=None, chunk=0, seqused_k=None):
    """flash_attn_varlen_func for checked arguments: on the kernels' path it reads no value of cu_seqlens, so a
    model that checked its packing once calls it without a synchronisation per layer."""
    num_seqs = cu_seqlens_q.numel() - 1
    packed = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, total, D) views
    options = _options(q, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, chunk)
    softmax_scale, causal = options["softmax_scale"], options["causal"]
    sequences = (cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    if backend.use_triton("flash_attn_varlen_func", q.device, kernel_gap(packed[0], packed[2], softmax_scale, chunk,
                                                                         dropout_p)):
        seed_offset = draw_dropout_seed(q.device) if dropout_p > 0 else None
        out, lse = flash_attention_op(*packed, None, alibi_slopes, kernel_sinks(sinks), seed_offset, *sequences,
                                      causal, window_size[0], window_size[1], chunk, float(softcap), float(dropout_p),
                                      softmax_scale, bool(deterministic))
        kept = None
        if return_attn_probs and dropout_p > 0:
            from gptfast.kernels.attention import dropout_keep_mask
            kept = dropout_keep_mask(seed_offset, num_seqs, q.shape[1], max_seqlen_q, max_seqlen_k, float(dropout_p))
    else:
        out, lse, kept = _per_sequence(*packed, sequences, options, dropout_p, return_attn_probs)
    out = out[0].transpose(0, 1)
    if return_attn_probs:
        return out, lse[0], _attention_probs(*packed, sequences, options, kept)
    return out


def _options(q, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, chunk):
    """attend's keyword arguments for a packed call's flags (causal aligned bottom-right in each sequence)."""
    scale = softmax_scale_for(q.shape[-1], softmax_scale)
    return dict(causal=CAUSAL_BOTTOM_RIGHT if causal else CAUSAL_NONE, window=tuple(window_size),
                softcap=float(softcap), alibi_slopes=alibi_slopes, softmax_scale=scale, sinks=sinks, chunk=chunk)


def _slices(cu_seqlens_q, cu_seqlens_k, seqused_k):
    """(b, query rows, key rows) of each sequence, as slices of the packed axis (reads the lengths); the key rows
    stop after seqused_k[b] with seqused_k."""
    bounds = torch.stack((cu_seqlens_q, cu_seqlens_k)).tolist()
    ends = bounds[1][1:] if seqused_k is None else [a + n for a, n in zip(bounds[1], seqused_k.tolist())]
    return [(b, slice(bounds[0][b], bounds[0][b + 1]), slice(bounds[1][b], ends[b]))
            for b in range(len(bounds[0]) - 1)]


def _check_seqused(seqused_k, num_seqs, device):
    """seqused_k: None or an int32 (num_seqs,) tensor on device (its values are checked with cu_seqlens')."""
    if seqused_k is None:
        return
    if not isinstance(seqused_k, torch.Tensor) or seqused_k.dtype != torch.int32 or seqused_k.shape != (num_seqs,):
        got = (seqused_k.dtype, tuple(seqused_k.shape)) if isinstance(seqused_k, torch.Tensor) else seqused_k
        raise ValueError(f"seqused_k must be None or an int32 tensor of shape (num_seqs,) = ({num_seqs},), got "
                         f"{got!r}")
    if seqused_k.device != device:
        raise ValueError(f"seqused_k is on {seqused_k.device} but q is on {device}")


def sequence_slopes(alibi_slopes, b):
    """Sequence b's ALiBi slopes: (Hq,) or (num_seqs, Hq) slopes (None: None)."""
    return alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]


def _per_sequence(q, k, v, sequences, options, dropout_p, need_keep):
    """PyTorch's path: each sequence attended alone, on (1, H, total, D) tensors; returns (out, lse, kept) as the
    kernels' path does (kept: (num_seqs, Hq, max_seqlen_q, max_seqlen_k) or None)."""
    cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k = sequences
    outs, lses = [], []
    kept = (torch.ones((cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k), dtype=torch.bool,
                       device=q.device) if need_keep and dropout_p > 0 else None)
    for b, rows, keys in _slices(cu_seqlens_q, cu_seqlens_k, seqused_k):
        out, lse, keep = attend(q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                **{**options, "alibi_slopes": sequence_slopes(options["alibi_slopes"], b)},
                                dropout_p=dropout_p, need_lse=True, need_keep=kept is not None,
                                op="flash_attn_varlen_func")
        outs.append(out)
        lses.append(lse)
        if keep is not None:
            kept[b, :, :rows.stop - rows.start, :keys.stop - keys.start] = keep[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), kept


def _attention_probs(q, k, v, sequences, options, kept):
    """flash-attn's S_dmask for return_attn_probs, computed in PyTorch: (num_seqs, Hq, max_seqlen_q,
    max_seqlen_k) float32, each sequence's softmax weights (negated where dropout dropped them), zero-padded."""
    cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k = sequences
    probs = torch.zeros((cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k), device=q.device)
    with torch.no_grad():
        for b, rows, keys in _slices(cu_seqlens_q, cu_seqlens_k, seqused_k):
            weights = torch_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], options["causal"],
                                      options["window"], None, options["softcap"],
                                      sequence_slopes(options["alibi_slopes"], b), 0.0, options["softmax_scale"],
                                      options["sinks"], options["chunk"])[2]
            probs[b, :, :weights.shape[2], :weights.shape[3]] = weights[0]
    return probs if kept is None else torch.where(kept, probs, -probs)
