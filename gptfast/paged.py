"""Paged prefill: ``flash_attn_varlen_func(..., block_table=...)`` (flash-attn 2's), the keys and values of packed
sequences read from a paged pool, as a serving engine's chunked prefill attends to a prompt's cached prefix.

The queries of every sequence, packed along T, run the split-KV kernel of gptfast.kernels.decode, which reads the
pool through the block table (its VARLEN switch: one kernel for prefill and decoding over a paged cache, as vLLM's
Triton unified attention does), so nothing is copied. What that kernel does not do (gradients, dropout,
return_attn_probs) runs on keys and values gathered from the pool into packed tensors (one copy, one read of the
lengths), through flash_attn_varlen_func's own path: gradients then reach the pool.
"""
import torch

from gptfast.kvcache import capturing, check_block_table, shape_of


def check_paged(k_cache, v_cache, block_table, num_seqs, key_counts, device):
    """k_cache, v_cache: (num_pages, page_size, Hkv, D) and (.., .., Hkv, Dv), page_size a power of two from
    MIN_PAGE_SIZE (kvcache.check_block_table); block_table int32 (num_seqs, pages) with values in [0, num_pages);
    key_counts (num_seqs,) int32, each at most pages * page_size. Values are read once, except under torch.compile
    or CUDA-graph capture."""
    for name, t in (("k", k_cache), ("v", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"with block_table, {name} must be a paged pool (num_pages, page_size, nheads_k, "
                             f"head_dim), got {shape_of(t)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k and v must be pools of the same pages, page size and heads, got {shape_of(k_cache)} "
                         f"and {shape_of(v_cache)}")
    pages, page = check_block_table(block_table, num_seqs, k_cache, "k", device), k_cache.shape[1]
    if capturing(device):
        return
    counts, entries = key_counts.tolist(), block_table.flatten().tolist()
    if min(entries) < 0 or max(entries) >= k_cache.shape[0]:
        raise ValueError(f"block_table must index the pool's {k_cache.shape[0]} pages, got values from "
                         f"{min(entries)} to {max(entries)}")
    if max(counts) > pages * page:
        raise ValueError(f"a sequence has {max(counts)} keys but block_table gives each {pages} pages of {page}")


def key_counts(cu_seqlens_k, seqused_k):
    """Each sequence's key count, int32 (num_seqs,): seqused_k, or the lengths in cu_seqlens_k."""
    return seqused_k if seqused_k is not None else cu_seqlens_k[1:] - cu_seqlens_k[:-1]


def gather_pages(k_cache, v_cache, block_table, counts):
    """(k, v, cu_seqlens_k): each sequence's first counts[b] keys and values copied out of the pool, packed along
    T ((total_k, Hkv, D)), differentiable with respect to the pool, and their cumulative lengths, int32. Reads
    counts (one synchronisation)."""
    page = k_cache.shape[1]
    slots = torch.arange(block_table.shape[1] * page, device=counts.device)
    rows = block_table.long().repeat_interleave(page, dim=1) * page + slots % page  # (num_seqs, capacity)
    index = rows[slots[None, :] < counts[:, None]]
    cu_seqlens_k = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).int()
    return k_cache.flatten(0, 1)[index], v_cache.flatten(0, 1)[index], cu_seqlens_k


def paged_kernel_attention(q, k_cache, v_cache, block_table, counts, cu_seqlens_q, max_seqlen_q, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, sinks, chunk):
    """(out (total_q, Hq, Dv), lse (Hq, total_q)) from the split-KV kernel reading the pool through block_table,
    for checked arguments; reads no value."""
    from gptfast.kernels.decode import decode_attention
    out, lse = decode_attention(q[None], k_cache, v_cache, block_table, counts, None, softmax_scale,
                                0 if causal else window_size[1], window_size[0], softcap, alibi_slopes, 0, sinks,
                                chunk, queries=(cu_seqlens_q, max_seqlen_q))
    return out[0], lse[0]
