"""Device helpers of the attention kernels (gptfast.kernels.attention), most shared with the split-KV decoding
kernel (gptfast.kernels.decode): which (query, key) pairs the bounds let attend, a tile's scores with every
feature, one key block's step of the online softmax, and a flex call's mask mods (also evaluated per block by
gptfast.kernels.block_mask), a spec's head-dim columns, where a row's softmax starts (its sink) and
where a position's chunk starts."""
import triton
import triton.language as tl

from gptfast.kernels.math import LOG2E, tanh_f32

MASK_NONE, MASK_BOOLEAN, MASK_ADDITIVE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def visible_pairs(offs_m, offs_n, seqlen_k, causal_offset, window_offset, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr):
    """Which (query, key) pairs the bounds let attend: keys inside the sequence, not after i + causal_offset if
    CAUSAL, not before i + window_offset if WINDOW. offs_m and offs_n come in broadcast to the tile's shape."""
    mask = offs_n < seqlen_k
    if CAUSAL:
        mask = mask & (offs_n <= offs_m + causal_offset)
    if WINDOW:
        mask = mask & (offs_n >= offs_m + window_offset)
    return mask


@triton.jit
def tile_scores(qk, rows, keys, seqlen_q, seqlen_k, mask_tile, slope, alibi_offset, qk_scale, softcap,
                MASK_KIND: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr):
    """(scores, scale, tanh): a tile's logits in log2 units (for exp2) are scores * scale, from its dot products
    qk; with SOFTCAP, tanh is the tanh behind them (for the backward's derivative; else a placeholder). The order
    is flash-attn's and Gemma 2's: scale, softcap, then ALiBi and an additive mask, then a boolean mask. rows and
    keys come broadcast to the tile's shape; mask_tile points at the tile of the mask. Bounds are the caller's to
    apply.

    Plain attention returns qk itself with scale = qk_scale, so that callers fold the scale into the exponent's
    subtraction, one FFMA per score (qk * scale - max), as Triton's fused-attention tutorial does; that needs
    qk_scale > 0 (the launchers' callers check it). With a feature the scale is applied here and is 1.0."""
    scale = 1.0
    if SOFTCAP:
        tanh = tanh_f32(qk * (qk_scale / (softcap * LOG2E)))
        scores = tanh * (softcap * LOG2E)
    elif ALIBI or MASK_KIND != MASK_NONE:
        scores = qk * qk_scale
        tanh = scores
    else:
        scores = qk
        scale = qk_scale
        tanh = scores
    if ALIBI:  # -slope * |i + Tk - Tq - j| (flash-attn 2's ALiBi)
        scores -= (slope * LOG2E) * tl.abs(rows + alibi_offset - keys).to(tl.float32)
    if MASK_KIND != MASK_NONE:
        in_bounds = (rows < seqlen_q) & (keys < seqlen_k)
        if MASK_KIND == MASK_ADDITIVE:
            scores += tl.load(mask_tile, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
        else:
            scores = tl.where(tl.load(mask_tile, mask=in_bounds, other=0) != 0, scores, float("-inf"))
    return scores, scale, tanh


@triton.jit
def online_softmax(scores, scale, row_sum, row_max):
    """One key block's step of the online softmax (Milakov and Gimelshein, 2018): (p, correction, row_sum, row_max)
    for a block of logits scores * scale (log2 units) and the running sum and max of each row; the caller
    rescales its accumulator by correction and adds p @ v."""
    new_max = tl.maximum(row_max, tl.max(scores, 1) * scale)
    # A row with nothing visible yet keeps a max of -inf; subtract 0 instead so exp2 gives 0, not NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(scores * scale - shift[:, None])
    correction = tl.exp2(row_max - shift)
    return p, correction, row_sum * correction + tl.sum(p, 1), new_max


@triton.jit
def mask_mods(batch, head, q_idx, kv_idx, mask_args, MASK_MOD: tl.constexpr):
    """Whether each pair is visible under MASK_MOD: some term's mods all say True (see attention_spec.Spec).
    q_idx and kv_idx are index tiles that broadcast against each other; mask_args holds each mod's args tuple."""
    visible = q_idx < 0  # all False, the tile's shape once a term joins it
    for term in tl.static_range(len(MASK_MOD)):
        seen = q_idx >= 0
        for factor in tl.static_range(len(MASK_MOD[term])):
            seen = seen & MASK_MOD[term][factor](batch, head, q_idx, kv_idx, mask_args[term][factor])
        visible = visible | seen
    return visible


@triton.jit
def head_columns(SPEC: tl.constexpr):
    """(offs_d, d_mask, offs_dv, dv_mask): the padded head-dim columns of q and k and those of v and the output,
    and which of them are real; the same values when the two head dims agree."""
    BLOCK_D: tl.constexpr = SPEC.BLOCK_D  # a shape needs a constexpr, not a field's plain int
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < SPEC.HEAD_DIM
    offs_dv = offs_d
    dv_mask = d_mask
    if SPEC.BLOCK_DV != SPEC.BLOCK_D or SPEC.HEAD_DIM_V != SPEC.HEAD_DIM:
        BLOCK_DV: tl.constexpr = SPEC.BLOCK_DV
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_mask = offs_dv < SPEC.HEAD_DIM_V
    return offs_d, d_mask, offs_dv, dv_mask


@triton.jit
def softmax_start(SINKS, head, BLOCK_M: tl.constexpr, WITH_SINK: tl.constexpr):
    """(row_sum, row_max) that a row's online softmax starts from: nothing seen, or WITH_SINK the sink logit of
    head (a scalar, or a head per row), in log2 units (the running max), whose exp joins the sum; it takes no
    value, so acc starts at 0 still and a row that sees no key gets output 0 and lse = the sink."""
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if WITH_SINK:
        row_sum += 1.0
        row_max = row_sum * (tl.load(SINKS + head) * LOG2E)
    return row_sum, row_max


@triton.jit
def chunk_start(position, chunk):
    """The first position of the chunk that holds position (any sign: a floor division, not C's truncation)."""
    return tl.where(position >= 0, position // chunk, -((chunk - 1 - position) // chunk)) * chunk
