"""Fused flash-attention in Triton: forward and backward kernels and their launchers.

The algorithm is FlashAttention-2 (Dao, 2023, arXiv:2307.08691): the forward keeps a running max and sum per
query row (online softmax) so the (Tq, Tk) score matrix never reaches memory, and saves the log-sum-exp of each
row; the backward recomputes the probabilities from it. It runs either as one kernel that owns a block of keys
(dk, dv) and one that owns a block of queries (dq), so that no gradient needs an atomic add, or as the first
alone adding dq into a float32 buffer with atomics (ATOMIC_DQ; 5 matrix products per block pair instead of 7).
The loop structure follows Triton's fused-attention tutorial (split into blocks that need a mask and blocks that
don't); the forward may load K and V through tensor descriptors (TMA) and run on a persistent grid (PERSISTENT).
Which variant and tile a call runs is attention_tuning's business.

Layouts, for every tensor the launchers take:
    q: (B, Hq, Tq, D), k and v: (B, Hkv, Tk, D), any strides (views of a fused QKV projection work as they are).
    Hq is a multiple of Hkv (grouped-query attention); query head h reads key/value head h // (Hq // Hkv).
    D is a multiple of 8 from 8 to 256; blocks are padded to the next power of two and masked.
    out: (B, Hq, Tq, D) in q's dtype, stored as (B, Tq, Hq, D) memory; lse: (B, Hq, Tq) float32, natural log.

Bounds: key j is visible to query i when j <= i + causal_offset (CAUSAL) and j >= i + window_offset (WINDOW).
causal_offset is 0 for a top-left causal mask (torch's is_causal), Tk - Tq for a bottom-right one (a KV cache,
flash-attn), plus a window's right size; window_offset is the bottom-right diagonal minus the window's left size
(flash-attn 2's sliding window). Key blocks outside the bounds are never loaded. A query row that sees no key gets
output 0 and lse +inf, as in FlashAttention, so its backward terms vanish.

Every other feature is a tl.constexpr flag of the same kernels, compiled out when off: a boolean or additive mask
read through its strides (MASK_KIND; the additive one's gradient with BIAS_GRAD), ALiBi slopes, Gemma 2's logit
softcapping, and dropout on the attention weights from Philox numbers regenerated in the backward.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gptfast.kernels import device_arch, input_precision, multiprocessors, padded_head_dim
from gptfast.kernels.attention_tuning import (MAX_REGISTERS, autotuned, backward_choices, backward_loads,
                                               delta_block, fastest, forward_variants, has_features, length_bucket)
from gptfast.kernels.attention_blocks import (MASK_ADDITIVE, MASK_BOOLEAN, MASK_NONE, online_softmax, tile_scores,
                                              visible_pairs)
from gptfast.kernels.math import LOG2E

CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, causal_offset, window_offset, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Keys that the query rows [start_m, start_m + BLOCK_M) visit, as lo <= full_start <= full_end <= hi:
    [lo, full_start) need the window's mask, [full_start, full_end) no mask, [full_end, hi) the causal mask or
    the end of the sequence. Keys outside [lo, hi) are never loaded."""
    last_row = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1  # rows past Tq see nothing they need
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, last_row + 1 + causal_offset), 0)
        full_end = tl.maximum(tl.minimum(hi, start_m + causal_offset + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    if WINDOW:
        # The first key the block's first row sees, and the first its last row sees.
        lo = tl.minimum(tl.maximum(start_m + window_offset, 0), hi) // BLOCK_N * BLOCK_N
        full_start = tl.minimum(tl.cdiv(tl.maximum(last_row + window_offset, 0), BLOCK_N) * BLOCK_N, hi)
        full_end = tl.maximum(full_end, full_start)
    else:
        lo = 0
        full_start = 0
    return lo, full_start, full_end, hi


@triton.jit
def _query_range(start_n, seqlen_q, causal_offset, window_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query rows that see the keys [start_n, start_n + BLOCK_N), as lo <= full_start <= full_end <= hi:
    [lo, full_start) need the causal mask, [full_start, full_end) see every key of the block, [full_end, hi)
    need the window's mask. Rows outside [lo, hi) are never loaded."""
    if CAUSAL:
        # The first query that sees a key of the block, rounded down to its block; Tq when no query sees the
        # block (top-left mask, Tk > Tq), so every loop is empty and dk, dv are 0.
        lo = tl.minimum(tl.maximum(start_n - causal_offset, 0), seqlen_q)
        lo = tl.where(lo < seqlen_q, lo // BLOCK_M * BLOCK_M, lo)
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(full_start, seqlen_q)
    else:
        lo = 0
        full_start = 0
    if WINDOW:
        # Past the last row that sees the block's last key no row sees it; rows up to the last that sees its
        # first key see all of it.
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - window_offset, 0), seqlen_q)
        lo = tl.minimum(lo, hi)
        full_start = tl.minimum(full_start, hi)
        full_end = tl.maximum(tl.minimum(start_n - window_offset + 1, hi), 0) // BLOCK_M * BLOCK_M
        full_end = tl.maximum(full_end, full_start)
    else:
        hi = seqlen_q
        full_end = seqlen_q
    return lo, full_start, full_end, hi


@triton.jit
def _kept(seed, offset, head_index, rows, keys, dropout_p):
    """Dropout's keep mask of a tile (True with probability 1 - dropout_p). Philox 4x32 (Salmon et al., 2011; the
    generator of tl.rand) keyed by seed and counting (key, query, batch * Hq + head, offset), so the forward and
    both backward kernels draw the same number for each score and no (Tq, Tk) mask is ever stored."""
    c0 = (keys + rows * 0).to(tl.uint32)
    c1 = (rows + keys * 0).to(tl.uint32)
    c2 = c0 * 0 + head_index.to(tl.uint32)
    c3 = c0 * 0 + offset.to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _slope(ALIBI, batch, head, stride_ab, stride_ah, ALIBI_SLOPES: tl.constexpr):
    """A head's ALiBi slope; 0.0 without ALiBi."""
    slope = 0.0
    if ALIBI_SLOPES:
        slope = tl.load(ALIBI + batch * stride_ab + head * stride_ah)
    return slope


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    """(seed, offset) of the call's dropout, from the int64 pair SEED points at; (0, 0) without dropout."""
    seed = 0
    offset = 0
    if DROPOUT:
        seed = tl.load(SEED)
        offset = tl.load(SEED + 1)
    return seed, offset


@triton.jit
def _tile(base, rows, offs_d, stride_t, stride_d):
    """Pointers to the (rows, head dim) tile of one head's (T, D) matrix."""
    return base + rows[:, None] * stride_t + offs_d[None, :] * stride_d


@triton.jit
def _query_program(query_block, batch_head, num_heads, group_size, BLOCK_M: tl.constexpr):
    """(first query row, batch, head, kv head) of the tile of query block query_block and (batch, head) index
    batch_head (batch * Hq + head), indices in int64 since B * H * T * D can pass 2**31 elements."""
    batch = batch_head // num_heads
    head = batch_head % num_heads
    return query_block * BLOCK_M, batch.to(tl.int64), head.to(tl.int64), (head // group_size).to(tl.int64)


@triton.jit
def _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, batch, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset,
              VARLEN: tl.constexpr):
    """(memory batch, first query row, first key row, Tq, Tk, causal_offset, window_offset, alibi_offset) of
    sequence `batch`. With VARLEN the tensors hold the sequences packed along T ((1, H, total, D), as flash-attn's
    varlen functions take them): the sequence's rows are [CU_SEQLENS[batch], CU_SEQLENS[batch + 1]), its memory
    batch is 0, and the launcher's offsets, given for Tq = Tk, gain the sequence's own Tk - Tq (every varlen mask
    is bottom-right aligned). Else the batch's own tensors, rows from 0, offsets as given."""
    if VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + batch)
        k_start = tl.load(CU_SEQLENS_K + batch)
        seqlen_q = tl.load(CU_SEQLENS_Q + batch + 1) - q_start
        seqlen_k = tl.load(CU_SEQLENS_K + batch + 1) - k_start
        shift = seqlen_k - seqlen_q
        return (0, q_start, k_start, seqlen_q, seqlen_k, causal_offset + shift, window_offset + shift,
                alibi_offset + shift)
    else:
        return batch, 0, 0, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset


@triton.jit
def _rows(source, start, stride_t, mask, TMA: tl.constexpr):
    """The block of rows [start, start + block) of a (T, D) matrix, zero past its ends: from a tensor descriptor
    with TMA (Hopper's tensor memory accelerator copies the tile and fills what lies outside the matrix with
    zeros), else through the block's pointers at row 0 and mask."""
    if TMA:
        rows = source.load([start, 0])
    else:
        rows = tl.load(source + start * stride_t, mask=mask, other=0.0)
    return rows


@triton.jit
def _row_source(base, seqlen, stride_t, stride_d, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """What _rows reads blocks of BLOCK_T rows from, for one head's (T, D) matrix at base: a tensor descriptor
    with TMA, else the pointers of its first block."""
    if TMA:
        source = tl.make_tensor_descriptor(base, [seqlen, HEAD_DIM], [stride_t, 1], [BLOCK_T, BLOCK_D])
    else:
        source = _tile(base, tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D), stride_t, stride_d)
    return source


@triton.jit
def _forward_block_loop(acc, row_sum, row_max, q, k_source, v_source, stride_kt, stride_vt, offs_m, d_mask,
                        seqlen_q, seqlen_k, causal_offset, window_offset, qk_scale, start, stop,
                        MASK, stride_mt, stride_ms, slope, alibi_offset, softcap,
                        seed, seed_offset, head_index, dropout_p, keep_scale,
                        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                        MASK_KIND: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                        DROPOUT: tl.constexpr, TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [start, stop): rescales the running (acc, row_sum, row_max). k_source
    and v_source are the first key block's pointers, or with TMA tensor descriptors (see _rows)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        key_rows = start_n + offs_n
        kv_mask = d_mask[None, :]
        if MASKED:
            kv_mask = kv_mask & (key_rows[:, None] < seqlen_k)
        k = _rows(k_source, start_n, stride_kt, kv_mask, TMA=TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        scores, scale, _ = tile_scores(qk, offs_m[:, None], key_rows[None, :], seqlen_q, seqlen_k,
                                       MASK + offs_m[:, None] * stride_mt + key_rows[None, :] * stride_ms, slope,
                                       alibi_offset, qk_scale, softcap, MASK_KIND=MASK_KIND, ALIBI=ALIBI,
                                       SOFTCAP=SOFTCAP)
        if MASKED:
            visible = visible_pairs(offs_m[:, None], key_rows[None, :], seqlen_k, causal_offset, window_offset,
                                    CAUSAL=CAUSAL, WINDOW=WINDOW)
            scores = tl.where(visible, scores, float("-inf"))
        p, correction, row_sum, new_max = online_softmax(scores, scale, row_sum, row_max)
        if DROPOUT:  # the softmax sums every weight; the output keeps some, scaled by 1 / (1 - dropout_p)
            p = tl.where(_kept(seed, seed_offset, head_index, offs_m[:, None], key_rows[None, :], dropout_p),
                         p * keep_scale, 0.0)
        # v is loaded only now, so it is not live in registers during the softmax (the dq loop below loads it
        # with k instead: each order is the one that compiles without spills, per `gptfast inspect`).
        v = _rows(v_source, start_n, stride_vt, kv_mask, TMA=TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=INPUT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def attention_forward_kernel(
        Q, K, V, O, LSE, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_mb, stride_mh, stride_mt, stride_ms, stride_ab, stride_ah,
        batch_heads, num_heads, group_size, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset,
        qk_scale, softcap, dropout_p, keep_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, ALIBI_SLOPES: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr, PERSISTENT: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head), batch_heads = B * Hq of them (with VARLEN a batch is
    a sequence of the packed tensors, see _sequence, and seqlen_q, seqlen_k are the totals). qk_scale is
    softmax_scale * log2(e), so the softmax runs on exp2. MASK, ALIBI and SEED are read only when their flags say
    so. Two tuning choices on Hopper and newer: TMA loads K and V through tensor descriptors (their rows' strides
    must be 16-byte multiples, their last dim contiguous); PERSISTENT runs about one program per multiprocessor,
    each looping over (query block, head) tiles, the longest causal tiles (the last query blocks) first, so that
    no program starts late on a long tile (a persistent schedule, as in FlashAttention-3 and Triton's persistent
    matmul tutorial). Grid: (cdiv(Tq, BLOCK_M), B * Hq), or (programs,) when PERSISTENT."""
    if PERSISTENT:
        first, tiles, step = tl.program_id(0), tl.cdiv(seqlen_q, BLOCK_M) * batch_heads, tl.num_programs(0)
    else:  # one iteration, which the compiler folds away
        first, tiles, step = 0, 1, 1
    for tile in tl.range(first, tiles, step):
        if PERSISTENT:
            query_block = tl.cdiv(seqlen_q, BLOCK_M) - 1 - tile // batch_heads
            batch_head = tile % batch_heads
        else:  # causal rows near the end see the most keys: those programs start first (FlashAttention-2, 3.3)
            query_block = tl.num_programs(0) - 1 - tl.program_id(0)
            batch_head = tl.program_id(1)
        _forward_tile(
            query_block, batch_head, Q, K, V, O, LSE, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
            stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
            stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
            stride_mb, stride_mh, stride_mt, stride_ms, stride_ab, stride_ah, num_heads, group_size, seqlen_q,
            seqlen_k, causal_offset, window_offset, alibi_offset, qk_scale, softcap, dropout_p, keep_scale,
            HEAD_DIM, BLOCK_D, CAUSAL, WINDOW, MASK_KIND, ALIBI_SLOPES, SOFTCAP, DROPOUT, INPUT_PRECISION,
            VARLEN, BLOCK_M, BLOCK_N, TMA)


@triton.jit
def _forward_tile(
        query_block, batch_head, Q, K, V, O, LSE, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
        stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
        stride_mb, stride_mh, stride_mt, stride_ms, stride_ab, stride_ah, num_heads, group_size, seqlen_q,
        seqlen_k, causal_offset, window_offset, alibi_offset, qk_scale, softcap, dropout_p, keep_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, ALIBI_SLOPES: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr):
    """The forward of one tile: query rows [query_block * BLOCK_M, + BLOCK_M) of (batch, head) = batch_head."""
    start_m, batch, head, kv_head = _query_program(query_block, batch_head, num_heads, group_size, BLOCK_M)
    total_q = seqlen_q
    memory_batch, q_start, k_start, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset = _sequence(
        CU_SEQLENS_Q, CU_SEQLENS_K, batch, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset, VARLEN)
    if VARLEN:  # a block past its sequence's end (the grid is sized for the longest) visits no key
        seqlen_k = tl.where(start_m < seqlen_q, seqlen_k, 0)
    Q += memory_batch * stride_qb + head * stride_qh + q_start * stride_qt
    K += memory_batch * stride_kb + kv_head * stride_kh + k_start * stride_kt
    V += memory_batch * stride_vb + kv_head * stride_vh + k_start * stride_vt
    O += memory_batch * stride_ob + head * stride_oh + q_start * stride_ot
    MASK += batch * stride_mb + head * stride_mh
    LSE += (memory_batch * num_heads + head) * total_q + q_start
    slope = _slope(ALIBI, batch, head, stride_ab, stride_ah, ALIBI_SLOPES=ALIBI_SLOPES)
    seed, seed_offset = _dropout_seed(SEED, DROPOUT=DROPOUT)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < seqlen_q) & d_mask[None, :]
    q = tl.load(_tile(Q, offs_m, offs_d, stride_qt, stride_qd), mask=q_mask, other=0.0)
    k_source = _row_source(K, seqlen_k, stride_kt, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, TMA=TMA)
    v_source = _row_source(V, seqlen_k, stride_vt, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, TMA=TMA)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, full_start, full_end, hi = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, window_offset,
                                              BLOCK_M, BLOCK_N, CAUSAL=CAUSAL, WINDOW=WINDOW)
    # Key blocks in three runs: masked by the window, unmasked, masked by the diagonal or the end of the keys.
    for run in tl.static_range(3):
        if run != 0 or WINDOW:
            acc, row_sum, row_max = _forward_block_loop(
                acc, row_sum, row_max, q, k_source, v_source, stride_kt, stride_vt, offs_m, d_mask, seqlen_q,
                seqlen_k, causal_offset, window_offset, qk_scale, (lo, full_start, full_end)[run],
                (full_start, full_end, hi)[run], MASK, stride_mt, stride_ms, slope, alibi_offset, softcap, seed,
                seed_offset, batch_head, dropout_p, keep_scale, BLOCK_N, MASKED=run != 1, CAUSAL=CAUSAL,
                WINDOW=WINDOW, MASK_KIND=MASK_KIND, ALIBI=ALIBI_SLOPES, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, TMA=TMA,
                INPUT_PRECISION=INPUT_PRECISION)

    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    out = acc / row_sum[:, None]
    lse = tl.where(empty, float("inf"), (row_max + tl.log2(row_sum)) / LOG2E)
    tl.store(LSE + offs_m, lse, mask=offs_m < seqlen_q)
    tl.store(_tile(O, offs_m, offs_d, stride_ot, stride_od), out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def attention_backward_delta_kernel(
        O, DO, GRAD_LSE, DELTA,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_dob, stride_doh, stride_dot, stride_dod,
        num_heads, seqlen_q,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse, float32 (B, Hq, Tq): the softmax-backward term shared by dk and dq
    (dscores = p * (dp - delta); the lse output's own gradient dlse enters here since d lse / d scores = p).
    With dropout O is the dropped output, and rowsum(dO * O) still equals sum_j p_ij dp_ij. Grid:
    (cdiv(Tq, BLOCK_M), B * Hq)."""
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    O += batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    DO += batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    GRAD_LSE += tl.program_id(1).to(tl.int64) * seqlen_q
    DELTA += tl.program_id(1).to(tl.int64) * seqlen_q
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(_tile(O, offs_m, offs_d, stride_ot, stride_od), mask=mask, other=0.0)
    do = tl.load(_tile(DO, offs_m, offs_d, stride_dot, stride_dod), mask=mask, other=0.0)
    grad_lse = tl.load(GRAD_LSE + offs_m, mask=offs_m < seqlen_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - grad_lse
    tl.store(DELTA + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _score_grads(p, dp, delta, tanh, keep, keep_scale, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """(dlogits, dscores) of a tile from its weights p and dp = dO . v: the gradient reaching the logits (what an
    additive mask receives) and the one reaching the scaled dot products, through the softcap's tanh. Tiles
    come in either orientation."""
    if DROPOUT:
        dp = tl.where(keep, dp * keep_scale, 0.0)
    dlogits = p * (dp - delta)
    dscores = dlogits
    if SOFTCAP:
        dscores = dlogits * (1.0 - tanh * tanh)
    return dlogits, dscores


@triton.jit
def _query_rows(source, start_m, offs_m, offs_d, stride_t, stride_d, mask, TMA: tl.constexpr):
    """The query rows offs_m (from start_m) of one head's q or dO: through a tensor descriptor with TMA, else from
    the head's base pointer, the tile's pointers made here (the dk/dv loop keeps nothing of a block's size live
    across iterations: its pointer tiles spill there, `gptfast inspect`)."""
    if TMA:
        rows = source.load([start_m, 0])
    else:
        rows = tl.load(_tile(source, offs_m, offs_d, stride_t, stride_d), mask=mask, other=0.0)
    return rows


@triton.jit
def _dkdv_block_loop(dk, dv, k, v, q_source, do_source, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                     key_rows,
                     offs_d, d_mask, seqlen_q, seqlen_k, causal_offset, window_offset, qk_scale, start, stop,
                     MASK, stride_mt, stride_ms, slope, alibi_offset, softcap,
                     seed, seed_offset, head_index, dropout_p, keep_scale, DQ_ACC, stride_ct, stride_cd,
                     softmax_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                     DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """Adds to dk, dv (BLOCK_N, BLOCK_D) the terms of the query rows [start, stop) of one head, whose q and dO
    come from q_source and do_source (see _query_rows); with ATOMIC_DQ also adds this key block's share of dq to
    DQ_ACC with atomics. Works on the transposed tile (keys x queries) so that both products take their operands
    as loaded. Query rows past Tq load as zeros with lse +inf, so they add nothing; key rows past Tk are never
    stored."""
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < seqlen_q
        q_mask = row_mask[:, None] & d_mask[None, :]
        q = _query_rows(q_source, start_m, offs_m, offs_d, stride_qt, stride_qd, q_mask, TMA=TMA)
        lse = tl.load(LSE + offs_m, mask=row_mask, other=float("inf")) * LOG2E
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
        scores_t, scale, tanh_t = tile_scores(qk_t, offs_m[None, :], key_rows[:, None], seqlen_q, seqlen_k,
                                              MASK + offs_m[None, :] * stride_mt + key_rows[:, None] * stride_ms, slope,
                                              alibi_offset, qk_scale, softcap, MASK_KIND=MASK_KIND, ALIBI=ALIBI,
                                              SOFTCAP=SOFTCAP)
        p_t = tl.exp2(scores_t * scale - lse[None, :])
        if MASKED:
            p_t = tl.where(visible_pairs(offs_m[None, :], key_rows[:, None], seqlen_k, causal_offset, window_offset,
                                         CAUSAL=CAUSAL, WINDOW=WINDOW), p_t, 0.0)
        do = _query_rows(do_source, start_m, offs_m, offs_d, stride_dot, stride_dod, q_mask, TMA=TMA)
        keep_t = p_t > 0.0  # a placeholder unless DROPOUT
        dropped_p_t = p_t
        if DROPOUT:
            keep_t = _kept(seed, seed_offset, head_index, offs_m[None, :], key_rows[:, None], dropout_p)
            dropped_p_t = tl.where(keep_t, p_t * keep_scale, 0.0)
        dv = tl.dot(dropped_p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        _, ds_t = _score_grads(p_t, dp_t, delta[None, :], tanh_t, keep_t, keep_scale, SOFTCAP=SOFTCAP,
                               DROPOUT=DROPOUT)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
        if ATOMIC_DQ:  # FlashAttention-2's backward: the 5th product, dq = dS k, summed over key blocks in float32
            dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=INPUT_PRECISION) * softmax_scale
            tl.atomic_add(_tile(DQ_ACC, offs_m, offs_d, stride_ct, stride_cd), dq, mask=q_mask, sem="relaxed")
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, DQ_ACC,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dkt, stride_dkd,
        stride_dvb, stride_dvh, stride_dvt, stride_dvd,
        stride_mb, stride_mh, stride_mt, stride_ms, stride_ab, stride_ah,
        stride_cb, stride_ch, stride_ct, stride_cd,
        num_kv_heads, group_size, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset, qk_scale,
        softmax_scale, softcap, dropout_p, keep_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, ALIBI_SLOPES: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head); loops over every query head of its group, so a grouped
    K/V head's gradient is summed in registers. With ATOMIC_DQ (the single-pass backward) it also adds dq, already
    scaled, into DQ_ACC (B, Hq, Tq, D) float32, zero-initialised, with atomics: 5 matrix products per (query
    block, key block) pair instead of the two-kernel backward's 7, at the price of an order of float32 additions
    that changes from run to run. TMA (a tuning choice on Hopper and newer) loads q and dO through tensor
    descriptors. VARLEN as in the forward. Grid: (cdiv(Tk, BLOCK_N), B * Hkv)."""
    start_n = tl.program_id(0) * BLOCK_N
    batch = (tl.program_id(1) // num_kv_heads).to(tl.int64)
    kv_head = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    total_q = seqlen_q
    memory_batch, q_start, k_start, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset = _sequence(
        CU_SEQLENS_Q, CU_SEQLENS_K, batch, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset, VARLEN)
    K += memory_batch * stride_kb + kv_head * stride_kh + k_start * stride_kt
    V += memory_batch * stride_vb + kv_head * stride_vh + k_start * stride_vt
    DK += memory_batch * stride_dkb + kv_head * stride_dkh + k_start * stride_dkt
    DV += memory_batch * stride_dvb + kv_head * stride_dvh + k_start * stride_dvt
    seed, seed_offset = _dropout_seed(SEED, DROPOUT=DROPOUT)

    key_rows = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (key_rows[:, None] < seqlen_k) & d_mask[None, :]
    k = tl.load(_tile(K, key_rows, offs_d, stride_kt, stride_kd), mask=kv_mask, other=0.0)
    v = tl.load(_tile(V, key_rows, offs_d, stride_vt, stride_vd), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # A key block past its sequence's end (VARLEN: the grid is sized for the longest) visits no query.
    visited_q = seqlen_q
    if VARLEN:
        visited_q = tl.where(start_n < seqlen_k, seqlen_q, 0)
    lo, full_start, full_end, hi = _query_range(start_n, visited_q, causal_offset, window_offset, BLOCK_M, BLOCK_N,
                                                CAUSAL=CAUSAL, WINDOW=WINDOW)
    # Pointers to the group's first query head; each pass of the loop moves them one head on.
    num_heads = num_kv_heads * group_size
    head = kv_head * group_size
    Q += memory_batch * stride_qb + head * stride_qh + q_start * stride_qt
    DO += memory_batch * stride_dob + head * stride_doh + q_start * stride_dot
    MASK += batch * stride_mb + head * stride_mh
    DQ_ACC += memory_batch * stride_cb + head * stride_ch + q_start * stride_ct
    LSE += (memory_batch * num_heads + head) * total_q + q_start
    DELTA += (memory_batch * num_heads + head) * total_q + q_start
    for _ in range(group_size):
        slope = _slope(ALIBI, batch, head, stride_ab, stride_ah, ALIBI_SLOPES=ALIBI_SLOPES)
        head_index = batch * num_heads + head
        q_source = Q
        do_source = DO
        if TMA:
            q_source = tl.make_tensor_descriptor(Q, [seqlen_q, HEAD_DIM], [stride_qt, 1], [BLOCK_M, BLOCK_D])
            do_source = tl.make_tensor_descriptor(DO, [seqlen_q, HEAD_DIM], [stride_dot, 1], [BLOCK_M, BLOCK_D])
        # Query rows in three runs: masked by the diagonal, unmasked, masked by the window.
        for run in tl.static_range(3):
            if run != 2 or WINDOW:
                dk, dv = _dkdv_block_loop(
                    dk, dv, k, v, q_source, do_source, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                    key_rows,
                    offs_d, d_mask, seqlen_q, seqlen_k, causal_offset, window_offset, qk_scale,
                    (lo, full_start, full_end)[run], (full_start, full_end, hi)[run], MASK, stride_mt, stride_ms,
                    slope, alibi_offset, softcap, seed, seed_offset, head_index, dropout_p, keep_scale, DQ_ACC,
                    stride_ct, stride_cd, softmax_scale, BLOCK_M, MASKED=run != 1, CAUSAL=CAUSAL, WINDOW=WINDOW,
                    MASK_KIND=MASK_KIND, ALIBI=ALIBI_SLOPES, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, ATOMIC_DQ=ATOMIC_DQ,
                    TMA=TMA, INPUT_PRECISION=INPUT_PRECISION)
        Q += stride_qh
        DO += stride_doh
        MASK += stride_mh
        DQ_ACC += stride_ch
        LSE += total_q
        DELTA += total_q
        head += 1
    tl.store(_tile(DK, key_rows, offs_d, stride_dkt, stride_dkd),
             (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile(DV, key_rows, offs_d, stride_dvt, stride_dvd), dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _dq_block_loop(dq, q, do, lse, delta, k_source, v_source, stride_kt, stride_vt, offs_m, d_mask, seqlen_q,
                   seqlen_k, causal_offset, window_offset, qk_scale, start, stop,
                   MASK, stride_mt, stride_ms, slope, alibi_offset, softcap,
                   seed, seed_offset, head_index, dropout_p, keep_scale, DBIAS, stride_gt, stride_gs,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   MASK_KIND: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                   BIAS_GRAD: tl.constexpr, TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Adds to dq (BLOCK_M, BLOCK_D) the terms of the key blocks [start, stop), whose k and v come from k_source
    and v_source (see _rows); with BIAS_GRAD also stores the logits' gradient of those blocks to DBIAS."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        key_rows = start_n + offs_n
        kv_mask = d_mask[None, :]
        if MASKED:
            kv_mask = kv_mask & (key_rows[:, None] < seqlen_k)
        k = _rows(k_source, start_n, stride_kt, kv_mask, TMA=TMA)
        v = _rows(v_source, start_n, stride_vt, kv_mask, TMA=TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        scores, scale, tanh = tile_scores(qk, offs_m[:, None], key_rows[None, :], seqlen_q, seqlen_k,
                                          MASK + offs_m[:, None] * stride_mt + key_rows[None, :] * stride_ms, slope,
                                          alibi_offset, qk_scale, softcap, MASK_KIND=MASK_KIND, ALIBI=ALIBI,
                                          SOFTCAP=SOFTCAP)
        p = tl.exp2(scores * scale - lse[:, None])
        if MASKED:
            p = tl.where(visible_pairs(offs_m[:, None], key_rows[None, :], seqlen_k, causal_offset, window_offset,
                                       CAUSAL=CAUSAL, WINDOW=WINDOW), p, 0.0)
        keep = p > 0.0  # a placeholder unless DROPOUT
        if DROPOUT:
            keep = _kept(seed, seed_offset, head_index, offs_m[:, None], key_rows[None, :], dropout_p)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        dlogits, ds = _score_grads(p, dp, delta[:, None], tanh, keep, keep_scale, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT)
        if BIAS_GRAD:
            tl.store(DBIAS + offs_m[:, None] * stride_gt + key_rows[None, :] * stride_gs, dlogits,
                     mask=(offs_m[:, None] < seqlen_q) & (key_rows[None, :] < seqlen_k))
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, DBIAS,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        stride_mb, stride_mh, stride_mt, stride_ms, stride_ab, stride_ah,
        stride_gb, stride_gh, stride_gt, stride_gs,
        num_heads, group_size, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset, qk_scale,
        softmax_scale, softcap, dropout_p, keep_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, ALIBI_SLOPES: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
        BIAS_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). With BIAS_GRAD it also writes the gradient of an
    additive mask, DBIAS (B, Hq, Tq, Tk) float32, zero-initialised (blocks never visited stay 0). TMA (a tuning
    choice on Hopper and newer) loads k and v through tensor descriptors. VARLEN as in the forward. Grid:
    (cdiv(Tq, BLOCK_M), B * Hq)."""
    # causal rows near the end see the most keys: those programs start first (FlashAttention-2, 3.3)
    start_m, batch, head, kv_head = _query_program(tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1),
                                                   num_heads, group_size, BLOCK_M)
    total_q = seqlen_q
    memory_batch, q_start, k_start, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset = _sequence(
        CU_SEQLENS_Q, CU_SEQLENS_K, batch, seqlen_q, seqlen_k, causal_offset, window_offset, alibi_offset, VARLEN)
    if VARLEN:  # as in the forward
        seqlen_k = tl.where(start_m < seqlen_q, seqlen_k, 0)
    Q += memory_batch * stride_qb + head * stride_qh + q_start * stride_qt
    K += memory_batch * stride_kb + kv_head * stride_kh + k_start * stride_kt
    V += memory_batch * stride_vb + kv_head * stride_vh + k_start * stride_vt
    DO += memory_batch * stride_dob + head * stride_doh + q_start * stride_dot
    DQ += memory_batch * stride_dqb + head * stride_dqh + q_start * stride_dqt
    MASK += batch * stride_mb + head * stride_mh
    DBIAS += batch * stride_gb + head * stride_gh
    LSE += (memory_batch * num_heads + head) * total_q + q_start
    DELTA += (memory_batch * num_heads + head) * total_q + q_start
    slope = _slope(ALIBI, batch, head, stride_ab, stride_ah, ALIBI_SLOPES=ALIBI_SLOPES)
    seed, seed_offset = _dropout_seed(SEED, DROPOUT=DROPOUT)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < seqlen_q
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(_tile(Q, offs_m, offs_d, stride_qt, stride_qd), mask=q_mask, other=0.0)
    do = tl.load(_tile(DO, offs_m, offs_d, stride_dot, stride_dod), mask=q_mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
    k_source = _row_source(K, seqlen_k, stride_kt, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, TMA=TMA)
    v_source = _row_source(V, seqlen_k, stride_vt, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, TMA=TMA)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_start, full_end, hi = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, window_offset,
                                              BLOCK_M, BLOCK_N, CAUSAL=CAUSAL, WINDOW=WINDOW)
    # Key blocks in three runs: masked by the window, unmasked, masked by the diagonal or the end of the keys.
    for run in tl.static_range(3):
        if run != 0 or WINDOW:
            dq = _dq_block_loop(
                dq, q, do, lse, delta, k_source, v_source, stride_kt, stride_vt, offs_m, d_mask, seqlen_q, seqlen_k,
                causal_offset, window_offset, qk_scale, (lo, full_start, full_end)[run],
                (full_start, full_end, hi)[run], MASK, stride_mt, stride_ms, slope, alibi_offset, softcap, seed,
                seed_offset, tl.program_id(1), dropout_p, keep_scale, DBIAS, stride_gt, stride_gs, BLOCK_N,
                MASKED=run != 1, CAUSAL=CAUSAL, WINDOW=WINDOW, MASK_KIND=MASK_KIND, ALIBI=ALIBI_SLOPES,
                SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, BIAS_GRAD=BIAS_GRAD, TMA=TMA, INPUT_PRECISION=INPUT_PRECISION)
    tl.store(_tile(DQ, offs_m, offs_d, stride_dqt, stride_dqd),
             (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def dropout_keep_kernel(SEED, KEEP, num_heads, seqlen_q, seqlen_k, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask the attention kernels draw, written out whole: KEEP (B, Hq, Tq, Tk) bool, contiguous. For
    tests and flash_attn_func(return_attn_probs=True) only. Grid: (cdiv(Tq, BLOCK_M), cdiv(Tk, BLOCK_N), B * Hq)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    head_index = tl.program_id(2).to(tl.int64)
    kept = _kept(tl.load(SEED), tl.load(SEED + 1), head_index, rows[:, None], keys[None, :], dropout_p)
    KEEP += head_index * seqlen_q * seqlen_k
    tl.store(KEEP + rows[:, None] * seqlen_k + keys[None, :], kept,
             mask=(rows[:, None] < seqlen_q) & (keys[None, :] < seqlen_k))


# ----------------------------------------------------------------------------------------------------------------
# Launchers. They trust their caller (gptfast.attention checks every argument once, at the edge).

def _strides(t):
    return (t.stride(0), t.stride(1), t.stride(2), t.stride(3))


def empty_bthd(b, h, t, d, like):
    """A (B, H, T, D) tensor stored as (B, T, H, D) memory: the layout flash-attn returns, so that merging heads
    afterwards (transpose(1, 2).reshape) is free."""
    return torch.empty((b, t, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


class Features(NamedTuple):
    """What a call adds to plain softmax attention. causal: CAUSAL_NONE, CAUSAL_TOP_LEFT (torch's is_causal) or
    CAUSAL_BOTTOM_RIGHT (flash-attn's). window: flash-attn's (left, right), -1 unbounded, bottom-right aligned;
    causal sets right to 0. mask: None, or bool (False hides) or additive, 4-dim and broadcastable to
    (B, Hq, Tq, Tk), any strides (a broadcast dim is read with stride 0). alibi_slopes: None or float32
    broadcastable to (B, Hq). seed_offset: int64 (2,) on the device, the dropout's Philox seed and offset (None
    without dropout). deterministic: the backward must be bit-reproducible (no atomics). varlen: None, or
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for sequences packed along T: q (1, Hq, total_q, D),
    k and v (1, Hkv, total_k, D), int32 cumulative lengths (num_seqs + 1,), causal bottom-right per sequence, no
    mask; out and lse keep the packed layout, and the dropout draws as for a (num_seqs, Hq, max_seqlen_q,
    max_seqlen_k) batch."""
    causal: int = CAUSAL_NONE
    window: tuple = (-1, -1)
    mask: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed_offset: torch.Tensor | None = None
    deterministic: bool = False
    varlen: tuple | None = None


def launch_shape(q, k, features):
    """(batch, Tq, Tk) that grids and tuning buckets count: the sequences and their longest lengths with varlen."""
    if features.varlen is not None:
        cu_seqlens_q, _, max_seqlen_q, max_seqlen_k = features.varlen
        return cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    return q.shape[0], q.shape[2], k.shape[2]


def _feature_args(q, seqlen_k, features, softmax_scale):
    """(pointers, strides, scalars, constexprs) that the three kernels take for the features, in their order:
    MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K; the mask's four strides and the slopes' two; causal_offset ...
    keep_scale after the kernel's own scalars. Absent tensors are passed as q: the flags keep the kernels from
    reading them."""
    _, num_heads, seqlen_q, head_dim = q.shape
    batch = launch_shape(q, q, features)[0]
    left, right = features.window
    # Bottom-right offsets count Tk - Tq; with varlen the kernels add each sequence's own.
    offset = 0 if features.causal == CAUSAL_TOP_LEFT or features.varlen else seqlen_k - seqlen_q
    if features.causal != CAUSAL_NONE:
        right = 0
    mask, slopes, seed = features.mask, features.alibi_slopes, features.seed_offset
    if mask is not None:  # views: a broadcast dim gets stride 0
        mask = mask.expand(batch, num_heads, seqlen_q, seqlen_k)
    if slopes is not None:
        slopes = slopes.expand(batch, num_heads)
    mask_kind = (MASK_NONE if mask is None else MASK_BOOLEAN if mask.dtype == torch.bool else MASK_ADDITIVE).value
    cu_seqlens = features.varlen[:2] if features.varlen else (q, q)
    pointers = (q if mask is None else mask, q if slopes is None else slopes, q if seed is None else seed,
                *cu_seqlens)
    strides = (*(_strides(mask) if mask is not None else (0, 0, 0, 0)),
               *(slopes.stride() if slopes is not None else (0, 0)))
    scalars = dict(causal_offset=offset + max(right, 0), window_offset=offset - max(left, 0),
                   alibi_offset=0 if features.varlen else seqlen_k - seqlen_q, qk_scale=softmax_scale * LOG2E.value,
                   softcap=features.softcap, dropout_p=features.dropout_p,
                   keep_scale=1.0 / (1.0 - features.dropout_p))
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), CAUSAL=right >= 0,
                      WINDOW=left >= 0, MASK_KIND=mask_kind, ALIBI_SLOPES=slopes is not None,
                      SOFTCAP=features.softcap > 0, DROPOUT=features.dropout_p > 0,
                      INPUT_PRECISION=input_precision(q.dtype), VARLEN=features.varlen is not None)
    return pointers, strides, scalars, constexprs


def _tma_ready(t):
    """Whether the TMA forward may read each (batch, head) of a (B, H, T, D) tensor: 16-bit (float32 tiles spill
    with it), its last dim contiguous, its address and other strides multiples of 16 bytes (what TMA requires)."""
    step = 16 // t.element_size()
    return (t.element_size() == 2 and t.stride(3) == 1 and t.data_ptr() % 16 == 0
            and all(stride % step == 0 for stride in t.stride()[:3]))


def _allow_descriptors(device):
    """Tensor descriptors made inside a kernel live in global scratch memory that Triton asks its allocator for."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def attention_forward(q, k, v, softmax_scale, features=Features()):
    """Returns (out, lse): out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32. See the module docstring."""
    _, num_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    out = empty_bthd(q.shape[0], num_heads, seqlen_q, head_dim, q)
    lse = torch.empty((q.shape[0], num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    pointers, strides, scalars, constexprs = _feature_args(q, seqlen_k, features, softmax_scale)
    batch, rows, keys = launch_shape(q, k, features)
    arch = device_arch(q.device)
    variants = forward_variants(arch, has_features(constexprs), _tma_ready(k) and _tma_ready(v))
    if variants != ("pointers",):
        _allow_descriptors(q.device)
    kernel = autotuned(attention_forward_kernel, "forward", arch, q.dtype, rows, keys, constexprs, variants)

    def grid(meta):
        query_blocks = triton.cdiv(rows, meta["BLOCK_M"])
        if meta["PERSISTENT"]:
            return (min(query_blocks * batch * num_heads, multiprocessors(q.device)),)
        return (query_blocks, batch * num_heads)
    kernel[grid](q, k, v, out, lse, *pointers, *_strides(q), *_strides(k), *_strides(v), *_strides(out), *strides,
                 batch * num_heads, num_heads, num_heads // num_kv_heads, seqlen_q, seqlen_k, **scalars,
                 **constexprs)
    return out, lse


class _Backward(NamedTuple):
    """One backward call's tensors and kernel arguments, shared by its variants."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor
    pointers: tuple
    strides: tuple
    scalars: dict
    constexprs: dict
    loads: tuple  # the kernels' load variants (attention_tuning.backward_loads)
    shape: tuple  # (batch, Tq, Tk) of the grids: launch_shape


def _dkdv(call, dq_acc=None):
    """(dk, dv) from the dk/dv kernel; with dq_acc (float32, (B, Hq, Tq, D), zeros) it also adds dq there: the
    single pass."""
    q, k = call.q, call.k
    num_kv_heads = k.shape[1]
    dk = empty_bthd(*k.shape, k)
    dv = empty_bthd(*k.shape, call.v)
    name = "backward_dkdv" if dq_acc is None else "backward_single_pass"
    batch, rows, keys = call.shape
    kernel = autotuned(attention_backward_dkdv_kernel, name, device_arch(q.device), q.dtype, rows, keys,
                       call.constexprs, call.loads)
    grid = lambda meta: (triton.cdiv(keys, meta["BLOCK_N"]), batch * num_kv_heads)
    kernel[grid](q, k, call.v, call.grad_out, call.lse, call.delta, dk, dv, *call.pointers,
                 q if dq_acc is None else dq_acc, *_strides(q), *_strides(k), *_strides(call.v),
                 *_strides(call.grad_out), *_strides(dk), *_strides(dv), *call.strides,
                 *(_strides(dq_acc) if dq_acc is not None else (0, 0, 0, 0)), num_kv_heads, q.shape[1] // num_kv_heads,
                 **call.scalars, **call.constexprs, ATOMIC_DQ=dq_acc is not None)
    return dk, dv


def _two_kernel_backward(call, mask_grad):
    """(dq, dk, dv, dmask): the dk/dv kernel, then the dq kernel (which also writes dmask with mask_grad)."""
    q, k = call.q, call.k
    num_heads = q.shape[1]
    dk, dv = _dkdv(call)
    dq = empty_bthd(*q.shape, q)
    dmask = (torch.zeros((*q.shape[:3], k.shape[2]), dtype=torch.float32, device=q.device) if mask_grad else None)
    batch, rows, keys = call.shape
    kernel = autotuned(attention_backward_dq_kernel, "backward_dq", device_arch(q.device), q.dtype, rows, keys,
                       call.constexprs, call.loads)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), batch * num_heads)
    kernel[grid](q, k, call.v, call.grad_out, call.lse, call.delta, dq, *call.pointers,
                 q if dmask is None else dmask, *_strides(q), *_strides(k), *_strides(call.v),
                 *_strides(call.grad_out), *_strides(dq), *call.strides,
                 *(_strides(dmask) if mask_grad else (0, 0, 0, 0)), num_heads, num_heads // k.shape[1],
                 **call.scalars, **call.constexprs, BIAS_GRAD=mask_grad)
    return dq, dk, dv, dmask


def _single_pass_backward(call):
    """(dq, dk, dv, None): dq summed in float32 by the dk/dv kernel's atomics, then cast to q's dtype."""
    batch, num_heads, seqlen_q, head_dim = call.q.shape
    dq_acc = torch.zeros((batch, seqlen_q, num_heads, head_dim), dtype=torch.float32,
                         device=call.q.device).transpose(1, 2)
    dk, dv = _dkdv(call, dq_acc)
    return dq_acc.to(call.q.dtype), dk, dv, None


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, softmax_scale, features=Features(),
                       mask_grad=False):
    """Returns (dq, dk, dv, dmask): dq, dk, dv shaped and typed like their inputs; dmask, with mask_grad (an
    additive mask that requires grad), the gradient reaching each (b, h, i, j) logit as float32 (B, Hq, Tq, Tk),
    to be summed over the mask's broadcast dims, else None. From the forward's out and lse and the gradients
    of both (grad_lse: float32 (B, Hq, Tq), contiguous). The two-kernel or the single-pass variant, whichever
    ran faster for this kind of call (attention_tuning's docstring)."""
    batch, num_heads, seqlen_q, head_dim = q.shape
    pointers, strides, scalars, constexprs = _feature_args(q, k.shape[2], features, softmax_scale)
    delta = torch.empty_like(lse)
    rows = delta_block(constexprs["BLOCK_D"])
    attention_backward_delta_kernel[(triton.cdiv(seqlen_q, rows), batch * num_heads)](
        out, grad_out, grad_lse, delta, *_strides(out), *_strides(grad_out), num_heads, seqlen_q,
        HEAD_DIM=head_dim, BLOCK_D=constexprs["BLOCK_D"], BLOCK_M=rows, maxnreg=MAX_REGISTERS)
    arch = device_arch(q.device)
    loads = backward_loads(arch, has_features(constexprs), all(_tma_ready(t) for t in (q, k, v, grad_out)))
    if loads != ("pointers",):
        _allow_descriptors(q.device)
    shape = launch_shape(q, k, features)
    call = _Backward(q, k, v, grad_out, lse, delta, pointers, strides,
                     dict(seqlen_q=seqlen_q, seqlen_k=k.shape[2], **scalars, softmax_scale=softmax_scale),
                     constexprs, loads, shape)
    runs = {"two_kernel": lambda: _two_kernel_backward(call, mask_grad),
            "single_pass": lambda: _single_pass_backward(call)}
    choices = backward_choices(arch, constexprs["BLOCK_D"], features.deterministic, mask_grad)
    key = (arch, q.dtype, num_heads // k.shape[1], *constexprs.values(), loads, length_bucket(shape[1]),
           length_bucket(shape[2]))
    return runs[fastest(key, {name: runs[name] for name in choices})]()


def dropout_keep_mask(seed_offset, batch, num_heads, seqlen_q, seqlen_k, dropout_p):
    """The (B, Hq, Tq, Tk) bool keep mask that the kernels draw for seed_offset: the reference tests and
    return_attn_probs compare against."""
    keep = torch.empty((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.bool, device=seed_offset.device)
    grid = (triton.cdiv(seqlen_q, 16), triton.cdiv(seqlen_k, 16), batch * num_heads)
    dropout_keep_kernel[grid](seed_offset, keep, num_heads, seqlen_q, seqlen_k, dropout_p, BLOCK_M=16, BLOCK_N=16)
    return keep
