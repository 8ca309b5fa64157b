"""Fused flash-attention in Triton: forward and backward kernels and their launchers.

The algorithm is FlashAttention-2 (Dao, 2023, arXiv:2307.08691): the forward keeps a running max and sum per
query row (online softmax) so the (Tq, Tk) score matrix never reaches memory, and saves the log-sum-exp of each
row; the backward recomputes the probabilities from it, in one kernel that owns a block of keys (dk, dv) and one
that owns a block of queries (dq), so that no gradient needs an atomic add. The loop structure follows Triton's
fused-attention tutorial (split into blocks that need a mask and blocks that don't).

Layouts, for every tensor the launchers take:
    q: (B, Hq, Tq, D), k and v: (B, Hkv, Tk, D), any strides (views of a fused QKV projection work as they are).
    Hq is a multiple of Hkv (grouped-query attention); query head h reads key/value head h // (Hq // Hkv).
    D is a multiple of 8 from 8 to 256; blocks are padded to the next power of two and masked.
    out: (B, Hq, Tq, D) in q's dtype, stored as (B, Tq, Hq, D) memory; lse: (B, Hq, Tq) float32, natural log.

Causal masks: key j is visible to query i when j <= i + causal_offset. causal_offset is 0 for a top-left mask
(torch's is_causal) and Tk - Tq for a bottom-right one (a KV cache). A query row that sees no key gets output 0
and lse +inf, as in FlashAttention, so its backward terms vanish.
"""
import functools

import torch
import triton
import triton.language as tl

from gptfast.kernels import device_arch, tuned

CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2
LOG2E = 1.4426950408889634

# Tuning spaces: (BLOCK_M, BLOCK_N, num_warps, num_stages, padded head dims it serves), per architecture, for
# 16-bit inputs and for float32 ones (whose full-precision dot runs on FMA units and needs far smaller tiles).
# BLOCK_M counts query rows and BLOCK_N key rows in every kernel. Each entry was kept because `gptfast inspect`
# compiles it for its dims without spills or shared-memory overflow (on sm_90 with wgmma, HGMMA); the interpreter
# uses small blocks so that the CPU tests cross many block edges.
UP_TO_64, UP_TO_128, UP_TO_256 = (16, 32, 64), (16, 32, 64, 128), (16, 32, 64, 128, 256)
CONFIGS = {
    "forward": {
        "sm_90": [(128, 64, 8, 3, UP_TO_128), (128, 128, 8, 3, UP_TO_64), (64, 64, 4, 3, UP_TO_128),
                  (64, 64, 8, 2, UP_TO_256), (128, 32, 8, 2, UP_TO_256)],
        "sm_80": [(128, 64, 8, 3, UP_TO_64), (64, 64, 4, 3, UP_TO_128), (128, 32, 8, 2, UP_TO_128),
                  (64, 32, 4, 2, UP_TO_128), (64, 64, 8, 2, UP_TO_256)],
        "fp32": [(64, 16, 4, 1, UP_TO_64), (32, 16, 8, 1, UP_TO_128), (16, 32, 8, 1, UP_TO_256)],
        "interpreter": [(16, 16, 1, 1, UP_TO_256)],
    },
    "backward_dkdv": {
        "sm_90": [(32, 128, 8, 2, UP_TO_64), (64, 128, 8, 1, UP_TO_64), (32, 64, 8, 1, UP_TO_128),
                  (16, 128, 8, 2, UP_TO_128),
                  # A 256-wide dk, dv pair fits in registers only with these; they run HMMA, not wgmma.
                  (32, 32, 8, 2, (256,)), (16, 32, 4, 1, (256,))],
        "sm_80": [(32, 64, 8, 1, UP_TO_128), (32, 32, 8, 2, (64, 128)), (32, 32, 4, 1, UP_TO_64),
                  (16, 32, 4, 1, UP_TO_256)],
        "fp32": [(16, 32, 4, 1, (16, 32)), (32, 16, 4, 1, (64,)), (16, 16, 8, 1, (16, 32, 128)),
                 (16, 32, 8, 1, (256,))],
        "interpreter": [(16, 16, 1, 1, UP_TO_256)],
    },
    "backward_dq": {
        "sm_90": [(128, 64, 8, 2, UP_TO_128), (128, 32, 8, 1, UP_TO_128), (64, 64, 4, 2, UP_TO_128),
                  (64, 32, 8, 2, UP_TO_256)],
        "sm_80": [(128, 64, 8, 2, (16, 64)), (128, 32, 8, 1, UP_TO_128), (64, 32, 8, 2, UP_TO_256),
                  (32, 32, 4, 1, UP_TO_256)],
        "fp32": [(32, 32, 4, 1, UP_TO_64), (32, 16, 8, 1, UP_TO_128), (16, 16, 8, 1, UP_TO_256)],
        "interpreter": [(16, 16, 1, 1, UP_TO_256)],
    },
}


def delta_block(block_d):
    """Query rows per program of the delta kernel: 4096 elements of O and dO each, so float32 never spills."""
    return 4096 // block_d


def config_table(arch, dtype):
    """The CONFIGS key for a device arch ('sm_90', 'sm_80' or 'interpreter') and an input dtype."""
    return "fp32" if dtype == torch.float32 and arch != "interpreter" else arch


def configs_for(kernel_name, table, block_d):
    """The triton.Config list of one kernel in one table that serves a padded head dim of block_d."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s, dims in CONFIGS[kernel_name][table] if block_d in dims]


@triton.jit
def _visible(offs_m, offs_n, seqlen_k, causal_offset, CAUSAL: tl.constexpr):
    """Which (query, key) pairs may attend: keys inside the sequence and, if causal, not after the diagonal.
    offs_m and offs_n come in already broadcast to the tile's 2-D shape."""
    mask = offs_n < seqlen_k
    if CAUSAL:
        mask = mask & (offs_n <= offs_m + causal_offset)
    return mask


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """Keys that the query rows [start_m, start_m + BLOCK_M) visit: [0, full_end) need no mask, [full_end, stop)
    do (they cross the diagonal or the end of the sequence). Keys from stop on are never loaded."""
    if CAUSAL:
        # The last visible key of the block's last real row (rows past Tq see nothing they need).
        stop = tl.maximum(tl.minimum(seqlen_k, tl.minimum(start_m + BLOCK_M, seqlen_q) + causal_offset), 0)
        full_end = tl.maximum(tl.minimum(stop, start_m + causal_offset + 1), 0) // BLOCK_N * BLOCK_N
    else:
        stop = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    return full_end, stop


@triton.jit
def _query_range(start_n, seqlen_q, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """Query rows that see the keys [start_n, start_n + BLOCK_N): rows [start, full_start) need the causal mask,
    rows [full_start, seqlen_q) see every key of the block. Rows before start are never loaded."""
    if CAUSAL:
        # The first query that sees a key of the block, rounded down to its block; Tq when no query sees the
        # block (top-left mask, Tk > Tq), so both loops are empty and dk, dv are 0.
        start = tl.minimum(tl.maximum(start_n - causal_offset, 0), seqlen_q)
        start = tl.where(start < seqlen_q, start // BLOCK_M * BLOCK_M, start)
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(full_start, seqlen_q)
    else:
        start = 0
        full_start = 0
    return start, full_start


@triton.jit
def _tile(base, rows, offs_d, stride_t, stride_d):
    """Pointers to the (rows, head dim) tile of one head's (T, D) matrix."""
    return base + rows[:, None] * stride_t + offs_d[None, :] * stride_d


@triton.jit
def _query_program(num_heads, group_size, BLOCK_M: tl.constexpr):
    """(first query row, batch, head, kv head) of a program gridded (cdiv(Tq, BLOCK_M), B * Hq), indices in int64
    since B * H * T * D can pass 2**31 elements. Causal rows near the end see the most keys: those programs
    start first (FlashAttention-2, section 3.3)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    return start_m, batch.to(tl.int64), head.to(tl.int64), (head // group_size).to(tl.int64)


@triton.jit
def _forward_block_loop(acc, row_sum, row_max, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
                        seqlen_k, causal_offset, qk_scale, start, stop,
                        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [start, stop): rescales the running (acc, row_sum, row_max)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        key_rows = start_n + offs_n
        kv_mask = d_mask[None, :]
        if MASKED:
            kv_mask = kv_mask & (key_rows[:, None] < seqlen_k)
        k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if MASKED:
            visible = _visible(offs_m[:, None], key_rows[None, :], seqlen_k, causal_offset, CAUSAL)
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row with nothing visible yet keeps a max of -inf; subtract 0 instead so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        # v is loaded only now, so it is not live in registers during the softmax (the dq loop below loads it
        # with k instead: each order is the one that compiles without spills, per `gptfast inspect`).
        v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=INPUT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def attention_forward_kernel(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        num_heads, group_size, seqlen_q, seqlen_k, causal_offset, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). qk_scale is softmax_scale * log2(e), so the
    softmax runs on exp2. Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
    start_m, batch, head, kv_head = _query_program(num_heads, group_size, BLOCK_M)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + kv_head * stride_kh
    V += batch * stride_vb + kv_head * stride_vh
    O += batch * stride_ob + head * stride_oh
    LSE += (batch * num_heads + head) * seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < seqlen_q) & d_mask[None, :]
    q = tl.load(_tile(Q, offs_m, offs_d, stride_qt, stride_qd), mask=q_mask, other=0.0)
    k_ptrs = _tile(K, offs_n, offs_d, stride_kt, stride_kd)
    v_ptrs = _tile(V, offs_n, offs_d, stride_vt, stride_vd)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end, stop = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, row_sum, row_max = _forward_block_loop(
        acc, row_sum, row_max, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask, seqlen_k, causal_offset,
        qk_scale, 0, full_end, BLOCK_N, False, CAUSAL, INPUT_PRECISION)
    acc, row_sum, row_max = _forward_block_loop(
        acc, row_sum, row_max, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask, seqlen_k, causal_offset,
        qk_scale, full_end, stop, BLOCK_N, True, CAUSAL, INPUT_PRECISION)

    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    out = acc / row_sum[:, None]
    lse = tl.where(empty, float("inf"), (row_max + tl.log2(row_sum)) / 1.4426950408889634)
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
    Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
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
def _dkdv_block_loop(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod, key_rows,
                     offs_d, d_mask, seqlen_q, seqlen_k, causal_offset, qk_scale, start, stop,
                     BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """Adds to dk, dv (BLOCK_N, BLOCK_D) the terms of the query rows [start, stop) of one head. Works on the
    transposed tile (keys x queries) so that both products take their operands as loaded. Query rows past Tq
    load as zeros with lse +inf, so they add nothing; key rows past Tk are never stored."""
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < seqlen_q
        q_mask = row_mask[:, None] & d_mask[None, :]
        q = tl.load(_tile(Q, offs_m, offs_d, stride_qt, stride_qd), mask=q_mask, other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_mask, other=float("inf")) * 1.4426950408889634
        scores_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        p_t = tl.exp2(scores_t - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible(offs_m[None, :], key_rows[:, None], seqlen_k, causal_offset, CAUSAL), p_t, 0.0)
        do = tl.load(_tile(DO, offs_m, offs_d, stride_dot, stride_dod), mask=q_mask, other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dkt, stride_dkd,
        stride_dvb, stride_dvh, stride_dvt, stride_dvd,
        num_kv_heads, group_size, seqlen_q, seqlen_k, causal_offset, qk_scale, softmax_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head); loops over every query head of its group, so a grouped
    K/V head's gradient is summed in registers. Grid: (cdiv(Tk, BLOCK_N), B * Hkv)."""
    start_n = tl.program_id(0) * BLOCK_N
    batch = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    K += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    DK += batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
    DV += batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh

    key_rows = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (key_rows[:, None] < seqlen_k) & d_mask[None, :]
    k = tl.load(_tile(K, key_rows, offs_d, stride_kt, stride_kd), mask=kv_mask, other=0.0)
    v = tl.load(_tile(V, key_rows, offs_d, stride_vt, stride_vd), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start, full_start = _query_range(start_n, seqlen_q, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    # Pointers to the group's first query head; each pass of the loop moves them one head on.
    first_head = (kv_head * group_size).to(tl.int64)
    Q += batch.to(tl.int64) * stride_qb + first_head * stride_qh
    DO += batch.to(tl.int64) * stride_dob + first_head * stride_doh
    LSE += (batch.to(tl.int64) * num_kv_heads * group_size + first_head) * seqlen_q
    DELTA += (batch.to(tl.int64) * num_kv_heads * group_size + first_head) * seqlen_q
    for _ in range(group_size):
        dk, dv = _dkdv_block_loop(
            dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod, key_rows, offs_d,
            d_mask, seqlen_q, seqlen_k, causal_offset, qk_scale, start, full_start, BLOCK_M, True, CAUSAL,
            INPUT_PRECISION)
        dk, dv = _dkdv_block_loop(
            dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod, key_rows, offs_d,
            d_mask, seqlen_q, seqlen_k, causal_offset, qk_scale, full_start, seqlen_q, BLOCK_M, False, CAUSAL,
            INPUT_PRECISION)
        Q += stride_qh
        DO += stride_doh
        LSE += seqlen_q
        DELTA += seqlen_q
    tl.store(_tile(DK, key_rows, offs_d, stride_dkt, stride_dkd),
             (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile(DV, key_rows, offs_d, stride_dvt, stride_dvd), dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _dq_block_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask, seqlen_k,
                   causal_offset, qk_scale, start, stop,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """Adds to dq (BLOCK_M, BLOCK_D) the terms of the key blocks [start, stop)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        key_rows = start_n + offs_n
        kv_mask = d_mask[None, :]
        if MASKED:
            kv_mask = kv_mask & (key_rows[:, None] < seqlen_k)
        k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.exp2(scores - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], key_rows[None, :], seqlen_k, causal_offset, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        num_heads, group_size, seqlen_q, seqlen_k, causal_offset, qk_scale, softmax_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
    start_m, batch, head, kv_head = _query_program(num_heads, group_size, BLOCK_M)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + kv_head * stride_kh
    V += batch * stride_vb + kv_head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    DQ += batch * stride_dqb + head * stride_dqh
    LSE += (batch * num_heads + head) * seqlen_q
    DELTA += (batch * num_heads + head) * seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < seqlen_q
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(_tile(Q, offs_m, offs_d, stride_qt, stride_qd), mask=q_mask, other=0.0)
    do = tl.load(_tile(DO, offs_m, offs_d, stride_dot, stride_dod), mask=q_mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
    k_ptrs = _tile(K, offs_n, offs_d, stride_kt, stride_kd)
    v_ptrs = _tile(V, offs_n, offs_d, stride_vt, stride_vd)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, stop = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_block_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask, seqlen_k,
                        causal_offset, qk_scale, 0, full_end, BLOCK_N, False, CAUSAL, INPUT_PRECISION)
    dq = _dq_block_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask, seqlen_k,
                        causal_offset, qk_scale, full_end, stop, BLOCK_N, True, CAUSAL, INPUT_PRECISION)
    tl.store(_tile(DQ, offs_m, offs_d, stride_dqt, stride_dqd),
             (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers. They trust their caller (gptfast.attention checks every argument once, at the edge).

@functools.cache
def _autotuned(kernel, kernel_name, table, block_d):
    configs = tuned(configs_for(kernel_name, table, block_d))
    return triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL"])(kernel)


def autotuned(kernel, kernel_name, q, block_d):
    """The kernel wrapped in an autotuner over the configs that serve q's device, dtype and padded head dim."""
    return _autotuned(kernel, kernel_name, config_table(device_arch(q.device), q.dtype), block_d)


def _strides(t):
    return (t.stride(0), t.stride(1), t.stride(2), t.stride(3))


def empty_bthd(b, h, t, d, like):
    """A (B, H, T, D) tensor stored as (B, T, H, D) memory: the layout flash-attn returns, so that merging heads
    afterwards (transpose(1, 2).reshape) is free."""
    return torch.empty((b, t, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


def _kernel_constants(q, causal):
    head_dim = q.shape[-1]
    allow_tf32 = q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                CAUSAL=causal != CAUSAL_NONE, INPUT_PRECISION="tf32" if allow_tf32 else "ieee")


def _causal_offset(causal, seqlen_q, seqlen_k):
    return seqlen_k - seqlen_q if causal == CAUSAL_BOTTOM_RIGHT else 0


def attention_forward(q, k, v, causal, softmax_scale):
    """Returns (out, lse): out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32. See the module docstring."""
    batch, num_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    out = empty_bthd(batch, num_heads, seqlen_q, head_dim, q)
    lse = torch.empty((batch, num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    constants = _kernel_constants(q, causal)
    kernel = autotuned(attention_forward_kernel, "forward", q, constants["BLOCK_D"])
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * num_heads)
    kernel[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                 num_heads, num_heads // num_kv_heads, seqlen_q, seqlen_k, _causal_offset(causal, seqlen_q, seqlen_k),
                 softmax_scale * LOG2E, **constants)
    return out, lse


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, causal, softmax_scale):
    """Returns (dq, dk, dv), each shaped and typed like its input, from the forward's out and lse and the
    gradients of both (grad_lse: float32 (B, Hq, Tq), contiguous)."""
    batch, num_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    constants = _kernel_constants(q, causal)
    delta = torch.empty_like(lse)
    rows = delta_block(constants["BLOCK_D"])
    attention_backward_delta_kernel[(triton.cdiv(seqlen_q, rows), batch * num_heads)](
        out, grad_out, grad_lse, delta, *_strides(out), *_strides(grad_out), num_heads, seqlen_q,
        HEAD_DIM=head_dim, BLOCK_D=constants["BLOCK_D"], BLOCK_M=rows)

    dq = empty_bthd(batch, num_heads, seqlen_q, head_dim, q)
    dk = empty_bthd(batch, num_kv_heads, seqlen_k, head_dim, k)
    dv = empty_bthd(batch, num_kv_heads, seqlen_k, head_dim, v)
    shared = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    scales = (seqlen_q, seqlen_k, _causal_offset(causal, seqlen_q, seqlen_k), softmax_scale * LOG2E, softmax_scale)
    kernel = autotuned(attention_backward_dkdv_kernel, "backward_dkdv", q, constants["BLOCK_D"])
    grid = lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * num_kv_heads)
    kernel[grid](q, k, v, grad_out, lse, delta, dk, dv, *shared, *_strides(dk), *_strides(dv),
                 num_kv_heads, num_heads // num_kv_heads, *scales, **constants)
    kernel = autotuned(attention_backward_dq_kernel, "backward_dq", q, constants["BLOCK_D"])
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * num_heads)
    kernel[grid](q, k, v, grad_out, lse, delta, dq, *shared, *_strides(dq),
                 num_heads, num_heads // num_kv_heads, *scales, **constants)
    return dq, dk, dv
