"""flash-attn 2's ``flash_attn_with_kvcache`` on gptfast's split-KV decoding kernel (gptfast.kernels.decode): new
keys and values written into a preallocated cache in place, rotary embedding of the new queries and keys, plain
or paged caches, per-sequence lengths, and attention over the cache, all in one call.

The cache update runs one kernel (kernels.decode.cache_append_kernel), the rotary embedding PyTorch, the attention
the split-KV kernel. Where the kernels cannot run (float64, the CPU without TRITON_INTERPRET) the update is
PyTorch's index_put and each sequence is attended alone in PyTorch.
"""
import torch

from gptfast import backend
from gptfast.attention_core import (CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, attend, check_flash_options, check_sinks,
                                    chunk_size, kernel_gap, kernel_sinks, softmax_scale_for, window_pair)
from gptfast.checked import checked_once
from gptfast.fp8 import FP8, to_fp8

MIN_PAGE_SIZE = 16


def shape_of(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_int32(name, t, shape, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be an int32 tensor of shape {shape}, got "
                         f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def check_block_table(block_table, batch, pool, pool_name, device):
    """block_table: int32 (batch, pages per sequence) on device; the pool's page size (pool.shape[1]) a power of
    two from MIN_PAGE_SIZE (a key block of the decoding kernel never crosses a page). Returns the pages per
    sequence."""
    pages = block_table.shape[1] if isinstance(block_table, torch.Tensor) and block_table.dim() == 2 else 0
    check_int32("block_table", block_table, (batch, max(pages, 1)), device)
    page = pool.shape[1]
    if page < MIN_PAGE_SIZE or page & (page - 1):
        raise ValueError(f"a paged pool's page size ({pool_name}.shape[1]) must be a power of two from "
                         f"{MIN_PAGE_SIZE}, got {page}")
    return pages


def _check_tensors(q, k_cache, v_cache, k, v, block_table, cache_batch_idx):
    """Shapes and dtypes that need no values."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor, got {shape_of(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dtype == FP8:
        raise ValueError("q must be in a 16- or 32-bit dtype: flash_attn_with_kvcache takes float8 caches (k_scale, "
                         "v_scale), not float8 queries")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, FP8):
        raise ValueError(f"k_cache and v_cache must both be in q's dtype ({q.dtype}) or both torch.float8_e4m3fn "
                         f"(with k_scale and v_scale), got {k_cache.dtype} and {v_cache.dtype}")
    batch, _, heads, head_dim = q.shape
    if (k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != head_dim or heads % k_cache.shape[2]
            or v_cache.shape[3] < 1):
        raise ValueError(f"k_cache and v_cache must be (.., .., nheads_k, {head_dim}) and (.., .., nheads_k, "
                         f"head_dim_v), alike but in the last dim, with nheads_k dividing q's {heads} heads, got "
                         f"{shape_of(k_cache)} and {shape_of(v_cache)}")
    if (k is None) != (v is None):
        raise ValueError("pass k and v together, or neither")
    if k is not None:
        new = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
        for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
            wanted = (batch, new, *cache.shape[2:])
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != wanted or t.dtype != q.dtype:
                raise ValueError(f"{name} must be a {q.dtype} tensor of shape (batch, seqlen_new, nheads_k, "
                                 f"{name}_cache's head_dim) = {wanted}, got {shape_of(t)}")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache); index the "
                             "block_table rows instead")
        check_block_table(block_table, batch, k_cache, "k_cache", q.device)
    elif cache_batch_idx is not None:
        check_int32("cache_batch_idx", cache_batch_idx, (batch,), q.device)
    elif k_cache.shape[0] != batch:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has batch {batch}; pass "
                         f"cache_batch_idx to pick cache rows")


def _check_rotary(rotary_cos, rotary_sin, head_dim, device):
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass rotary_cos and rotary_sin together, or neither")
    if rotary_cos is None:
        return
    shape = shape_of(rotary_cos)
    if (not isinstance(rotary_cos, torch.Tensor) or rotary_cos.dim() != 2 or shape_of(rotary_sin) != shape
            or not 0 < 2 * shape[1] <= head_dim):
        raise ValueError(f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                         f"head_dim ({head_dim}), got {shape} and {shape_of(rotary_sin)}")
    if rotary_cos.device != device or rotary_sin.device != device:
        raise ValueError(f"rotary_cos and rotary_sin must be on q's device ({device}), got {rotary_cos.device} and "
                         f"{rotary_sin.device}")


def cache_descales(k_scale, v_scale, k_cache, batch):
    """For float8 caches, the decoding kernel's descale: float32 (2, batch, Hkv), contiguous, k_scale's then
    v_scale's value per kv head (vLLM's k_scale and v_scale: a stored float8 value times its scale is the real
    one; a float32 tensor of one value or of one per kv head, (Hkv,); None for 1). None for caches in q's dtype,
    which take no scale."""
    if k_cache.dtype != FP8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale and v_scale apply to torch.float8_e4m3fn caches only; these are {k_cache.dtype}")
        return None
    kv_heads = k_cache.shape[2]

    def per_head(name, scale):
        if scale is None:
            return torch.ones(kv_heads, device=k_cache.device)
        if (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() > 1
                or scale.numel() not in (1, kv_heads)):
            raise ValueError(f"{name} must be a float32 tensor of one value or of one per kv head ({kv_heads},), got "
                             f"{(scale.dtype, tuple(scale.shape)) if isinstance(scale, torch.Tensor) else scale!r}")
        if scale.device != k_cache.device:
            raise ValueError(f"{name} is on {scale.device} but the caches are on {k_cache.device}")
        return scale.reshape(-1).expand(kv_heads)

    scales = torch.stack((per_head("k_scale", k_scale), per_head("v_scale", v_scale)))
    return scales[:, None].expand(2, batch, kv_heads).contiguous()


def capturing(device):
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _check_values(seqlens, new_tokens, capacity, block_table, num_pages, cache_batch_idx, cache_rows, leftpad,
                  rotary_rows, rotary_positions, descale):
    """The values no shape shows, read with one synchronisation (skipped under torch.compile and CUDA-graph
    capture, where a read would break the graph)."""
    if capturing(seqlens.device):
        return
    parts = [seqlens, *(t.flatten() for t in (block_table, cache_batch_idx, leftpad) if t is not None)]
    if descale is not None:  # the count of scales that are not positive and finite, last
        parts.append((~((descale > 0) & descale.isfinite())).sum().int()[None])
    values = torch.cat(parts).tolist()
    if descale is not None and values.pop():
        raise ValueError(f"k_scale and v_scale must be positive and finite, got {descale[:, 0].tolist()}")
    lengths, rest = values[:seqlens.numel()], values[seqlens.numel():]
    if min(lengths) < 0 or max(lengths) + new_tokens > capacity:
        raise ValueError(f"cache_seqlens must be in [0, {capacity - new_tokens}] so that the {new_tokens} new "
                         f"tokens fit in the cache's {capacity} slots, got {min(lengths)} to {max(lengths)}")
    for name, t, bound in (("block_table", block_table, num_pages), ("cache_batch_idx", cache_batch_idx,
                                                                     cache_rows)):
        if t is not None:
            chunk, rest = rest[:t.numel()], rest[t.numel():]
            if min(chunk) < 0 or max(chunk) >= bound:
                raise ValueError(f"{name} must index the cache's {bound} {'pages' if t is block_table else 'rows'}"
                                 f" (0 to {bound - 1}), got values from {min(chunk)} to {max(chunk)}")
    if leftpad is not None and any(not 0 <= pad <= length + new_tokens for pad, length in zip(rest, lengths)):
        raise ValueError("cache_leftpad must lie in [0, cache_seqlens + seqlen_new] for every sequence")
    if rotary_rows is not None and max(lengths) + rotary_positions > rotary_rows:
        raise ValueError(f"rotary_cos has {rotary_rows} positions but the tokens reach position "
                         f"{max(lengths) + rotary_positions - 1}")


def apply_rotary(x, cos, sin, positions, interleaved):
    """Rotary embedding (Su et al., 2021) of the first rotary_dim = 2 * cos.shape[1] features of x (B, T, H, D)
    at positions (B, T) int64; interleaved rotates pairs (x0, x1), (x2, x3), ... (GPT-J), else the halves
    (x_i, x_{i + rotary_dim / 2}) (GPT-NeoX, Llama). Computed in float32, returned in x's dtype."""
    half = cos.shape[1]
    cos, sin = cos[positions][:, :, None].float(), sin[positions][:, :, None].float()
    rotated = x[..., :2 * half].float()
    if interleaved:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
        rotated = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1).flatten(-2)
    else:
        first, second = rotated[..., :half], rotated[..., half:]
        rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _append(k, v, k_cache, v_cache, block_table, seqlens, descale):
    """PyTorch's kernels.decode.append_to_cache: k and v written at positions seqlens[b] + i of each sequence, in
    the (pages, page_size, H, D) pool that block_table (B, pages) addresses (float8 caches: divided by descale's
    scales as they are rounded)."""
    positions = seqlens[:, None].long() + torch.arange(k.shape[1], device=seqlens.device)
    pages = torch.gather(block_table.long(), 1, positions // k_cache.shape[1])
    slots = positions % k_cache.shape[1]
    if descale is not None:
        k, v = (to_fp8(new, 1 / scale[:, None, :, None]) for new, scale in zip((k, v), descale))
    k_cache[pages, slots] = k
    v_cache[pages, slots] = v


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            sinks=None, attention_chunk=0, k_scale=None, v_scale=None):
    """flash-attn 2's ``flash_attn_with_kvcache``, same signature and argument order, on gptfast's kernels.

    Args:
        q: (B, Tq, Hq, D). k_cache, v_cache: (B_cache, T_cache, Hkv, D) and (.., .., Hkv, Dv) (Dv = D, or not:
            MLA), or with block_table a paged pool (num_pages, page_size, Hkv, D), page_size a power of two from 16
            (flash-attn requires 256).
        k, v: None, or (B, T_new, Hkv, D) and (B, T_new, Hkv, Dv): written into the cache in place at positions
            cache_seqlens[b], cache_seqlens[b] + 1, ... before the attention (cache_seqlens itself is not updated:
            the caller adds T_new, as with flash-attn).
        rotary_cos, rotary_sin: None, or (seqlen_ro, rotary_dim / 2): k is rotated at positions cache_seqlens,
            cache_seqlens + 1, ...; q too when causal, windowed or chunked, else every query at cache_seqlens.
            rotary_interleaved: rotate pairs (GPT-J) rather than halves (GPT-NeoX).
        cache_seqlens: int or int32 (B,): tokens already in each sequence's cache (default: all of it).
        cache_batch_idx: int32 (B,): the cache row of each sequence (plain caches only).
        cache_leftpad: int32 (B,): keys before it are padding, never attended.
        block_table: int32 (B, pages per sequence): the pool pages of each sequence, in order.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as flash_attn_func, aligned to each sequence's
            bottom-right corner (query t sits at position cache_seqlens + T_new - Tq + t).
        num_splits: how many programs share a sequence's keys (split-KV); 0 chooses from the GPU's size.
        return_softmax_lse: also return lse (B, Hq, Tq) float32.
        sinks (keyword only): None, or a floating (Hq,) tensor of learned logits in every row's softmax
            denominator (gpt-oss), as flash_attn_func's; the split-KV merge counts them once.
        attention_chunk (keyword only, flash-attn 3's): 0, or a chunk size C: query t sees only the keys of its
            own chunk of C positions, counted from the sequence's first key after cache_leftpad (Llama 4).
        k_scale, v_scale (keyword only, vLLM's FP8 KV cache): with torch.float8_e4m3fn caches, float32 tensors of
            one value or of one per kv head (Hkv,), None for 1: a stored key is its float8 value times k_scale.
            New k and v (in q's dtype) are divided by them and rounded to float8 as they are written, saturating
            at +-448. The kernel widens the float8 keys and values to q's dtype as it loads them (sm_89 and newer;
            elsewhere PyTorch on the dequantised keys, with a warning under ``auto``).
    Returns:
        out (B, Tq, Hq, Dv) in q's dtype, or (out, lse).
    """
    if isinstance(window_size, torch.Tensor):  # its values are the window: read before the checks' signature
        window_size = window_pair(window_size)
    window_size, chunk = checked_once(_check_call, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                                      cache_batch_idx, cache_leftpad, block_table, window_size, softcap,
                                      alibi_slopes, num_splits, sinks, attention_chunk)
    batch = q.shape[0]
    rows = cache_batch_idx if cache_batch_idx is not None else torch.arange(batch, dtype=torch.int32,
                                                                            device=q.device)
    table = block_table if block_table is not None else rows[:, None]
    capacity = table.shape[1] * k_cache.shape[1]
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), capacity if cache_seqlens is None else cache_seqlens,
                                   dtype=torch.int32, device=q.device)
    check_int32("cache_seqlens", cache_seqlens, (batch,), q.device)
    descale = cache_descales(k_scale, v_scale, k_cache, batch)
    local = causal or window_size != (-1, -1) or chunk > 0
    new_tokens = 0 if k is None else k.shape[1]
    _check_values(cache_seqlens, new_tokens, capacity, block_table, k_cache.shape[0], cache_batch_idx,
                  k_cache.shape[0], cache_leftpad, None if rotary_cos is None else rotary_cos.shape[0],
                  max(new_tokens, q.shape[1] if local else 1), descale)
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin, rotary_interleaved)
    out, lse = cached_attention(q, k_cache, v_cache, k, v, cache_seqlens, table, cache_leftpad, rotary,
                                softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits, sinks, chunk,
                                descale)
    return (out, lse) if return_softmax_lse else out


def _check_call(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table,
                window_size, softcap, alibi_slopes, num_splits, sinks, attention_chunk):
    """flash_attn_with_kvcache's checks that read no tensor's values (paid once per signature, gptfast.checked);
    returns (window (left, right), chunk)."""
    _check_tensors(q, k_cache, v_cache, k, v, block_table, cache_batch_idx)
    _check_rotary(rotary_cos, rotary_sin, q.shape[3], q.device)
    window = check_flash_options(q.shape[0], q.shape[2], q.device, 0.0, window_size, softcap, alibi_slopes)
    check_sinks(sinks, q.shape[2], q.device)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 chooses), got {num_splits!r}")
    if cache_leftpad is not None:
        check_int32("cache_leftpad", cache_leftpad, (q.shape[0],), q.device)
    return window, chunk_size(attention_chunk)


def cached_attention(q, k_cache, v_cache, k, v, seqlens, block_table, leftpad=None, rotary=None,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     num_splits=0, sinks=None, chunk=0, descale=None):
    """flash_attn_with_kvcache for checked arguments, without reading any value (so a CUDA graph can capture it):
    block_table (B, pages) int32 (a plain cache's rows as (B, 1)), seqlens int32 (B,), rotary None or (cos, sin,
    interleaved), chunk 0 or attention_chunk, descale None or for float8 caches cache_descales'. Returns (out
    (B, Tq, Hq, Dv), lse (B, Hq, Tq))."""
    if rotary is not None:
        cos, sin, interleaved = rotary
        start = seqlens[:, None].long()
        if causal or window_size != (-1, -1) or chunk > 0:
            q = apply_rotary(q, cos, sin, start + torch.arange(q.shape[1], device=q.device), interleaved)
        else:  # every query sits at cache_seqlens
            q = apply_rotary(q, cos, sin, start.expand(-1, q.shape[1]), interleaved)
        if k is not None:
            k = apply_rotary(k, cos, sin, start + torch.arange(k.shape[1], device=q.device), interleaved)
    softmax_scale = softmax_scale_for(q.shape[-1], softmax_scale)
    kernels = backend.use_triton("flash_attn_with_kvcache", q.device,
                                 kernel_gap(q, v_cache, softmax_scale, decode=True))
    if k is not None:
        if kernels:
            from gptfast.kernels.decode import append_to_cache
            append_to_cache(k, v, k_cache, v_cache, block_table, seqlens, descale)
        else:
            _append(k, v, k_cache, v_cache, block_table, seqlens, descale)
        seqlens = seqlens + k.shape[1]
    if kernels:
        from gptfast.kernels.decode import decode_attention
        return decode_attention(q, k_cache, v_cache, block_table, seqlens, leftpad, softmax_scale,
                                0 if causal else window_size[1], window_size[0], float(softcap), alibi_slopes,
                                num_splits, kernel_sinks(sinks), chunk, descale=descale)
    return _per_sequence(q, k_cache, v_cache, seqlens, block_table, leftpad, softmax_scale, causal, window_size,
                         softcap, alibi_slopes, sinks, chunk, descale)


def _per_sequence(q, k_cache, v_cache, seqlens, block_table, leftpad, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, sinks, chunk, descale):
    """PyTorch's path: each sequence's visible keys gathered (float8 ones dequantised to q's dtype) and attended
    alone. Returns (out, lse)."""
    lengths = seqlens.tolist()
    pads = [0] * len(lengths) if leftpad is None else leftpad.tolist()
    outs, lses = [], []
    for b, (pad, length) in enumerate(zip(pads, lengths)):
        keys, values = (cache[block_table[b].long()].flatten(0, 1)[pad:length].transpose(0, 1)[None]
                        for cache in (k_cache, v_cache))
        if descale is not None:
            keys, values = ((t.float() * scale[b][:, None, None]).to(q.dtype)
                            for t, scale in zip((keys, values), descale))
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out, lse, _ = attend(q[b:b + 1].transpose(1, 2), keys, values, CAUSAL_BOTTOM_RIGHT if causal else CAUSAL_NONE,
                             window_size, None, softcap, slopes, 0.0, softmax_scale, need_lse=True,
                             op="flash_attn_with_kvcache", sinks=sinks, chunk=chunk)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
