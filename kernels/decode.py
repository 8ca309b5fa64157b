"""Attention over a KV cache, split along the keys (flash-decoding), and the kernel that merges the splits.

Decoding runs a few query rows against a long cache: one program per block of query rows would leave most of the
GPU idle (a batch-1 step of a 12-head model: 12 programs for 132 multiprocessors). Flash-decoding (Dao, Haziza,
Massa and Sizov, 2023, "Flash-Decoding for long-context inference") splits each sequence's keys over programs;
each writes its rows' partial output and log-sum-exp, and a second kernel merges them exactly: with m = max_s
lse_s, out = sum_s exp(lse_s - m) out_s / sum_s exp(lse_s - m) and lse = m + log sum_s exp(lse_s - m).

Grouped-query heads are packed into one program's rows (the rows of a block are (query, head of the group)
pairs, query-major), so each key is loaded once per kv head, not once per query head.

Layouts:
    q: (B, Tq, Hq, D), any strides; or, for paged prefill (gptfast.paged), the queries of B sequences packed
    along T, (1, total_q, Hq, D), sequence b's rows from cu_seqlens_q[b] to cu_seqlens_q[b + 1] (out and lse too).
    k_cache, v_cache: (pages, page_size, Hkv, D) and (.., .., Hkv, Dv), any strides: a paged pool addressed
    through block_table (B, pages per sequence) int32, key j of sequence b at page block_table[b, j // page_size],
    slot j % page_size; a plain cache (B_cache, T_cache, Hkv, D) is the pool of
    one page per sequence (page_size = T_cache, block_table = the cache row of each sequence, (B, 1)).
    seqlens: (B,) int32, keys [first, seqlens[b]) are visible, first = leftpad[b] with LEFTPAD else 0.
    Query t of sequence b sits at key position seqlens[b] - Tq + t (bottom-right, as flash-attn's KV cache); with
    CHUNK it sees only keys of its chunk, chunks counted from the first visible key.
    out: (B, Tq, Hq, Dv) in q's dtype; lse: (B, Hq, Tq) float32, +inf for a row that sees no key (the sink with
    sinks: (Hq,) float32 logits, one per query head, in every row's softmax denominator, taking no value).
"""
import functools

import torch
import triton
import triton.language as tl

from gptfast.kernels import cdiv, device_arch, input_precision, multiprocessors, next_power_of_2, padded_head_dim
from gptfast.kernels.autotune import autotune
from gptfast.kernels.attention_blocks import chunk_start, head_columns, online_softmax, softmax_start, tile_scores
from gptfast.kernels.attention_spec import Spec
from gptfast.kernels.attention_tuning import MAX_REGISTERS, length_bucket
from gptfast.kernels.math import LOG2E

MAX_SPLITS = 64
MAX_BLOCK_D = 512  # the widest head-dim block; queries and keys past it add a tail block (key_blocks)
MIN_KEYS_PER_SPLIT = 256  # below this a split's loads no longer hide the merge's cost


@triton.jit
def _chunk_of(query, seqlen_q, seqlen_k, first_key, chunk):
    """The first key of query's chunk: chunks of `chunk` positions counted from first_key."""
    return first_key + chunk_start(seqlen_k - seqlen_q + query - first_key, chunk)


@triton.jit
def _row_keys(query, seqlen_q, seqlen_k, first_key, window_sides, SPEC: tl.constexpr):
    """(low, high), (BLOCK_M, 1) columns: each query row sees keys [low, high] (below seqlen_k), the first key,
    the causal bound, the window and the chunk folded into one range per row, computed once (a per-pair chunk
    test spilled sm_120's every-feature tile)."""
    causal_right, window_left, chunk = window_sides
    position = seqlen_k - seqlen_q + query
    low = tl.zeros_like(query) + first_key
    high = tl.zeros_like(query) + seqlen_k
    if SPEC.CAUSAL:
        high = tl.minimum(high, position + causal_right)
    if SPEC.WINDOW:
        low = tl.maximum(low, position - window_left)
    if SPEC.CHUNK:
        chunk_first = _chunk_of(query, seqlen_q, seqlen_k, first_key, chunk)
        low = tl.maximum(low, chunk_first)
        high = tl.minimum(high, chunk_first + chunk - 1)
    return low[:, None], high[:, None]


@triton.jit
def _key_span(row_block, seqlen_q, seqlen_k, first_key, group_size, window_sides, num_splits, split,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPEC: tl.constexpr):
    """[start, stop) of the keys that split `split` of a row block visits: the keys any of its rows may see,
    from a multiple of BLOCK_N (a block never crosses a page: pages are multiples of BLOCK_N), cut into
    num_splits runs of whole blocks. window_sides: (causal_right, window_left, chunk) (see the kernel)."""
    causal_right, window_left, chunk = window_sides
    first_query = row_block * BLOCK_M // group_size
    last_query = tl.minimum((row_block * BLOCK_M + BLOCK_M - 1) // group_size, seqlen_q - 1)
    lo = first_key
    hi = seqlen_k
    if SPEC.CAUSAL:
        hi = tl.minimum(hi, seqlen_k - seqlen_q + last_query + causal_right + 1)
    if SPEC.WINDOW:
        lo = tl.maximum(lo, seqlen_k - seqlen_q + first_query - window_left)
    if SPEC.CHUNK:  # from the first query's chunk to the end of the last one's
        lo = tl.maximum(lo, _chunk_of(first_query, seqlen_q, seqlen_k, first_key, chunk))
        hi = tl.minimum(hi, _chunk_of(last_query, seqlen_q, seqlen_k, first_key, chunk) + chunk)
    lo = tl.maximum(lo, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits) * BLOCK_N
    start = tl.minimum(lo + split * per_split, hi)
    return start, tl.minimum(start + per_split, hi)


@triton.jit
def attention_decode_kernel(
        Q, K, V, O, LSE, BLOCK_TABLE, SEQLENS, LEFTPAD, CU_SEQLENS_Q, ALIBI, SINKS, DESCALE,
        q_strides, k_strides, v_strides, o_strides, lse_steps, split_steps, table_stride, alibi_strides, sizes,
        window_sides, score_scales,
        SPEC: tl.constexpr, LEFTPAD_KEYS: tl.constexpr, FINAL: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """One program: BLOCK_M (query, group head) rows of one (batch, kv head), over one split of the keys. It
    writes the rows' partial output and lse at O[split], LSE[split] (float32; lse -inf for a split that sees no
    key), or with FINAL (a single split) the result itself (out in O's dtype, lse +inf for no key, the sink with
    one). SPEC (attention_spec.Spec) reads HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, INPUT_PRECISION, CAUSAL,
    WINDOW, ALIBI, SOFTCAP, SINKS (the sinks join a split's softmax only with FINAL; else the merge adds them
    once), CHUNK and VARLEN (see _queries). Strides: q's (b, t, h, d), the pools' (page, slot, h, d), a split's
    output (b, t, h, d), lse_steps its lse (b, h, t), split_steps (output, lse) from one split to the next; sizes
    (Hkv, group size, Tq (the longest with VARLEN), page_size); window_sides flash-attn's (right, left) window
    sizes (causal: right = 0; -1 unbounded) and the chunk size; score_scales (softmax_scale * log2(e), softcap).
    Grid: (cdiv(Tq * group, BLOCK_M), B * Hkv, splits)."""
    num_kv_heads, group_size, seqlen_q, page_size = sizes
    row_block, split = tl.program_id(0), tl.program_id(2)
    batch = (tl.program_id(1) // num_kv_heads).to(tl.int64)
    kv_head = tl.program_id(1) % num_kv_heads
    query_batch, first_query, seqlen_q = _queries(CU_SEQLENS_Q, batch, seqlen_q, SPEC)
    Q += query_batch * q_strides[0] + first_query * q_strides[1]
    O += query_batch * o_strides[0] + first_query * o_strides[1]
    LSE += query_batch * lse_steps[0] + first_query * lse_steps[2]
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query = rows // group_size
    head = (kv_head * group_size + rows % group_size).to(tl.int64)
    offs_d, d_mask, offs_dv, dv_mask = head_columns(SPEC)
    row_mask = query < seqlen_q
    q_rows = Q + query * q_strides[1] + head * q_strides[2]
    q = _columns(q_rows, offs_d, q_strides[3], row_mask[:, None] & d_mask[None, :])
    if SPEC.BLOCK_D_TAIL:  # queries and keys wider than BLOCK_D: their columns past it (see Spec)
        BLOCK_D_TAIL: tl.constexpr = SPEC.BLOCK_D_TAIL  # a shape needs a constexpr, not a field's plain int
        offs_tail = SPEC.BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        tail_mask = offs_tail < SPEC.HEAD_DIM
        q_tail = _columns(q_rows, offs_tail, q_strides[3], row_mask[:, None] & tail_mask[None, :])
    seqlen_k = tl.load(SEQLENS + batch)
    first_key = 0
    if LEFTPAD_KEYS:
        first_key = tl.load(LEFTPAD + batch)
    slope = 0.0
    if SPEC.ALIBI:
        slope = tl.load(ALIBI + batch * alibi_strides[0] + head * alibi_strides[1])[:, None]
    start, stop = _key_span(row_block, seqlen_q, seqlen_k, first_key, group_size, window_sides, tl.num_programs(2),
                            split, BLOCK_M, BLOCK_N, SPEC)
    if SPEC.VARLEN:  # a row block past its sequence's queries (the grid is sized for the longest) visits no key
        stop = tl.where(row_block * BLOCK_M // group_size < seqlen_q, stop, start)
    low, high = _row_keys(query, seqlen_q, seqlen_k, first_key, window_sides, SPEC)
    K += kv_head * k_strides[2]
    V += kv_head * v_strides[2]
    qk_scale = score_scales[0]
    if SPEC.FP8:  # q . k = (q . k8) * k_descale: one factor on the scale, none per key (vLLM scales each tile)
        qk_scale *= tl.load(DESCALE + tl.program_id(1))
    BLOCK_DV: tl.constexpr = SPEC.BLOCK_DV  # a shape needs a constexpr, not a field's plain int
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    row_sum, row_max = softmax_start(SINKS, head, BLOCK_M, SPEC.SINKS and FINAL)
    diagonal = seqlen_k - seqlen_q  # query t's position is t + diagonal
    for start_n in range(start, stop, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        page = tl.load(BLOCK_TABLE + batch * table_stride + start_n // page_size).to(tl.int64)
        slots = start_n % page_size + tl.arange(0, BLOCK_N)
        in_cache = (keys < seqlen_k)[:, None]
        k_rows = K + page * k_strides[0] + slots * k_strides[1]
        k = _columns(k_rows, offs_d, k_strides[3], in_cache & d_mask[None, :]).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=SPEC.INPUT_PRECISION)
        if SPEC.BLOCK_D_TAIL:
            k_tail = _columns(k_rows, offs_tail, k_strides[3], in_cache & tail_mask[None, :]).to(q.dtype)
            qk = tl.dot(q_tail, tl.trans(k_tail), qk, input_precision=SPEC.INPUT_PRECISION)
        scores, scale, _ = tile_scores(qk, query[:, None], keys[None, :], seqlen_q, seqlen_k, Q, slope, diagonal,
                                       qk_scale, score_scales[1], MASK_KIND=0, ALIBI=SPEC.ALIBI,
                                       SOFTCAP=SPEC.SOFTCAP)
        visible = (keys < seqlen_k)[None, :] & (keys[None, :] >= low) & (keys[None, :] <= high)
        scores = tl.where(visible, scores, float("-inf"))
        p, correction, row_sum, row_max = online_softmax(scores, scale, row_sum, row_max)
        v = _columns(V + page * v_strides[0] + slots * v_strides[1], offs_dv, v_strides[3],
                     in_cache & dv_mask[None, :]).to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=SPEC.INPUT_PRECISION)
    if SPEC.FP8:  # the values' descale, on the sum (a partial's too: the merge is linear in them)
        acc *= tl.load(DESCALE + tl.num_programs(1) + tl.program_id(1))
    O += split * split_steps[0]
    _store_rows(acc, row_sum, row_max, O + query[:, None] * o_strides[1] + head[:, None] * o_strides[2]
                + offs_dv[None, :] * o_strides[3],
                LSE + split * split_steps[1] + head * lse_steps[1] + query * lse_steps[2],
                row_mask[:, None] & dv_mask[None, :], row_mask, FINAL)


@triton.jit
def _columns(row_starts, columns, column_stride, mask):
    """The (rows, columns) tile of a tensor whose rows start at row_starts (pointers, one per row), zeros where
    mask is False."""
    return tl.load(row_starts[:, None] + columns[None, :] * column_stride, mask=mask, other=0.0)


@triton.jit
def _queries(CU_SEQLENS_Q, batch, seqlen_q, SPEC: tl.constexpr):
    """(memory batch, first row, Tq) of sequence batch's queries. With VARLEN the sequences' queries are packed
    along Tq, q (1, total_q, Hq, D) and out and lse alike, sequence b's rows [CU_SEQLENS_Q[b], CU_SEQLENS_Q[b + 1])
    (flash_attn_varlen_func's layout, for paged prefill; one kernel for prefill and decoding over a paged cache, as
    vLLM's Triton unified attention); else its own batch of seqlen_q rows."""
    if SPEC.VARLEN:
        first = tl.load(CU_SEQLENS_Q + batch)
        return 0, first.to(tl.int64), tl.load(CU_SEQLENS_Q + batch + 1) - first
    else:
        return batch, 0, seqlen_q


@triton.jit
def _store_rows(acc, row_sum, row_max, out_tile, lse_rows, out_mask, row_mask, FINAL: tl.constexpr):
    """Normalises the rows' accumulator and stores it and their lse (natural log): for a row that saw no key, out
    0 and lse +inf with FINAL (as the attention forward gives it), -inf in a partial (weight 0 in the merge)."""
    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    lse = tl.where(empty, float("inf") if FINAL else float("-inf"), (row_max + tl.log2(row_sum)) / LOG2E)
    tl.store(out_tile, (acc / row_sum[:, None]).to(out_tile.dtype.element_ty), mask=out_mask)
    tl.store(lse_rows, lse, mask=row_mask)


@triton.jit
def attention_combine_kernel(O_PART, LSE_PART, O, LSE, SINKS, num_splits, rows, num_heads,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                             WITH_SINK: tl.constexpr):
    """Merges the splits of one (b, t, h) row: O_PART (splits, B, Tq, Hq, D) and LSE_PART (splits, B, Tq, Hq)
    float32, contiguous, into O (B, Tq, Hq, D) in its dtype and LSE (B, Tq, Hq) float32, contiguous (rows =
    B * Tq * Hq); WITH_SINK, head h's sink SINKS[h] joins the merge once, as a split of lse = the sink and no
    value. Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(LSE_PART + splits * rows + row, mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    sink = float("-inf")
    if WITH_SINK:
        sink = tl.load(SINKS + row % num_heads)
        top = tl.maximum(top, sink)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp2((lse - top) * LOG2E))
    total = tl.sum(weight, 0)
    if WITH_SINK:
        total += tl.exp2((sink - top) * LOG2E)
    parts = tl.load(O_PART + (splits[:, None] * rows + row) * HEAD_DIM + offs_d[None, :],
                    mask=(splits < num_splits)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, tl.where(total == 0.0, float("inf"), top + tl.log(tl.where(total == 0.0, 1.0, total))))


@triton.jit
def _append_row(NEW, CACHE, new_stride, cache_stride, scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                FP8: tl.constexpr):
    """Copies one row of HEAD_DIM values from NEW to CACHE; with FP8, x / scale rounded to float8 e4m3 (to nearest
    even, as torch's cast), saturating at +-448."""
    columns = tl.arange(0, BLOCK_D)
    row = tl.load(NEW + columns * new_stride, mask=columns < HEAD_DIM)
    if FP8:
        row = tl.clamp(row.to(tl.float32) * (1.0 / scale), -448.0, 448.0).to(tl.float8e4nv,
                                                                              fp_downcast_rounding="rtne")
    tl.store(CACHE + columns * cache_stride, row.to(CACHE.dtype.element_ty), mask=columns < HEAD_DIM)


@triton.jit
def cache_append_kernel(K, V, K_CACHE, V_CACHE, BLOCK_TABLE, SEQLENS, DESCALE, k_strides, v_strides, kc_strides,
                        vc_strides, table_stride, new_tokens, page_size, batch, HEAD_DIM: tl.constexpr,
                        HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, FP8: tl.constexpr):
    """Writes new keys and values into the cache (the module docstring's layouts): token t of sequence b, k and v
    (B, T_new, Hkv, D or Dv), goes to key position SEQLENS[b] + t, in page BLOCK_TABLE[b, position // page_size]
    at slot position % page_size. With FP8 the caches are float8 e4m3, each (sequence, kv head)'s values divided
    by its scale (DESCALE: float32 (2, B, Hkv), contiguous, keys' then values'; gptfast.fp8.to_fp8's rounding).
    Grid: (B * T_new, Hkv)."""
    b = tl.program_id(0) // new_tokens
    t = tl.program_id(0) % new_tokens
    head = tl.program_id(1)
    position = tl.load(SEQLENS + b) + t
    page = tl.load(BLOCK_TABLE + b * table_stride + position // page_size).to(tl.int64)
    slot = (position % page_size).to(tl.int64)
    k_scale, v_scale = 1.0, 1.0
    if FP8:
        k_scale = tl.load(DESCALE + b * tl.num_programs(1) + head)
        v_scale = tl.load(DESCALE + (batch + b) * tl.num_programs(1) + head)
    _append_row(K + b.to(tl.int64) * k_strides[0] + t * k_strides[1] + head * k_strides[2],
                K_CACHE + page * kc_strides[0] + slot * kc_strides[1] + head * kc_strides[2], k_strides[3],
                kc_strides[3], k_scale, HEAD_DIM, BLOCK_D, FP8)
    _append_row(V + b.to(tl.int64) * v_strides[0] + t * v_strides[1] + head * v_strides[2],
                V_CACHE + page * vc_strides[0] + slot * vc_strides[1] + head * vc_strides[2], v_strides[3],
                vc_strides[3], v_scale, HEAD_DIM_V, BLOCK_DV, FP8)


# ----------------------------------------------------------------------------------------------------------------
# Launchers. They trust their caller (gptfast.kvcache checks every argument).

# (BLOCK_N, num_warps, num_stages, padded head dims), for 16-bit and float32 inputs; every entry compiles without
# spills on every listed architecture at its largest query block (`gptfast inspect`): 64 rows (32 at head dim
# 256, 16 at 512, DeepSeek's 576 with its tail included) for 16-bit inputs, 16 for float32, whose full-precision
# dots hold far more registers (and which stop at 256: attention_core.kernel_gap).
TILES = {"16-bit": [(64, 4, 2, (16, 32, 64)), (128, 8, 2, (16, 32, 64)), (32, 4, 3, (16, 32, 64, 128, 256)),
                    (64, 8, 2, (128, 256)), (16, 4, 1, (512,)), (32, 4, 1, (512,)), (32, 8, 2, (512,))],
         "fp32": [(32, 8, 1, (16, 32, 64, 128)), (16, 8, 1, (16, 32, 64, 128, 256)), (16, 4, 1, (16, 32, 64, 128)),
                  (16, 16, 1, (256,))],
         "interpreter": [(16, 1, 1, (16, 32, 64, 128, 256, 512))]}


def tiles(table, fp8=False):
    """TILES[table]; for float8 caches, whose widening takes registers, with at most 2 stages and 64 keys a block:
    on sm_120 the every-feature tiles spilled with 3 stages at head dim 128 (56 bytes) and with 128 keys at 64 (16
    bytes) (`gptfast inspect --dtype fp8 --kernel decode`)."""
    if not fp8:
        return TILES[table]
    return list(dict.fromkeys((n, w, min(s, 2), d) for n, w, s, d in TILES[table] if n <= 64))


def query_block(rows, block_d, dtype):
    """Query rows per program for rows = Tq * group (query, head) pairs: 16 (tl.dot's least) up to the largest
    block TILES compile for."""
    largest = 16 if dtype == torch.float32 or block_d > 256 else 64 if block_d <= 128 else 32
    return max(16, min(largest, next_power_of_2(rows)))


@functools.cache
def _autotuner(table, block_d, page_size, bucket_k, fp8):
    """An autotuner over the tiles (see tiles) that serve block_d, with key blocks no longer than a page (a block
    must not cross one) nor the cache's length bucket; the smallest one if none fits."""
    interpreted = table == "interpreter"
    tiles_d = [t for t in tiles(table, fp8) if block_d in t[3]]
    fitting = [t for t in tiles_d if t[0] <= page_size and t[0] <= max(bucket_k, 16)] or [min(tiles_d)]
    cap = {} if interpreted else {"maxnreg": MAX_REGISTERS}
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s, **cap) for n, w, s, _ in fitting]
    return autotune(attention_decode_kernel, configs, key=["SPEC", "BLOCK_M", "LEFTPAD_KEYS", "FINAL"],
                    scope=(page_size, bucket_k))


def auto_splits(programs, capacity, device):
    """Splits per row block: enough programs to fill the GPU once (flash-decoding's aim), each with at least
    MIN_KEYS_PER_SPLIT keys of the cache's capacity, at most MAX_SPLITS. A rule on shapes only, so a CUDA graph
    captures a fixed grid."""
    wanted = cdiv(multiprocessors(device), programs)
    return max(1, min(wanted, cdiv(capacity, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def key_blocks(head_dim):
    """(BLOCK_D, BLOCK_D_TAIL) of the queries' and keys' head dim: one padded block up to MAX_BLOCK_D, past it
    (DeepSeek's absorbed MLA decoding: 576) a MAX_BLOCK_D block and the rest padded, not one block of 1024."""
    if head_dim <= MAX_BLOCK_D:
        return padded_head_dim(head_dim), 0
    return MAX_BLOCK_D, padded_head_dim(head_dim - MAX_BLOCK_D)


def decode_spec(q, v_cache, causal_right, window_left, softcap, alibi_slopes, sinks, chunk=0, varlen=False):
    """The attention_spec.Spec of a decoding call: its head dims, dots' precision and switches."""
    head_dim, head_dim_v = q.shape[3], v_cache.shape[3]
    block_d, tail = key_blocks(head_dim)
    return Spec(head_dim, block_d, head_dim_v, padded_head_dim(head_dim_v), input_precision(q.dtype),
                CAUSAL=causal_right >= 0, WINDOW=window_left >= 0, ALIBI=alibi_slopes is not None, SOFTCAP=softcap > 0,
                SINKS=sinks is not None, CHUNK=chunk > 0, VARLEN=varlen, BLOCK_D_TAIL=tail,
                FP8=v_cache.dtype == torch.float8_e4m3fn)


def append_to_cache(k, v, k_cache, v_cache, block_table, seqlens, descale=None):
    """Writes k (B, T_new, Hkv, D) and v (.., Dv) into the caches at key positions seqlens[b], seqlens[b] + 1, ...
    of each sequence (block_table, seqlens: the module docstring's), in place, in one launch; descale: None, or for
    float8 caches decode_attention's, each value divided by its scale as it is rounded."""
    batch, new_tokens, kv_heads = k.shape[:3]
    if batch * new_tokens == 0:
        return
    cache_append_kernel[(batch * new_tokens, kv_heads)](
        k, v, k_cache, v_cache, block_table, seqlens, descale, k.stride(), v.stride(), k_cache.stride(),
        v_cache.stride(), block_table.stride(0), new_tokens, k_cache.shape[1], batch, HEAD_DIM=k.shape[3],
        HEAD_DIM_V=v.shape[3], BLOCK_D=next_power_of_2(k.shape[3]), BLOCK_DV=next_power_of_2(v.shape[3]),
        FP8=descale is not None)


def decode_attention(q, k_cache, v_cache, block_table, seqlens, leftpad, softmax_scale, causal_right=-1,
                     window_left=-1, softcap=0.0, alibi_slopes=None, num_splits=0, sinks=None, chunk=0,
                     queries=None, descale=None):
    """Returns (out (B, Tq, Hq, Dv) in q's dtype, lse (B, Hq, Tq) float32) for the layouts of the module
    docstring. causal_right: -1 for no causal bound, else flash-attn's right window size (0 when causal);
    window_left: -1 or the left window size. alibi_slopes: None or float32 broadcastable to (B, Hq). num_splits:
    0 chooses (auto_splits); more than MAX_SPLITS is capped there. sinks: None or float32 (Hq,), contiguous.
    chunk: 0, or the chunk size (chunks counted from each sequence's first visible key). queries: None, or
    (cu_seqlens_q int32 (B + 1,), max_seqlen_q) for queries of B sequences packed along Tq (q (1, total_q, Hq, D);
    out and lse then (1, total_q, Hq, Dv) and (1, Hq, total_q)). descale: None, or for float8 e4m3 caches float32
    (2, B, Hkv), contiguous: what multiplies each (batch, kv head)'s stored keys, then values, back to their values."""
    _, seqlen_q, num_heads = q.shape[:3]
    batch = block_table.shape[0]
    cu_seqlens_q, rows_q = (None, seqlen_q) if queries is None else queries
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    spec = decode_spec(q, v_cache, causal_right, window_left, softcap, alibi_slopes, sinks, chunk, queries is not None)
    block_m = query_block(rows_q * group, spec.tile_dim, q.dtype)
    row_blocks = cdiv(rows_q * group, block_m)
    capacity = block_table.shape[1] * page_size
    splits = min(num_splits or auto_splits(row_blocks * batch * num_kv_heads, capacity, q.device), MAX_SPLITS)
    out = q.new_empty((*q.shape[:3], spec.HEAD_DIM_V))
    lse = torch.empty((q.shape[0], num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if splits == 1:
        out_part, lse_part = out[None], lse[None]
    else:
        out_part = torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, q.shape[0], seqlen_q, num_heads), dtype=torch.float32, device=q.device)
    slopes = alibi_slopes.expand(batch, num_heads) if alibi_slopes is not None else None
    lse_strides = lse_part.stride() if splits == 1 else lse_part.permute(0, 1, 3, 2).stride()  # (s, b, h, t)
    arch = device_arch(q.device)
    table = "interpreter" if arch == "interpreter" else "fp32" if q.dtype == torch.float32 else "16-bit"
    # Keyed on the largest power of two within a page: the configs differ only by which key blocks (powers of
    # two) fit in one, and a plain cache's page is its whole length, so the page itself made one autotuner, each
    # timing its configs, per cache length.
    kernel = _autotuner(table, spec.tile_dim, 1 << (page_size.bit_length() - 1), length_bucket(capacity), spec.FP8)
    kernel[(row_blocks, batch * num_kv_heads, splits)](
        Q=q, K=k_cache, V=v_cache, O=out_part, LSE=lse_part, BLOCK_TABLE=block_table, SEQLENS=seqlens,
        LEFTPAD=leftpad, CU_SEQLENS_Q=cu_seqlens_q, ALIBI=slopes, SINKS=sinks, DESCALE=descale,
        q_strides=q.stride(), k_strides=k_cache.stride(), v_strides=v_cache.stride(), o_strides=out_part.stride()[1:],
        lse_steps=lse_strides[1:], split_steps=(out_part.stride(0), lse_strides[0]), table_stride=block_table.stride(0),
        alibi_strides=slopes.stride() if slopes is not None else (0, 0),
        sizes=(num_kv_heads, group, rows_q, page_size), window_sides=(causal_right, window_left, chunk),
        score_scales=(softmax_scale * LOG2E.value, softcap), SPEC=spec, LEFTPAD_KEYS=leftpad is not None,
        FINAL=splits == 1, BLOCK_M=block_m)
    if splits > 1:
        lse_rows = torch.empty((q.shape[0], seqlen_q, num_heads), dtype=torch.float32, device=q.device)
        rows = q.shape[0] * seqlen_q * num_heads
        attention_combine_kernel[(rows,)](
            out_part, lse_part, out, lse_rows, sinks, splits, rows, num_heads,
            HEAD_DIM=spec.HEAD_DIM_V, BLOCK_D=spec.BLOCK_DV, BLOCK_S=next_power_of_2(splits),
            WITH_SINK=sinks is not None)
        lse = lse_rows.transpose(1, 2)
    return out, lse
