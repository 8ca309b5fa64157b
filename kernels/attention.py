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
    q and k: (B, Hq, Tq, D) and (B, Hkv, Tk, D), v: (B, Hkv, Tk, Dv), any strides (views of a fused QKV
    projection work as they are). Hq is a multiple of Hkv (grouped-query attention); query head h reads key/value
    head h // (Hq // Hkv). D and Dv (DeepSeek's MLA: 192 and 128) are any sizes from 1 to 256; blocks are padded to
    the next power of two and masked.
    out: (B, Hq, Tq, Dv) in q's dtype, stored as (B, Tq, Hq, Dv) memory; lse: (B, Hq, Tq) float32, natural log.

Bounds: key j is visible to query i when j <= i + causal_offset (CAUSAL), j >= i + window_offset (WINDOW) and
j lies in the chunk of position i + Tk - Tq (CHUNK: chunks of a size C, [c * C, (c + 1) * C)). causal_offset is
0 for a top-left causal mask (torch's is_causal), Tk - Tq for a bottom-right one (a KV cache, flash-attn), plus a
window's right size; window_offset is the bottom-right diagonal minus the window's left size (flash-attn 2's
sliding window). Key blocks outside the bounds are never loaded. A query row that sees no key gets
output 0 and lse +inf, as in FlashAttention, so its backward terms vanish.

Every other feature is a switch of the same kernels, compiled out when off: a boolean or additive mask read
through its strides (the additive one's gradient with BIAS_GRAD), ALiBi slopes, Gemma 2's logit softcapping, and
dropout on the attention weights from Philox numbers regenerated in the backward, and in the forward float8 inputs
with per-(batch, kv head) descales (FP8, gptfast.fp8). The switches travel as one
constexpr, SPEC (attention_spec.Spec), with the call's other arguments grouped in tuples: strides (4 per tensor),
dims (batch, Hq, group size, Tq, Tk), bounds (causal_offset, window_offset, alibi_offset, chunk) and scales (qk_scale,
softmax_scale, softcap, dropout_p, keep_scale); an absent tensor is None.

Programmable attention (gptfast.flex) is one more set of switches: SPEC's score and mask mods are @triton.jit
functions inlined where the scores are made (_modded_scores), their arguments travel in `mods`, and with a block
mask the block loops walk the key (or, for dk/dv, query) blocks its lists name instead of the bounds' three
stages (`blocks`, attention_spec.block_lists): full blocks without the mask mod, partial ones with it. The idea of
block lists with full and partial blocks is FlexAttention's (PyTorch, torch.nn.attention.flex_attention).
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gptfast.kernels import cdiv, device_arch, multiprocessors
from gptfast.kernels.attention_blocks import (MASK_NONE, chunk_start, head_columns, mask_mods, online_softmax,
                                              softmax_start, tile_scores, visible_pairs)
from gptfast.kernels.attention_spec import Features, block_lists, describe
from gptfast.kernels.attention_tuning import (MAX_REGISTERS, autotuned, backward_choices, backward_loads,
                                               delta_block, fastest, forward_variants, length_bucket)
from gptfast.kernels.math import LOG2E

# The weights of an FP8 forward enter P @ V as float8 e4m3 times this: its smallest normal number is 2^-6, so
# unscaled weights below 0.016 would lose precision and those below 2^-9 vanish; scaled, its range ends at 448.
FP8_P_SCALE = tl.constexpr(256.0)


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
def _chunk_key_range(ranges, start_m, seqlen_q, diagonal, chunk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_key_range's (lo, full_start, full_end, hi) narrowed to the chunks of the query rows [start_m, start_m +
    BLOCK_M) (positions row + diagonal)."""
    first = chunk_start(start_m + diagonal, chunk)
    last = chunk_start(tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + diagonal, chunk)
    return _chunk_range(ranges, first, last, chunk, BLOCK_N)


@triton.jit
def _chunk_query_range(ranges, start_n, diagonal, chunk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_query_range's (lo, full_start, full_end, hi) narrowed to the rows whose chunk holds a key of [start_n,
    start_n + BLOCK_N)."""
    first = chunk_start(start_n, chunk) - diagonal
    last = chunk_start(start_n + BLOCK_N - 1, chunk) - diagonal
    return _chunk_range(ranges, first, last, chunk, BLOCK_M)


@triton.jit
def _chunk_range(ranges, first, last, chunk, BLOCK: tl.constexpr):
    """(lo, full_start, full_end, hi), a loop's ranges over the other side's indices (keys for a block of query
    rows, rows for a block of keys), narrowed to the chunks of the block's own: from first (where its first
    index's chunk starts, in the other side's indices) to the end of last's chunk; every index of the block sees
    [last, first + chunk). The loops' invariants hold: lo a multiple of BLOCK, full_start and full_end multiples
    of it or hi."""
    lo, full_start, full_end, hi = ranges
    hi = tl.maximum(tl.minimum(hi, last + chunk), 0)
    # Both terms multiples of BLOCK, which the compiler sees: a loop start it cannot prove aligned costs the
    # loads their vectorisation (sm_100's every-feature tile then spilled). A block that sees nothing then loads
    # the one block at floor(hi), masked whole.
    lo = tl.minimum(tl.maximum(lo, tl.maximum(first, 0) // BLOCK * BLOCK), hi // BLOCK * BLOCK)
    full_start = tl.minimum(tl.maximum(full_start, tl.cdiv(tl.maximum(last, 0), BLOCK) * BLOCK), hi)
    full_end = tl.minimum(tl.minimum(full_end, tl.maximum(first + chunk, 0) // BLOCK * BLOCK), hi // BLOCK * BLOCK)
    return lo, full_start, tl.maximum(full_end, full_start), hi


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
def _kept(rows, keys, dropping):
    """Dropout's keep mask of a tile (True with probability 1 - dropout_p), dropping = (seed, offset, head_index,
    dropout_p, keep_scale) (see _dropping). Philox 4x32 (Salmon et al., 2011; the generator of tl.rand) keyed by
    seed and counting (key, query, batch * Hq + head, offset), so the forward and both backward kernels draw the
    same number for each score and no (Tq, Tk) mask is ever stored."""
    seed, offset, head_index, dropout_p, _ = dropping
    c0 = (keys + rows * 0).to(tl.uint32)
    c1 = (rows + keys * 0).to(tl.uint32)
    c2 = c0 * 0 + head_index.to(tl.uint32)
    c3 = c0 * 0 + offset.to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _dropping(SEED, head_index, scales, SPEC: tl.constexpr):
    """(seed, offset, head_index, dropout_p, keep_scale) of one (batch, head): what _kept draws from. The seed and
    offset are the int64 pair SEED points at, (0, 0) without dropout."""
    seed = 0
    offset = 0
    if SPEC.DROPOUT:
        seed = tl.load(SEED)
        offset = tl.load(SEED + 1)
    return seed, offset, head_index, scales[3], scales[4]


@triton.jit
def _scoring(MASK, ALIBI, mods, mask_strides, alibi_strides, batch, head, scales, SPEC: tl.constexpr):
    """What _scores needs for one (batch, head): (its mask's (Tq, Tk) matrix, the mask's row and key strides,
    its ALiBi slope, qk_scale, softcap, batch, head, the flex call's mods (see attention_spec.with_flex),
    softmax_scale). What the spec does not use is 0."""
    slope = 0.0
    if SPEC.ALIBI:
        slope = tl.load(ALIBI + batch * alibi_strides[0] + head * alibi_strides[1])
    mask = 0  # a placeholder (a tuple returned from device code cannot hold None)
    if SPEC.MASK_KIND != MASK_NONE:
        mask = MASK + batch * mask_strides[0] + head * mask_strides[1]
    modding = 0
    if SPEC.SCORE_MOD is not None or SPEC.MASK_MOD is not None:
        modding = mods
    return mask, mask_strides[2], mask_strides[3], slope, scales[0], scales[2], batch, head, modding, scales[1]


@triton.jit
def _scores(qk, rows, keys, seq, scoring, SPEC: tl.constexpr, MASKED: tl.constexpr):
    """(scores, scale, saved) of a tile with the call's features (tile_scores, or _modded_scores for a flex
    call): rows and keys come broadcast to the tile's shape (either orientation), seq = (Tq, Tk, causal_offset,
    window_offset, alibi_offset) (see _sequence). MASKED: the stage's blocks are partial ones."""
    if SPEC.SCORE_MOD is not None or SPEC.MASK_MOD is not None:
        scores, scale, saved = _modded_scores(qk, rows, keys, seq, scoring, SPEC, MASKED)
    else:
        MASK, stride_mt, stride_ms, slope, qk_scale, softcap = scoring[:6]
        mask_tile = MASK
        if SPEC.MASK_KIND != MASK_NONE:
            mask_tile = MASK + rows * stride_mt + keys * stride_ms
        scores, scale, saved = tile_scores(qk, rows, keys, seq[0], seq[1], mask_tile, slope, seq[4], qk_scale,
                                           softcap, MASK_KIND=SPEC.MASK_KIND, ALIBI=SPEC.ALIBI, SOFTCAP=SPEC.SOFTCAP)
    return scores, scale, saved


@triton.jit
def _mod_indices(rows, keys, seq):
    """The query and key indices a mod sees: clamped into the sequence, so that a mod may index a tensor by
    position (a document id, a bias table) anywhere in a tile; the pairs past the ends are masked regardless
    (FlexAttention bounds its indices the same way)."""
    return tl.minimum(rows, seq[0] - 1), tl.minimum(keys, seq[1] - 1)


@triton.jit
def _modded_scores(qk, rows, keys, seq, scoring, SPEC: tl.constexpr, MASKED: tl.constexpr):
    """A flex call's (scores, 1.0, score): score = qk * softmax_scale goes through SCORE_MOD, MASK_MOD hides
    pairs (on partial blocks only when a block mask says which blocks are full), then log2 units; score, the
    mod's input, is what its derivative takes in the backward."""
    batch, head, mods, softmax_scale = scoring[6], scoring[7], scoring[8], scoring[9]
    q_idx, kv_idx = _mod_indices(rows, keys, seq)
    score = qk * softmax_scale
    modded = score
    if SPEC.SCORE_MOD is not None:
        modded = SPEC.SCORE_MOD(score, batch, head, q_idx, kv_idx, mods[0])
    if SPEC.MASK_MOD is not None and (MASKED or SPEC.SPARSE_Q == 0):
        MASK_MOD: tl.constexpr = SPEC.MASK_MOD  # a field's tuple, passed on, must be a constexpr again
        modded = tl.where(mask_mods(batch, head, q_idx, kv_idx, mods[2], MASK_MOD), modded, float("-inf"))
    return modded * LOG2E, 1.0, score


@triton.jit
def _mod_grads(dlogits, score, rows, keys, seq, scoring, SPEC: tl.constexpr, ARG_GRADS: tl.constexpr):
    """The gradient reaching SCORE_MOD's input score from dlogits, the one reaching its output; with ARG_GRADS
    SCORE_ARG_GRAD also adds its tensor arguments' gradients: the dk/dv kernel does, which every backward variant
    runs and which visits each pair once (its small tiles at head dim 256 hold the atomics without spills)."""
    batch, head, mods = scoring[6], scoring[7], scoring[8]
    q_idx, kv_idx = _mod_indices(rows, keys, seq)
    if ARG_GRADS:
        SPEC.SCORE_ARG_GRAD(dlogits, score, batch, head, q_idx, kv_idx, mods[0], mods[1])
    return SPEC.SCORE_GRAD(dlogits, score, batch, head, q_idx, kv_idx, mods[0])


@triton.jit
def _block_list(blocks, batch, head, row, FULL: tl.constexpr):
    """(count, indices): the blocks a block mask lists for one (batch, head) and row of its lists (a query block
    in the forward and dq kernels, a key block in dk/dv's), its full blocks with FULL, else its partial ones.
    blocks: attention_spec.block_lists."""
    index = batch * blocks[4] + head * blocks[5] + row
    counts = blocks[0]
    indices = blocks[1]
    if FULL:
        counts = blocks[2]
        indices = blocks[3]
    return tl.load(counts + index), indices + index * blocks[6]


@triton.jit
def _visible(rows, keys, seq, SPEC: tl.constexpr, KEYS_MOVE: tl.constexpr):
    """visible_pairs with the sequence's bounds. With CHUNK every bound of a pair is in the fixed side's range
    seq[6] = (low, high) (_chunk_bounds): the tile's moving index (its keys with KEYS_MOVE, else its query rows)
    within it, as many comparisons per pair as causal and window alone."""
    if SPEC.CHUNK:
        moving = keys if KEYS_MOVE else rows
        visible = (keys < seq[1]) & (moving >= seq[6][0]) & (moving <= seq[6][1])
    else:
        visible = visible_pairs(rows, keys, seq[1], seq[2], seq[3], CAUSAL=SPEC.CAUSAL, WINDOW=SPEC.WINDOW)
    return visible


@triton.jit
def _chunk_bounds(seq, fixed, SPEC: tl.constexpr, FIXED_ROWS: tl.constexpr):
    """seq with a seventh entry (low, high), (n, 1) columns, for each of the tile's fixed indices: with FIXED_ROWS
    (query rows) the keys each sees lie in [low, high], else (keys) the rows that see each: the chunk, the causal
    bound and the window folded into one range. Computed once per tile, so the loops divide nothing and compare
    no more than without chunks (a per-pair chunk test spilled every-feature tiles on four archs)."""
    causal_offset, window_offset, diagonal, chunk = seq[2], seq[3], seq[4], seq[5]
    if FIXED_ROWS:
        low = chunk_start(fixed + diagonal, chunk)
        high = low + chunk - 1
        if SPEC.CAUSAL:
            high = tl.minimum(high, fixed + causal_offset)
        if SPEC.WINDOW:
            low = tl.maximum(low, fixed + window_offset)
    else:
        low = chunk_start(fixed, chunk) - diagonal
        high = low + chunk - 1
        if SPEC.CAUSAL:
            low = tl.maximum(low, fixed - causal_offset)
        if SPEC.WINDOW:
            high = tl.minimum(high, fixed - window_offset)
    return seq[0], seq[1], causal_offset, window_offset, diagonal, chunk, (low[:, None], high[:, None])


@triton.jit
def _key_masks(key_rows, seq, d_mask, dv_mask, MASKED: tl.constexpr):
    """The load masks of a block of keys and of its values: their real columns, and with MASKED (a block that may
    reach past Tk) the rows inside the sequence."""
    k_mask = d_mask[None, :]
    v_mask = dv_mask[None, :]
    if MASKED:
        k_mask = k_mask & (key_rows[:, None] < seq[1])
        v_mask = v_mask & (key_rows[:, None] < seq[1])
    return k_mask, v_mask


@triton.jit
def _tile(base, rows, offs_d, stride_t, stride_d):
    """Pointers to the (rows, head dim) tile of one head's (T, D) matrix."""
    return base + rows[:, None] * stride_t + offs_d[None, :] * stride_d


@triton.jit
def _head(strides, batch, head, start):
    """The offset of row `start` of (batch, head) in a (B, H, T, D) tensor with these strides."""
    return batch * strides[0] + head * strides[1] + start * strides[2]


@triton.jit
def _query_program(query_block, batch_head, num_heads, group_size, BLOCK_M: tl.constexpr):
    """(first query row, batch, head, kv head) of the tile of query block query_block and (batch, head) index
    batch_head (batch * Hq + head), indices in int64 since B * H * T * D can pass 2**31 elements."""
    batch = batch_head // num_heads
    head = batch_head % num_heads
    return query_block * BLOCK_M, batch.to(tl.int64), head.to(tl.int64), (head // group_size).to(tl.int64)


@triton.jit
def _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, batch, dims, bounds, SPEC: tl.constexpr):
    """(memory batch, first query row, first key row, seq) of sequence `batch`, seq = (Tq, Tk, causal_offset,
    window_offset, alibi_offset, chunk) its own (alibi_offset is the bottom-right diagonal Tk - Tq). With VARLEN
    the tensors hold the sequences packed along T ((1, H, total, D), as flash-attn's varlen functions take them):
    the sequence's rows are [CU_SEQLENS[batch], CU_SEQLENS[batch + 1]), its memory batch is 0, and the
    launcher's offsets, given for Tq = Tk, gain the sequence's own Tk - Tq (every varlen mask is bottom-right
    aligned); with SEQUSED_K only its first SEQUSED_K[batch] keys exist (flash-attn 3's seqused_k: Tk is that).
    Else the batch's own tensors, rows from 0, dims' lengths and the bounds as given."""
    causal_offset, window_offset, alibi_offset, chunk = bounds
    if SPEC.VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + batch)
        k_start = tl.load(CU_SEQLENS_K + batch)
        seqlen_q = tl.load(CU_SEQLENS_Q + batch + 1) - q_start
        if SPEC.SEQUSED_K:
            seqlen_k = tl.load(SEQUSED_K + batch)
        else:
            seqlen_k = tl.load(CU_SEQLENS_K + batch + 1) - k_start
        shift = seqlen_k - seqlen_q
        return 0, q_start, k_start, (seqlen_q, seqlen_k, causal_offset + shift, window_offset + shift,
                                     alibi_offset + shift, chunk)
    else:
        return batch, 0, 0, (dims[3], dims[4], causal_offset, window_offset, alibi_offset, chunk)


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
def _forward_blocks(acc, row_sum, row_max, q, offs_m, d_masks, k_source, v_source, kv_row_strides, seq, scoring,
                    dropping, start, stop, SPEC: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    TMA: tl.constexpr):
    """Online softmax over the key blocks [start, stop): rescales the running (acc, row_sum, row_max). k_source
    and v_source are the first key block's pointers, or with TMA tensor descriptors (see _rows); kv_row_strides
    their row strides; d_masks (d_mask, dv_mask) (see head_columns). MASKED: the blocks need the bounds' mask."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        key_rows = start_n + offs_n
        k_mask, v_mask = _key_masks(key_rows, seq, d_masks[0], d_masks[1], MASKED)
        k = _rows(k_source, start_n, kv_row_strides[0], k_mask, TMA=TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=SPEC.INPUT_PRECISION)
        scores, scale, _ = _scores(qk, offs_m[:, None], key_rows[None, :], seq, scoring, SPEC, MASKED)
        if MASKED:
            scores = tl.where(_visible(offs_m[:, None], key_rows[None, :], seq, SPEC, KEYS_MOVE=True), scores,
                              float("-inf"))
        p, correction, row_sum, new_max = online_softmax(scores, scale, row_sum, row_max)
        if SPEC.DROPOUT:  # the softmax sums every weight; the output keeps some, scaled by 1 / (1 - dropout_p)
            p = tl.where(_kept(offs_m[:, None], key_rows[None, :], dropping), p * dropping[4], 0.0)
        # v is loaded only now, so it is not live in registers during the softmax (the dq loop below loads it
        # with k instead: each order is the one that compiles without spills, per `gptfast inspect`).
        v = _rows(v_source, start_n, kv_row_strides[1], v_mask, TMA=TMA)
        if SPEC.FP8:  # P @ V in float8 too (FlashAttention-3's choice), P scaled up so that small weights stay normal
            p *= FP8_P_SCALE
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=SPEC.INPUT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def attention_forward_kernel(
        Q, K, V, O, LSE, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, SINKS, DESCALE, mods, blocks,
        q_strides, k_strides, v_strides, o_strides, mask_strides, alibi_strides, dims, bounds, scales,
        SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
        PERSISTENT: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head), B * Hq of them (with VARLEN a batch is a sequence of
    the packed tensors, see _sequence, and dims' lengths are the totals). The arguments are attention_spec's
    Call's and the tensors' strides (4 each). MASK, ALIBI, SEED, the CU_SEQLENS, SEQUSED_K, SINKS and DESCALE are
    read only when SPEC says so (else None). Two tuning choices on Hopper and newer: TMA loads K and V through tensor
    descriptors (their rows' strides must be 16-byte multiples, their last dim contiguous); PERSISTENT runs about
    one program per multiprocessor, each looping over (query block, head) tiles, the longest causal tiles (the last
    query blocks) first, so that no program starts late on a long tile (a persistent schedule, as in FlashAttention-3
    and Triton's persistent matmul tutorial). Grid: (cdiv(Tq, BLOCK_M), B * Hq), or (programs,) when
    PERSISTENT."""
    batch_heads = dims[0] * dims[1]
    if PERSISTENT:
        first, tiles, step = tl.program_id(0), tl.cdiv(dims[3], BLOCK_M) * batch_heads, tl.num_programs(0)
    else:  # one iteration, which the compiler folds away
        first, tiles, step = 0, 1, 1
    for tile in tl.range(first, tiles, step):
        if PERSISTENT:
            query_block = tl.cdiv(dims[3], BLOCK_M) - 1 - tile // batch_heads
            batch_head = tile % batch_heads
        else:  # causal rows near the end see the most keys: those programs start first (FlashAttention-2, 3.3)
            query_block = tl.num_programs(0) - 1 - tl.program_id(0)
            batch_head = tl.program_id(1)
        _forward_tile(query_block, batch_head, Q, K, V, O, LSE, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
                      SEQUSED_K, SINKS, DESCALE, mods, blocks, q_strides, k_strides, v_strides, o_strides,
                      mask_strides, alibi_strides, dims, bounds, scales, SPEC, BLOCK_M, BLOCK_N, TMA)


@triton.jit
def _forward_tile(
        query_block, batch_head, Q, K, V, O, LSE, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, SINKS,
        DESCALE, mods, blocks, q_strides, k_strides, v_strides, o_strides, mask_strides, alibi_strides, dims, bounds,
        scales, SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """The forward of one tile: query rows [query_block * BLOCK_M, + BLOCK_M) of (batch, head) = batch_head."""
    start_m, batch, head, kv_head = _query_program(query_block, batch_head, dims[1], dims[2], BLOCK_M)
    memory_batch, q_start, k_start, seq = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, batch, dims, bounds,
                                                    SPEC)
    seqlen_q, seqlen_k, causal_offset, window_offset = seq[:4]
    if SPEC.VARLEN:  # a block past its sequence's end (the grid is sized for the longest) visits no key
        seqlen_k = tl.where(start_m < seqlen_q, seqlen_k, 0)
        seq = (seqlen_q, seqlen_k, causal_offset, window_offset, seq[4], seq[5])
    Q += _head(q_strides, memory_batch, head, q_start)
    K += _head(k_strides, memory_batch, kv_head, k_start)
    V += _head(v_strides, memory_batch, kv_head, k_start)
    O += _head(o_strides, memory_batch, head, q_start)
    LSE += (memory_batch * dims[1] + head) * dims[3] + q_start
    if SPEC.FP8:  # float8 queries and keys: q . k = (q8 . k8) * q_descale * k_descale, one factor on the scales
        qk_descale = tl.load(DESCALE + batch * (dims[1] // dims[2]) + kv_head)
        scales = (scales[0] * qk_descale, scales[1] * qk_descale, scales[2], scales[3], scales[4])
    scoring = _scoring(MASK, ALIBI, mods, mask_strides, alibi_strides, batch, head, scales, SPEC)
    dropping = _dropping(SEED, batch_head, scales, SPEC)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, d_mask, offs_dv, dv_mask = head_columns(SPEC)
    d_masks = (d_mask, dv_mask)
    q_mask = (offs_m[:, None] < seqlen_q) & d_mask[None, :]
    q = tl.load(_tile(Q, offs_m, offs_d, q_strides[2], q_strides[3]), mask=q_mask, other=0.0)
    k_source = _row_source(K, seqlen_k, k_strides[2], k_strides[3], SPEC.HEAD_DIM, BLOCK_N, SPEC.BLOCK_D, TMA=TMA)
    v_source = _row_source(V, seqlen_k, v_strides[2], v_strides[3], SPEC.HEAD_DIM_V, BLOCK_N, SPEC.BLOCK_DV, TMA=TMA)
    kv_row_strides = (k_strides[2], v_strides[2])

    BLOCK_DV: tl.constexpr = SPEC.BLOCK_DV
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    row_sum, row_max = softmax_start(SINKS, head, BLOCK_M, SPEC.SINKS)
    lo, full_start, full_end, hi = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, window_offset,
                                              BLOCK_M, BLOCK_N, CAUSAL=SPEC.CAUSAL, WINDOW=SPEC.WINDOW)
    if SPEC.CHUNK:
        lo, full_start, full_end, hi = _chunk_key_range((lo, full_start, full_end, hi), start_m, seqlen_q, seq[4],
                                                        seq[5], BLOCK_M, BLOCK_N)
        seq = _chunk_bounds(seq, offs_m, SPEC, FIXED_ROWS=True)
    if SPEC.SPARSE_Q:  # the key blocks a block mask lists: full ones without a mask, then partial ones
        for full in tl.static_range(2):
            count, indices = _block_list(blocks, batch, head, start_m // SPEC.SPARSE_Q, FULL=full == 0)
            for index in range(count):
                start_n = tl.load(indices + index) * SPEC.SPARSE_KV
                acc, row_sum, row_max = _forward_blocks(
                    acc, row_sum, row_max, q, offs_m, d_masks, k_source, v_source, kv_row_strides, seq, scoring,
                    dropping, start_n, tl.minimum(start_n + SPEC.SPARSE_KV, seqlen_k), SPEC, BLOCK_N,
                    MASKED=full == 1, TMA=TMA)
    else:  # key blocks in three stages: the window's left edge (masked), the keys every row sees (no mask), the
        # diagonal and the end of the keys (masked)
        if SPEC.WINDOW or SPEC.CHUNK:
            acc, row_sum, row_max = _forward_blocks(acc, row_sum, row_max, q, offs_m, d_masks, k_source, v_source,
                                                    kv_row_strides, seq, scoring, dropping, lo, full_start, SPEC,
                                                    BLOCK_N, MASKED=True, TMA=TMA)
        acc, row_sum, row_max = _forward_blocks(acc, row_sum, row_max, q, offs_m, d_masks, k_source, v_source,
                                                kv_row_strides, seq, scoring, dropping, full_start, full_end, SPEC,
                                                BLOCK_N, MASKED=False, TMA=TMA)
        acc, row_sum, row_max = _forward_blocks(acc, row_sum, row_max, q, offs_m, d_masks, k_source, v_source,
                                                kv_row_strides, seq, scoring, dropping, full_end, hi, SPEC, BLOCK_N,
                                                MASKED=True, TMA=TMA)

    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    out = acc / row_sum[:, None]
    if SPEC.FP8:  # the weights went through float8 times FP8_P_SCALE (_forward_blocks), the values times their descale
        out *= tl.load(DESCALE + (dims[0] + batch) * (dims[1] // dims[2]) + kv_head) / FP8_P_SCALE
    lse = tl.where(empty, float("inf"), (row_max + tl.log2(row_sum)) / LOG2E)
    tl.store(LSE + offs_m, lse, mask=offs_m < seqlen_q)
    o_mask = (offs_m[:, None] < seqlen_q) & dv_mask[None, :]
    tl.store(_tile(O, offs_m, offs_dv, o_strides[2], o_strides[3]), out.to(O.dtype.element_ty), mask=o_mask)


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
def _dkdv_blocks(dk, dv, k, v, key_rows, columns, q_source, do_source, qdo_strides, LSE, DELTA, seq,
                 scoring, dropping, DQ_ACC, dq_acc_strides, softmax_scale, start, stop, SPEC: tl.constexpr,
                 BLOCK_M: tl.constexpr, MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr):
    """Adds to dk (BLOCK_N, BLOCK_D) and dv (BLOCK_N, BLOCK_DV) the terms of the query rows [start, stop) of one
    head, whose q and dO come from q_source and do_source (see _query_rows; qdo_strides: q's row and column
    strides, then dO's; columns: head_columns' four); with
    ATOMIC_DQ also adds this key block's share of dq to DQ_ACC with atomics. Works on the transposed tile (keys x
    queries) so that both products take their operands as loaded. Query rows past Tq load as zeros with lse
    +inf, so they add nothing; key rows past Tk are never stored."""
    offs_d, d_mask, offs_dv, dv_mask = columns
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < seq[0]
        q_mask = row_mask[:, None] & d_mask[None, :]
        do_mask = row_mask[:, None] & dv_mask[None, :]
        q = _query_rows(q_source, start_m, offs_m, offs_d, qdo_strides[0], qdo_strides[1], q_mask, TMA=TMA)
        lse = tl.load(LSE + offs_m, mask=row_mask, other=float("inf")) * LOG2E
        qk_t = tl.dot(k, tl.trans(q), input_precision=SPEC.INPUT_PRECISION)
        scores_t, scale, tanh_t = _scores(qk_t, offs_m[None, :], key_rows[:, None], seq, scoring, SPEC, MASKED)
        p_t = tl.exp2(scores_t * scale - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible(offs_m[None, :], key_rows[:, None], seq, SPEC, KEYS_MOVE=False), p_t, 0.0)
        do = _query_rows(do_source, start_m, offs_m, offs_dv, qdo_strides[2], qdo_strides[3], do_mask, TMA=TMA)
        keep_t = p_t > 0.0  # a placeholder unless DROPOUT
        dropped_p_t = p_t
        if SPEC.DROPOUT:
            keep_t = _kept(offs_m[None, :], key_rows[:, None], dropping)
            dropped_p_t = tl.where(keep_t, p_t * dropping[4], 0.0)
        dv = tl.dot(dropped_p_t.to(do.dtype), do, dv, input_precision=SPEC.INPUT_PRECISION)
        delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=SPEC.INPUT_PRECISION)
        dlogits_t, ds_t = _score_grads(p_t, dp_t, delta[None, :], tanh_t, keep_t, dropping[4], SOFTCAP=SPEC.SOFTCAP,
                                       DROPOUT=SPEC.DROPOUT)
        if SPEC.SCORE_MOD is not None:
            ds_t = _mod_grads(dlogits_t, tanh_t, offs_m[None, :], key_rows[:, None], seq, scoring, SPEC,
                              SPEC.SCORE_ARG_GRAD is not None)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=SPEC.INPUT_PRECISION)
        if ATOMIC_DQ:  # FlashAttention-2's backward: the 5th product, dq = dS k, summed over key blocks in float32
            dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=SPEC.INPUT_PRECISION) * softmax_scale
            tl.atomic_add(_tile(DQ_ACC, offs_m, offs_d, dq_acc_strides[2], dq_acc_strides[3]), dq, mask=q_mask,
                          sem="relaxed")
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, mods,
        blocks, q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides, dq_acc_strides, mask_strides,
        alibi_strides,
        dims, bounds, scales,
        SPEC: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head); loops over every query head of its group, so a grouped
    K/V head's gradient is summed in registers. With ATOMIC_DQ (the
    single-pass backward) it also adds dq, already scaled, into DQ_ACC (B, Hq, Tq, D) float32, zero-initialised,
    with atomics: 5 matrix products per (query block, key block) pair instead of the two-kernel backward's 7, at
    the price of an order of float32 additions that changes from run to run (else DQ_ACC is None). TMA (a tuning
    choice on Hopper and newer) loads q and dO through tensor descriptors. The rest as in the forward (no SINKS:
    the forward's lse holds the sinks). Grid: (cdiv(Tk, BLOCK_N), B * Hkv)."""
    num_heads, group_size = dims[1], dims[2]
    num_kv_heads = num_heads // group_size
    start_n = tl.program_id(0) * BLOCK_N
    batch = (tl.program_id(1) // num_kv_heads).to(tl.int64)
    kv_head = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    memory_batch, q_start, k_start, seq = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, batch, dims, bounds,
                                                    SPEC)
    seqlen_q, seqlen_k, causal_offset, window_offset = seq[:4]
    K += _head(k_strides, memory_batch, kv_head, k_start)
    V += _head(v_strides, memory_batch, kv_head, k_start)
    if SPEC.HEAD_DIM_V == SPEC.HEAD_DIM:  # dv is then laid out as dk (the launcher makes both): one address sum
        dv_strides = dk_strides
    DK += _head(dk_strides, memory_batch, kv_head, k_start)
    DV += _head(dv_strides, memory_batch, kv_head, k_start)

    key_rows = start_n + tl.arange(0, BLOCK_N)
    columns = head_columns(SPEC)
    offs_d, d_mask, offs_dv, dv_mask = columns
    k_mask, v_mask = _key_masks(key_rows, seq, d_mask, dv_mask, MASKED=True)
    k = tl.load(_tile(K, key_rows, offs_d, k_strides[2], k_strides[3]), mask=k_mask, other=0.0)
    v = tl.load(_tile(V, key_rows, offs_dv, v_strides[2], v_strides[3]), mask=v_mask, other=0.0)
    BLOCK_D: tl.constexpr = SPEC.BLOCK_D  # a shape needs a constexpr, not a field's plain int
    BLOCK_DV: tl.constexpr = SPEC.BLOCK_DV
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # A key block past its sequence's end (VARLEN: the grid is sized for the longest) visits no query.
    visited_q = seqlen_q
    if SPEC.VARLEN:
        visited_q = tl.where(start_n < seqlen_k, seqlen_q, 0)
    lo, full_start, full_end, hi = _query_range(start_n, visited_q, causal_offset, window_offset, BLOCK_M, BLOCK_N,
                                                CAUSAL=SPEC.CAUSAL, WINDOW=SPEC.WINDOW)
    if SPEC.CHUNK:
        lo, full_start, full_end, hi = _chunk_query_range((lo, full_start, full_end, hi), start_n, seq[4], seq[5],
                                                          BLOCK_M, BLOCK_N)
        seq = _chunk_bounds(seq, key_rows, SPEC, FIXED_ROWS=False)
    # Pointers to the group's first query head; each pass of the loop moves them one head on.
    head = kv_head * group_size
    Q += _head(q_strides, memory_batch, head, q_start)
    DO += _head(do_strides, memory_batch, head, q_start)
    if ATOMIC_DQ:
        DQ_ACC += _head(dq_acc_strides, memory_batch, head, q_start)
    LSE += (memory_batch * num_heads + head) * dims[3] + q_start
    DELTA += (memory_batch * num_heads + head) * dims[3] + q_start
    qdo_strides = (q_strides[2], q_strides[3], do_strides[2], do_strides[3])
    for _ in range(group_size):
        scoring = _scoring(MASK, ALIBI, mods, mask_strides, alibi_strides, batch, head, scales, SPEC)
        dropping = _dropping(SEED, batch * num_heads + head, scales, SPEC)
        q_source = Q
        do_source = DO
        if TMA:
            q_source = tl.make_tensor_descriptor(Q, [seqlen_q, SPEC.HEAD_DIM], [q_strides[2], 1],
                                                 [BLOCK_M, SPEC.BLOCK_D])
            do_source = tl.make_tensor_descriptor(DO, [seqlen_q, SPEC.HEAD_DIM_V], [do_strides[2], 1],
                                                  [BLOCK_M, SPEC.BLOCK_DV])
        if SPEC.SPARSE_Q:  # the query blocks a block mask lists for this key block: full, then partial ones
            for full in tl.static_range(2):
                count, indices = _block_list(blocks, batch, head, start_n // SPEC.SPARSE_KV, FULL=full == 0)
                for index in range(count):
                    start_m = tl.load(indices + index) * SPEC.SPARSE_Q
                    dk, dv = _dkdv_blocks(dk, dv, k, v, key_rows, columns, q_source, do_source, qdo_strides,
                                          LSE, DELTA, seq, scoring, dropping, DQ_ACC, dq_acc_strides, scales[1],
                                          start_m, tl.minimum(start_m + SPEC.SPARSE_Q, seqlen_q), SPEC, BLOCK_M,
                                          MASKED=full == 1, ATOMIC_DQ=ATOMIC_DQ, TMA=TMA)
        else:  # query rows in three stages: the diagonal (masked), the rows that see every key of the block (no
            # mask), the window's far edge (masked)
            dk, dv = _dkdv_blocks(dk, dv, k, v, key_rows, columns, q_source, do_source, qdo_strides, LSE,
                                  DELTA, seq, scoring, dropping, DQ_ACC, dq_acc_strides, scales[1], lo, full_start,
                                  SPEC, BLOCK_M, MASKED=True, ATOMIC_DQ=ATOMIC_DQ, TMA=TMA)
            dk, dv = _dkdv_blocks(dk, dv, k, v, key_rows, columns, q_source, do_source, qdo_strides, LSE,
                                  DELTA, seq, scoring, dropping, DQ_ACC, dq_acc_strides, scales[1], full_start,
                                  full_end, SPEC, BLOCK_M, MASKED=False, ATOMIC_DQ=ATOMIC_DQ, TMA=TMA)
            if SPEC.WINDOW or SPEC.CHUNK:
                dk, dv = _dkdv_blocks(dk, dv, k, v, key_rows, columns, q_source, do_source, qdo_strides, LSE,
                                      DELTA, seq, scoring, dropping, DQ_ACC, dq_acc_strides, scales[1], full_end,
                                      hi, SPEC, BLOCK_M, MASKED=True, ATOMIC_DQ=ATOMIC_DQ, TMA=TMA)
        Q += q_strides[1]
        DO += do_strides[1]
        if ATOMIC_DQ:
            DQ_ACC += dq_acc_strides[1]
        LSE += dims[3]
        DELTA += dims[3]
        head += 1
    tl.store(_tile(DK, key_rows, offs_d, dk_strides[2], dk_strides[3]), (dk * scales[1]).to(DK.dtype.element_ty),
             mask=k_mask)
    tl.store(_tile(DV, key_rows, offs_dv, dv_strides[2], dv_strides[3]), dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, offs_m, d_masks, k_source, v_source, kv_row_strides, seq, scoring, dropping,
               DBIAS, dbias_strides, start, stop, SPEC: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               BIAS_GRAD: tl.constexpr, TMA: tl.constexpr):
    """Adds to dq (BLOCK_M, BLOCK_D) the terms of the key blocks [start, stop), whose k and v come from k_source
    and v_source (see _rows; d_masks: (d_mask, dv_mask), see head_columns); with BIAS_GRAD also stores the logits'
    gradient of those blocks to DBIAS (one head's (Tq, Tk) matrix; dbias_strides its row and key strides)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        key_rows = start_n + offs_n
        k_mask, v_mask = _key_masks(key_rows, seq, d_masks[0], d_masks[1], MASKED)
        k = _rows(k_source, start_n, kv_row_strides[0], k_mask, TMA=TMA)
        v = _rows(v_source, start_n, kv_row_strides[1], v_mask, TMA=TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=SPEC.INPUT_PRECISION)
        scores, scale, tanh = _scores(qk, offs_m[:, None], key_rows[None, :], seq, scoring, SPEC, MASKED)
        p = tl.exp2(scores * scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], key_rows[None, :], seq, SPEC, KEYS_MOVE=True), p, 0.0)
        keep = p > 0.0  # a placeholder unless DROPOUT
        if SPEC.DROPOUT:
            keep = _kept(offs_m[:, None], key_rows[None, :], dropping)
        dp = tl.dot(do, tl.trans(v), input_precision=SPEC.INPUT_PRECISION)
        dlogits, ds = _score_grads(p, dp, delta[:, None], tanh, keep, dropping[4], SOFTCAP=SPEC.SOFTCAP,
                                   DROPOUT=SPEC.DROPOUT)
        if SPEC.SCORE_MOD is not None:
            ds = _mod_grads(dlogits, tanh, offs_m[:, None], key_rows[None, :], seq, scoring, SPEC, False)
        if BIAS_GRAD:
            tl.store(DBIAS + offs_m[:, None] * dbias_strides[0] + key_rows[None, :] * dbias_strides[1], dlogits,
                     mask=(offs_m[:, None] < seq[0]) & (key_rows[None, :] < seq[1]))
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=SPEC.INPUT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DBIAS, MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, mods, blocks,
        q_strides, k_strides, v_strides, do_strides, dq_strides, dbias_strides, mask_strides, alibi_strides,
        dims, bounds, scales,
        SPEC: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). With BIAS_GRAD it also writes the gradient of an
    additive mask, DBIAS (B, Hq, Tq, Tk) float32, zero-initialised (blocks never visited stay 0; else DBIAS is
    None). TMA (a tuning choice on Hopper and newer) loads k and v through tensor descriptors. The rest as in the
    forward (no SINKS: the forward's lse holds the sinks). Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
    # causal rows near the end see the most keys: those programs start first (FlashAttention-2, 3.3)
    start_m, batch, head, kv_head = _query_program(tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1),
                                                   dims[1], dims[2], BLOCK_M)
    memory_batch, q_start, k_start, seq = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, batch, dims, bounds,
                                                    SPEC)
    seqlen_q, seqlen_k, causal_offset, window_offset = seq[:4]
    if SPEC.VARLEN:  # as in the forward
        seqlen_k = tl.where(start_m < seqlen_q, seqlen_k, 0)
        seq = (seqlen_q, seqlen_k, causal_offset, window_offset, seq[4], seq[5])
    Q += _head(q_strides, memory_batch, head, q_start)
    K += _head(k_strides, memory_batch, kv_head, k_start)
    V += _head(v_strides, memory_batch, kv_head, k_start)
    DO += _head(do_strides, memory_batch, head, q_start)
    DQ += _head(dq_strides, memory_batch, head, q_start)
    if BIAS_GRAD:
        DBIAS += batch * dbias_strides[0] + head * dbias_strides[1]
    LSE += (memory_batch * dims[1] + head) * dims[3] + q_start
    DELTA += (memory_batch * dims[1] + head) * dims[3] + q_start
    scoring = _scoring(MASK, ALIBI, mods, mask_strides, alibi_strides, batch, head, scales, SPEC)
    dropping = _dropping(SEED, tl.program_id(1), scales, SPEC)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, d_mask, offs_dv, dv_mask = head_columns(SPEC)
    d_masks = (d_mask, dv_mask)
    row_mask = offs_m < seqlen_q
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(_tile(Q, offs_m, offs_d, q_strides[2], q_strides[3]), mask=q_mask, other=0.0)
    do = tl.load(_tile(DO, offs_m, offs_dv, do_strides[2], do_strides[3]), mask=row_mask[:, None] & dv_mask[None, :],
                 other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
    k_source = _row_source(K, seqlen_k, k_strides[2], k_strides[3], SPEC.HEAD_DIM, BLOCK_N, SPEC.BLOCK_D, TMA=TMA)
    v_source = _row_source(V, seqlen_k, v_strides[2], v_strides[3], SPEC.HEAD_DIM_V, BLOCK_N, SPEC.BLOCK_DV, TMA=TMA)
    kv_row_strides = (k_strides[2], v_strides[2])
    dbias_tile_strides = (dbias_strides[2], dbias_strides[3])

    BLOCK_D: tl.constexpr = SPEC.BLOCK_D  # a shape needs a constexpr, not a field's plain int
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_start, full_end, hi = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, window_offset,
                                              BLOCK_M, BLOCK_N, CAUSAL=SPEC.CAUSAL, WINDOW=SPEC.WINDOW)
    if SPEC.CHUNK:
        lo, full_start, full_end, hi = _chunk_key_range((lo, full_start, full_end, hi), start_m, seqlen_q, seq[4],
                                                        seq[5], BLOCK_M, BLOCK_N)
        seq = _chunk_bounds(seq, offs_m, SPEC, FIXED_ROWS=True)
    if SPEC.SPARSE_Q:  # the listed key blocks, as in the forward
        for full in tl.static_range(2):
            count, indices = _block_list(blocks, batch, head, start_m // SPEC.SPARSE_Q, FULL=full == 0)
            for index in range(count):
                start_n = tl.load(indices + index) * SPEC.SPARSE_KV
                dq = _dq_blocks(dq, q, do, lse, delta, offs_m, d_masks, k_source, v_source, kv_row_strides, seq,
                                scoring, dropping, DBIAS, dbias_tile_strides, start_n,
                                tl.minimum(start_n + SPEC.SPARSE_KV, seqlen_k), SPEC, BLOCK_N, MASKED=full == 1,
                                BIAS_GRAD=BIAS_GRAD, TMA=TMA)
    else:  # key blocks in three stages, as in the forward
        if SPEC.WINDOW or SPEC.CHUNK:
            dq = _dq_blocks(dq, q, do, lse, delta, offs_m, d_masks, k_source, v_source, kv_row_strides, seq, scoring,
                            dropping, DBIAS, dbias_tile_strides, lo, full_start, SPEC, BLOCK_N, MASKED=True,
                            BIAS_GRAD=BIAS_GRAD, TMA=TMA)
        dq = _dq_blocks(dq, q, do, lse, delta, offs_m, d_masks, k_source, v_source, kv_row_strides, seq, scoring,
                        dropping, DBIAS, dbias_tile_strides, full_start, full_end, SPEC, BLOCK_N, MASKED=False,
                        BIAS_GRAD=BIAS_GRAD, TMA=TMA)
        dq = _dq_blocks(dq, q, do, lse, delta, offs_m, d_masks, k_source, v_source, kv_row_strides, seq, scoring,
                        dropping, DBIAS, dbias_tile_strides, full_end, hi, SPEC, BLOCK_N, MASKED=True,
                        BIAS_GRAD=BIAS_GRAD, TMA=TMA)
    tl.store(_tile(DQ, offs_m, offs_d, dq_strides[2], dq_strides[3]),
             (dq * scales[1]).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def dropout_keep_kernel(SEED, KEEP, num_heads, seqlen_q, seqlen_k, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask the attention kernels draw, written out whole: KEEP (B, Hq, Tq, Tk) bool, contiguous. For
    tests and flash_attn_func(return_attn_probs=True) only. Grid: (cdiv(Tq, BLOCK_M), cdiv(Tk, BLOCK_N), B * Hq)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    head_index = tl.program_id(2).to(tl.int64)
    kept = _kept(rows[:, None], keys[None, :], (tl.load(SEED), tl.load(SEED + 1), head_index, dropout_p, 1.0))
    KEEP += head_index * seqlen_q * seqlen_k
    tl.store(KEEP + rows[:, None] * seqlen_k + keys[None, :], kept,
             mask=(rows[:, None] < seqlen_q) & (keys[None, :] < seqlen_k))


# ----------------------------------------------------------------------------------------------------------------
# Launchers. They trust their caller (gptfast.attention checks every argument once, at the edge) and launch by
# keyword: the tensors of the kernel and their strides, then the Call's arguments (attention_spec.describe).

def _tma_ready(t):
    """Whether the TMA forward may read each (batch, head) of a (B, H, T, D) tensor: 16-bit (float32 tiles spill
    with it), its last dim contiguous, its address and other strides multiples of 16 bytes (what TMA requires)."""
    step = 16 // t.element_size()
    return (t.element_size() == 2 and t.stride(3) == 1 and t.data_ptr() % 16 == 0
            and all(stride % step == 0 for stride in t.stride()[:3]))


def _allow_descriptors(device):
    """Tensor descriptors made inside a kernel live in global scratch memory that Triton asks its allocator for."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def _strides(t, bthd):
    """t's strides in the kernels' (B, H, T, D) order: t is a (B, T, H, D) tensor with bthd, else (B, H, T, D)."""
    strides = t.stride()
    return (strides[0], strides[2], strides[1], strides[3]) if bthd else strides


def _bhtd_shape(t, bthd):
    shape = t.shape
    return (shape[0], shape[2], shape[1], shape[3]) if bthd else shape


def _empty_rows(b, h, t, d, device, dtype, bthd, zeros=False):
    """A (B, H, T, D) tensor of (B, T, H, D) memory, the layout flash-attn returns (merging heads afterwards,
    transpose(1, 2).reshape, is free): the (B, T, H, D) tensor itself with bthd, else its (B, H, T, D) view made
    directly (an empty tensor transposed costs twice the host time). zeros: filled with 0."""
    if bthd:
        return (torch.zeros if zeros else torch.empty)((b, t, h, d), dtype=dtype, device=device)
    made = torch.empty_strided((b, h, t, d), (t * h * d, d, h * d, 1), dtype=dtype, device=device)
    return made.zero_() if zeros else made


class ForwardLaunch(NamedTuple):
    """One forward's launch but its tensors (forward_launch): the autotuned kernel, its grid, the Call's keyword
    arguments (with its optional tensors) and the output's dtype. Everything in it depends only on the call's
    signature (shapes, strides, dtypes, device, flags) and whether K and V may be read through TMA."""
    kernel: object
    grid: object
    kwargs: dict
    out_dtype: torch.dtype

    def run(self, q, k, v, bthd=False):
        """(out, lse) of q, k, v: (B, H, T, D) tensors, or with bthd (B, T, H, D) ones (flash-attn's layout, no
        transposes), out then (B, Tq, Hq, Dv) too; lse (B, Hq, Tq) float32."""
        batch, heads, seqlen_q = _bhtd_shape(q, bthd)[:3]
        out = _empty_rows(batch, heads, seqlen_q, v.shape[3], q.device, self.out_dtype, bthd)
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        # kernel.run(grid=...), what kernel[grid](...) calls, without the keyword arguments' second repacking
        self.kernel.run(grid=self.grid, warmup=False, Q=q, K=k, V=v, O=out, LSE=lse, q_strides=_strides(q, bthd),
                        k_strides=_strides(k, bthd), v_strides=_strides(v, bthd), o_strides=_strides(out, bthd),
                        **self.kwargs)
        return out, lse


def forward_launch(q, k, v, softmax_scale, features=Features(), out_dtype=None):
    """The ForwardLaunch of attention_forward's arguments."""
    call = describe(q, k, v, features, softmax_scale)
    batch, rows, keys = call.shape
    heads = q.shape[1]
    arch = device_arch(q.device)
    variants = forward_variants(arch, call.spec.has_features, _tma_ready(k) and _tma_ready(v))
    if variants != ("pointers",):
        _allow_descriptors(q.device)
    kernel = autotuned(attention_forward_kernel, "forward", arch, q.dtype, rows, keys, call.spec, variants)
    device = q.device

    def grid(meta):
        query_blocks = cdiv(rows, meta["BLOCK_M"])
        if meta["PERSISTENT"]:
            return (min(query_blocks * batch * heads, multiprocessors(device)),)
        return (query_blocks, batch * heads)
    return ForwardLaunch(kernel, grid, call.kwargs, out_dtype or q.dtype)


def attention_forward(q, k, v, softmax_scale, features=Features(), out_dtype=None):
    """Returns (out, lse): out (B, Hq, Tq, Dv) in out_dtype (default q's), lse (B, Hq, Tq) float32. See the module
    docstring."""
    return forward_launch(q, k, v, softmax_scale, features, out_dtype).run(q, k, v)


class BackwardLaunch(NamedTuple):
    """One backward's launches but their tensors (backward_launch): the delta kernel's grid, heads, rows and
    constexprs, the variant (single_pass, else two_kernel), its kernels as (autotuned kernel, grid) pairs (the
    dk/dv kernel's, then the dq kernel's for two_kernel), and the keyword arguments both take from the Call (not
    SINKS, which the forward's lse holds, nor DESCALE: FP8 runs the forward only). Like ForwardLaunch, it depends
    only on the call's signature, the load variants (TMA or not) and the variant chosen."""
    delta: tuple
    single_pass: bool
    kernels: tuple
    kwargs: dict

    def run(self, grad_out, grad_lse, q, k, v, out, lse, mask_grad=False, flex=None, bthd=False):
        """(dq, dk, dv, dmask, delta): dq, dk, dv like q, k, v (with bthd all of them (B, T, H, D), else
        (B, H, T, D)), dmask as attention_backward's, delta (B, Hq, Tq) float32 (the delta kernel's)."""
        delta = torch.empty_like(lse)
        grid, heads, seqlen_q, constexprs = self.delta
        attention_backward_delta_kernel[grid](out, grad_out, grad_lse, delta, *_strides(out, bthd),
                                              *_strides(grad_out, bthd), heads, seqlen_q, **constexprs)
        inputs = dict(Q=q, K=k, V=v, DO=grad_out, LSE=lse, DELTA=delta, q_strides=_strides(q, bthd),
                      k_strides=_strides(k, bthd), v_strides=_strides(v, bthd),
                      do_strides=_strides(grad_out, bthd), **self.kwargs)
        q_shape = _bhtd_shape(q, bthd)
        dq_acc = _empty_rows(*q_shape, q.device, torch.float32, bthd, zeros=True) if self.single_pass else None
        dk, dv = self._dkdv(inputs, k, v, dq_acc, flex, bthd)
        if self.single_pass:
            return dq_acc.to(q.dtype), dk, dv, None, delta
        dq = _empty_rows(*q_shape, q.device, q.dtype, bthd)
        dmask = (torch.zeros((*q_shape[:3], _bhtd_shape(k, bthd)[2]), dtype=torch.float32, device=q.device)
                 if mask_grad else None)
        kernel, grid = self.kernels[1]
        kernel.run(grid=grid, warmup=False, DQ=dq, DBIAS=dmask, dq_strides=_strides(dq, bthd),
                   dbias_strides=dmask.stride() if mask_grad else (0, 0, 0, 0), **inputs, BIAS_GRAD=mask_grad)
        return dq, dk, dv, dmask, delta

    def _dkdv(self, inputs, k, v, dq_acc, flex, bthd):
        """(dk, dv) from the dk/dv kernel; with dq_acc (float32 zeros like q) it also adds dq there: the single
        pass."""
        dk = _empty_rows(*_bhtd_shape(k, bthd), k.device, k.dtype, bthd)
        dv = _empty_rows(*_bhtd_shape(v, bthd), v.device, v.dtype, bthd)
        if self.kwargs["SPEC"].SEQUSED_K:  # keys past a sequence's seqused_k belong to none: never written, zero
            dk.zero_()
            dv.zero_()
        if flex:  # the dk/dv kernel walks the query blocks of each key block
            inputs = {**inputs, "blocks": block_lists(flex.q_blocks)}
        kernel, grid = self.kernels[0]
        kernel.run(grid=grid, warmup=False, DK=dk, DV=dv, DQ_ACC=dq_acc, dk_strides=_strides(dk, bthd),
                   dv_strides=_strides(dv, bthd),
                   dq_acc_strides=_strides(dq_acc, bthd) if dq_acc is not None else (0, 0, 0, 0), **inputs,
                   ATOMIC_DQ=dq_acc is not None)
        return dk, dv


def _backward_variant(variant, call, arch, q, kv_heads, loads):
    """The BackwardLaunch of one variant for a described call on q (B, Hq, Tq, D) (its kernels' autotuners and
    grids)."""
    batch, rows, keys = call.shape
    dtype, heads, seqlen_q = q.dtype, q.shape[1], q.shape[2]
    block = delta_block(call.spec.BLOCK_DV)  # the delta kernel runs over q's rows (packed ones too)
    delta = ((cdiv(seqlen_q, block), q.shape[0] * heads), heads, seqlen_q,
             dict(HEAD_DIM=call.spec.HEAD_DIM_V, BLOCK_D=call.spec.BLOCK_DV, BLOCK_M=block, maxnreg=MAX_REGISTERS))
    single_pass = variant == "single_pass"
    dkdv = autotuned(attention_backward_dkdv_kernel, "backward_single_pass" if single_pass else "backward_dkdv",
                     arch, dtype, rows, keys, call.spec, loads)
    kernels = [(dkdv, lambda meta: (cdiv(keys, meta["BLOCK_N"]), batch * kv_heads))]
    if not single_pass:
        dq = autotuned(attention_backward_dq_kernel, "backward_dq", arch, dtype, rows, keys, call.spec, loads)
        kernels.append((dq, lambda meta: (cdiv(rows, meta["BLOCK_M"]), batch * heads)))
    kwargs = {name: value for name, value in call.kwargs.items() if name not in ("SINKS", "DESCALE")}
    return BackwardLaunch(delta, single_pass, tuple(kernels), kwargs)


def backward_launch(grad_out, grad_lse, q, k, v, out, lse, softmax_scale, features=Features(), mask_grad=False):
    """The BackwardLaunch of attention_backward's arguments: the two-kernel or the single-pass variant, whichever
    ran faster for this kind of call (timed on these tensors the first time; attention_tuning's docstring)."""
    call = describe(q, k, v, features, softmax_scale)
    arch = device_arch(q.device)
    loads = backward_loads(arch, call.spec.has_features, all(_tma_ready(t) for t in (q, k, v, grad_out)))
    if loads != ("pointers",):
        _allow_descriptors(q.device)
    choices = backward_choices(arch, call.spec.tile_dim, features.deterministic, mask_grad)
    launches = {name: _backward_variant(name, call, arch, q, k.shape[1], loads) for name in choices}
    runs = {name: functools.partial(launch.run, grad_out, grad_lse, q, k, v, out, lse, mask_grad, features.flex)
            for name, launch in launches.items()}
    key = (arch, q.dtype, q.shape[1] // k.shape[1], call.spec, loads, length_bucket(call.shape[1]),
           length_bucket(call.shape[2]))
    return launches[fastest(key, runs, kernels=(attention_backward_dkdv_kernel, attention_backward_dq_kernel))]


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, softmax_scale, features=Features(),
                       mask_grad=False):
    """Returns (dq, dk, dv, dmask, dsinks): dq, dk, dv shaped and typed like their inputs; dmask, with mask_grad
    (an additive mask that requires grad), the gradient reaching each (b, h, i, j) logit as float32
    (B, Hq, Tq, Tk), to be summed over the mask's broadcast dims, else None; dsinks (Hq,) float32 with sinks,
    else None. From the forward's out and lse and the gradients of both (grad_lse: float32 (B, Hq, Tq),
    contiguous); backward_launch's variant."""
    launch = backward_launch(grad_out, grad_lse, q, k, v, out, lse, softmax_scale, features, mask_grad)
    dq, dk, dv, dmask, delta = launch.run(grad_out, grad_lse, q, k, v, out, lse, mask_grad, features.flex)
    return dq, dk, dv, dmask, _sinks_grad(features.sinks, lse, delta)


def _sinks_grad(sinks, lse, delta):
    """The sinks' gradient, float32 (Hq,), None without sinks. Head h's sink has weight exp(sink_h - lse) in each
    row and takes no value, so d loss / d sink_h = -sum over the batch and rows of weight * delta (delta =
    rowsum(dO * O) - dlse, the softmax backward's term; see attention_backward_delta_kernel)."""
    if sinks is None:
        return None
    return -(torch.exp(sinks[:, None] - lse) * delta).sum(dim=(0, 2))


def dropout_keep_mask(seed_offset, batch, num_heads, seqlen_q, seqlen_k, dropout_p):
    """The (B, Hq, Tq, Tk) bool keep mask that the kernels draw for seed_offset: the reference tests and
    return_attn_probs compare against."""
    keep = torch.empty((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.bool, device=seed_offset.device)
    grid = (cdiv(seqlen_q, 16), cdiv(seqlen_k, 16), batch * num_heads)
    dropout_keep_kernel[grid](seed_offset, keep, num_heads, seqlen_q, seqlen_k, dropout_p, BLOCK_M=16, BLOCK_N=16)
    return keep
