"""One attention call, described once: what it computes (Features, from the public API), the compile-time switches
that select the kernels' code for it (Spec), and the keyword arguments every attention kernel takes for it (Call).

A Spec is passed to the kernels whole, as one tl.constexpr argument SPEC (a NamedTuple: Triton inlines each
field as a constant, so a switch that is off compiles out). It is the autotuners' key, picks the tuning table
(has_features) and is what `gptfast inspect` compiles (Spec.plain, Spec.every_feature, Spec.chunked). Adding a
feature is a field here, its runtime values in Call, and one helper in the kernels.
"""
from typing import NamedTuple

import torch

from gptfast.kernels import input_precision, padded_head_dim, remember
from gptfast.kernels.attention_blocks import MASK_ADDITIVE, MASK_BOOLEAN, MASK_NONE
from gptfast.kernels.math import LOG2E

CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2


class Spec(NamedTuple):
    """The attention kernels' compile-time switches. HEAD_DIM is the real head dim of queries and keys, BLOCK_D its
    padded block; HEAD_DIM_V and BLOCK_DV the same for values and the output (DeepSeek's MLA attends with 192-wide
    queries and keys and 128-wide values); INPUT_PRECISION the dots' ("ieee", or "tf32" for float32 inputs when
    torch allows it). CAUSAL, WINDOW: the bounds (module docstring of gptfast.kernels.attention); MASK_KIND:
    MASK_NONE, MASK_BOOLEAN or MASK_ADDITIVE; ALIBI: per-head slopes; SOFTCAP: tanh softcapping; DROPOUT: on the
    weights; VARLEN: sequences packed along T; SINKS: one learned logit per head in every row's softmax
    denominator (gpt-oss); CHUNK: each query sees only keys of its own chunk of positions (Llama 4's chunked
    attention, flash-attn 3's attention_chunk), a bound like WINDOW's; SEQUSED_K (with VARLEN): each sequence uses
    only its first SEQUSED_K[b] keys (flash-attn 3's seqused_k). BLOCK_D_TAIL (the decoding kernel only): queries
    and keys wider than BLOCK_D (512) have their columns past it in a second block of this width (DeepSeek's
    absorbed MLA decoding: 576 = 512 + 64, where one block would pad to 1024); 0 without. FP8: in the forward, q, k
    and v are float8 e4m3 with per-(batch, kv head) descales (flash-attn 3's FP8 forward, Features.descale); in the
    decoding kernel, the caches are (q keeps its dtype; gptfast.kvcache's k_scale and v_scale).

    Programmable attention (gptfast.flex; its calls set none of the switches above but the head dims and
    INPUT_PRECISION): SCORE_MOD, a @triton.jit score_mod(score, batch, head, q_idx, kv_idx, args) -> score;
    SCORE_GRAD, its derivative, score_grad(grad, score, batch, head, q_idx, kv_idx, args) -> the gradient
    reaching score; SCORE_ARG_GRAD, None or score_arg_grad(grad, score, batch, head, q_idx, kv_idx, args, grads),
    which adds the gradient of its tensor arguments into grads (atomics; run by the dk/dv kernel); MASK_MOD,
    None or a tuple of terms, each a tuple of @triton.jit mask_mod(batch, head, q_idx, kv_idx, args) -> bool: a
    key is visible where some term's mods all say True. SPARSE_Q, SPARSE_KV: the block mask's block sizes (0
    without one): the kernels visit only the blocks its lists name, evaluating MASK_MOD on the partial ones."""
    HEAD_DIM: int
    BLOCK_D: int
    HEAD_DIM_V: int
    BLOCK_DV: int
    INPUT_PRECISION: str = "ieee"
    CAUSAL: bool = False
    WINDOW: bool = False
    MASK_KIND: int = MASK_NONE.value
    ALIBI: bool = False
    SOFTCAP: bool = False
    DROPOUT: bool = False
    VARLEN: bool = False
    SINKS: bool = False
    CHUNK: bool = False
    SEQUSED_K: bool = False
    SCORE_MOD: object = None
    SCORE_GRAD: object = None
    SCORE_ARG_GRAD: object = None
    MASK_MOD: tuple = None
    SPARSE_Q: int = 0
    SPARSE_KV: int = 0
    BLOCK_D_TAIL: int = 0
    FP8: bool = False

    def __repr__(self):
        """The spec with each mod named by its source hash (a JITFunction's cache_key, its dependencies' included):
        Triton keys its on-disk cache by str() of a kernel's constexprs, where a jit function shows only its name,
        so a mod edited under the same name would otherwise get the kernel compiled from its old source."""
        return f"Spec({', '.join(f'{name}={_keyed(value)}' for name, value in zip(self._fields, self))})"

    @property
    def tile_dim(self):
        """The padded head dim that picks the tuning tiles: the wider of the two (a tile that holds a head dim of
        256 in q, k, v and the output holds 192 or 128 in some of them)."""
        return max(self.BLOCK_D, self.BLOCK_DV)

    @property
    def has_features(self):
        """Whether the call adds a feature past the causal and window bounds: a mask, ALiBi, softcapping, dropout,
        packed sequences (VARLEN: its per-sequence offsets cost registers), sinks, chunks (a column of each
        tile's chunk starts) or mods. Such calls take the feature tiles, which `gptfast inspect` compiles with
        every feature at once."""
        return bool(self.MASK_KIND or self.ALIBI or self.SOFTCAP or self.DROPOUT or self.VARLEN or self.SINKS
                    or self.CHUNK or self.modded)

    @property
    def modded(self):
        """Whether a score or mask mod or a block mask runs (gptfast.flex)."""
        return self.SCORE_MOD is not None or self.MASK_MOD is not None or self.SPARSE_Q > 0

    def absent(self):
        """The names of the optional tensors this spec never reads: the launchers pass them as None."""
        unused = {"MASK": not self.MASK_KIND, "ALIBI": not self.ALIBI, "SEED": not self.DROPOUT,
                  "CU_SEQLENS_Q": not self.VARLEN, "CU_SEQLENS_K": not self.VARLEN,
                  "SEQUSED_K": not self.SEQUSED_K, "SINKS": not self.SINKS, "DESCALE": not self.FP8,
                  "mods": not self.modded, "blocks": not self.SPARSE_Q}
        return tuple(name for name, off in unused.items() if off)

    @classmethod
    def dims(cls, block_d, precision, block_dv=None, **switches):
        """A spec of real head dims equal to their blocks (block_dv: block_d unless given), with switches."""
        block_dv = block_d if block_dv is None else block_dv
        return cls(block_d, block_d, block_dv, block_dv, precision, **switches)

    @classmethod
    def plain(cls, block_d, precision, block_dv=None):
        """The plain causal call: GPT training's."""
        return cls.dims(block_d, precision, block_dv, CAUSAL=True)

    @classmethod
    def every_feature(cls, block_d, precision, block_dv=None):
        """Every switch on at once (an additive mask) but CHUNK: the most registers any call without chunks
        needs."""
        return cls.dims(block_d, precision, block_dv, CAUSAL=True, WINDOW=True, MASK_KIND=MASK_ADDITIVE.value,
                        ALIBI=True, SOFTCAP=True, DROPOUT=True, VARLEN=True, SEQUSED_K=True, SINKS=True)

    @classmethod
    def chunked(cls, block_d, precision, block_dv=None):
        """Every switch with CHUNK that a chunked call may add (all but DROPOUT: the feature tiles sit at the
        register file's edge with every feature, and chunks and dropout together spilled on sm_80, sm_90 and
        sm_100, so such calls run PyTorch; see attention_core.kernel_gap)."""
        return cls.every_feature(block_d, precision, block_dv)._replace(CHUNK=True, DROPOUT=False)


def _keyed(value):
    """repr(value), with every jit function in it (nested tuples too) shown as name@cache_key."""
    if hasattr(value, "cache_key"):
        return f"{value.fn.__name__}@{value.cache_key}"
    if isinstance(value, tuple):
        return f"({', '.join(map(_keyed, value))})"
    return repr(value)


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
    max_seqlen_k) batch. sinks: None or float32 (Hq,), contiguous: a logit per head that joins every row's
    softmax denominator and takes no value (gpt-oss's attention sinks); the lse includes it. chunk: 0, or the
    chunk size C > 0: query i sees only keys j with (i + Tk - Tq) // C == j // C (bottom-right aligned, per
    sequence with varlen, as flash-attn 3's attention_chunk), on top of the causal mode and the window. seqused_k:
    None, or with varlen int32 (num_seqs,): sequence b uses keys [cu_seqlens_k[b], + seqused_k[b]) only, its Tk
    (flash-attn 3's), and the rows after them up to the next sequence's take no part. flex: None
    or the Flex of a gptfast.flex call (its mods and block lists), with every other field at its default.
    descale: None, or for float8 q, k and v (the forward only) float32 (2, B, Hkv), contiguous: per (batch or
    sequence, kv head) the product of q's and k's descales, then v's. shift: added to every query's position
    (query i sits at i + Tk - Tq + shift; the causal bound, the window and ALiBi's distance follow it; not with
    chunks): context parallelism's blocks (gptfast.distributed) pair one chunk's queries with another's keys."""
    causal: int = CAUSAL_NONE
    window: tuple = (-1, -1)
    mask: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed_offset: torch.Tensor | None = None
    deterministic: bool = False
    varlen: tuple | None = None
    sinks: torch.Tensor | None = None
    chunk: int = 0
    seqused_k: torch.Tensor | None = None
    flex: "Flex | None" = None
    descale: torch.Tensor | None = None
    shift: int = 0


class Flex(NamedTuple):
    """A gptfast.flex call's programmable parts. score_mod, score_grad, score_arg_grad and mask_mod as in Spec;
    score_args: the score mod's args tuple, score_grads: a float32 zero buffer like each floating tensor of
    score_args (the argument itself otherwise) for score_arg_grad; mask_args: per term of mask_mod, per mod, its
    args tuple. kv_blocks: None, or the block mask's lists of key blocks per query block, (num, indices,
    full_num, full_indices), int32, num (B', H', R) and indices (B', H', R, C) contiguous, B' in (1, B) and H' in
    (1, Hq) (1 broadcasts); q_blocks: the same lists of query blocks per key block (the dk/dv kernel's);
    block_size: (SPARSE_Q, SPARSE_KV), the lists' block sizes."""
    score_mod: object = None
    score_grad: object = None
    score_arg_grad: object = None
    mask_mod: tuple = None
    score_args: tuple = ()
    score_grads: tuple = ()
    mask_args: tuple = ()
    kv_blocks: tuple = None
    q_blocks: tuple = None
    block_size: tuple = (0, 0)


def block_lists(lists):
    """The kernels' `blocks` argument for lists (num, indices, full_num, full_indices) (see Flex): the four
    tensors, then the strides of a list's row index in batch and head (0 where broadcast) and the lists' length
    C; None for None."""
    if lists is None:
        return None
    batch, heads, rows, columns = lists[1].shape
    return (*lists, heads * rows if batch > 1 else 0, rows if heads > 1 else 0, columns)


def launch_shape(q, k, features):
    """(batch, Tq, Tk) that grids and tuning buckets count: the sequences and their longest lengths with varlen."""
    if features.varlen is not None:
        cu_seqlens_q, _, max_seqlen_q, max_seqlen_k = features.varlen
        return cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    return q.shape[0], q.shape[2], k.shape[2]


class Call(NamedTuple):
    """One call's description for the kernels: its spec, its (batch, Tq, Tk) for grids and tuning buckets, and
    kwargs, the keyword arguments that every attention kernel takes for it (see describe)."""
    spec: Spec
    shape: tuple
    kwargs: dict


def describe(q, k, v, features, softmax_scale):
    """The Call for q (B, Hq, Tq, D), k (B, Hkv, Tk, D) and v (B, Hkv, Tk, Dv) (packed: B = 1, T the totals) with
    features. kwargs: the optional tensors (MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, SINKS,
    DESCALE; None when absent), the flex call's mods and blocks (None without; see with_flex), mask_strides (4) and
    alibi_strides (2) (0 where broadcast or absent), dims (batch, Hq, group size, Tq, Tk), bounds (causal_offset,
    window_offset, alibi_offset, chunk size) and scales (softmax_scale * log2(e), softmax_scale, softcap, dropout_p,
    1 / (1 - dropout_p)), and SPEC.

    All but the tensors is worked out once per signature (_signature) and looked up after: a repeated call of the
    same shapes and flags only adds its own tensors (host work, benchmarks/bench_host.py)."""
    key = _signature(q, k, v, features, softmax_scale)
    call = _described.get(key)
    if call is None:
        call = _describe(q, k, v, features, softmax_scale)
        if key is None:  # a flex call: its mods and block lists are not in a signature
            return call
        call = remember(_described, key, call._replace(kwargs={**call.kwargs, **dict.fromkeys(_TENSORS)}))
    if features.mask is None and features.alibi_slopes is None and features.seed_offset is None and (
            features.varlen is None and features.sinks is None and features.seqused_k is None
            and features.descale is None):
        return call
    return call._replace(kwargs={**call.kwargs, **_tensors(features, call.shape, q.shape[1], q.shape[2], k.shape[2])})


_TENSORS = ("MASK", "ALIBI", "SEED", "CU_SEQLENS_Q", "CU_SEQLENS_K", "SEQUSED_K", "SINKS", "DESCALE")
_described = {}  # describe's Calls by _signature, their tensors None (a kept mask would never be freed)


def _signature(q, k, v, features, softmax_scale):
    """What a Call depends on but its tensors' values and addresses: shapes, dtypes and flags, and of the optional
    tensors whether each is there (mask and slopes: their dtype, shape and strides); None for a flex call.
    tests/test_host_path.py changes each Features field in turn to check that none is missing."""
    if features.flex is not None:
        return None
    mask, slopes, varlen = features.mask, features.alibi_slopes, features.varlen
    return (q.shape, k.shape, v.shape, input_precision(q.dtype), softmax_scale, features.causal, features.window,
            features.softcap, features.dropout_p, features.chunk,
            None if mask is None else (mask.dtype, mask.shape, mask.stride()),
            None if slopes is None else (slopes.shape, slopes.stride()),
            None if varlen is None else (varlen[0].shape, varlen[2], varlen[3]),
            features.seed_offset is None, features.sinks is None, features.seqused_k is None,
            features.descale is None, features.shift)


def _tensors(features, shape, num_heads, seqlen_q, seqlen_k):
    """The Call's optional tensors for features (see describe): a mask broadcast to (B, Hq, Tq, Tk) and slopes to
    (B, Hq) as views (a broadcast dim gets stride 0), shape being launch_shape's."""
    mask, slopes = features.mask, features.alibi_slopes
    cu_seqlens = features.varlen[:2] if features.varlen else (None, None)
    return dict(MASK=None if mask is None else mask.expand(shape[0], num_heads, seqlen_q, seqlen_k),
                ALIBI=None if slopes is None else slopes.expand(shape[0], num_heads), SEED=features.seed_offset,
                CU_SEQLENS_Q=cu_seqlens[0], CU_SEQLENS_K=cu_seqlens[1], SEQUSED_K=features.seqused_k,
                SINKS=features.sinks, DESCALE=features.descale)


def _describe(q, k, v, features, softmax_scale):
    """describe's Call, worked out."""
    num_heads, seqlen_q, head_dim = q.shape[1:]
    seqlen_k = k.shape[2]
    shape = launch_shape(q, k, features)
    left, right = features.window
    if features.causal != CAUSAL_NONE:
        right = 0
    tensors = _tensors(features, shape, num_heads, seqlen_q, seqlen_k)
    mask, slopes = tensors["MASK"], tensors["ALIBI"]
    mask_kind = MASK_NONE if mask is None else MASK_BOOLEAN if mask.dtype == torch.bool else MASK_ADDITIVE
    head_dim_v = v.shape[3]
    fp8 = features.descale is not None  # q . k's K is the head dim: float8's must be 32 or more
    spec = Spec(head_dim, padded_head_dim(head_dim, fp8), head_dim_v, padded_head_dim(head_dim_v),
                input_precision(q.dtype), CAUSAL=right >= 0, WINDOW=left >= 0, MASK_KIND=mask_kind.value,
                ALIBI=slopes is not None, SOFTCAP=features.softcap > 0, DROPOUT=features.dropout_p > 0,
                VARLEN=features.varlen is not None, SINKS=features.sinks is not None, CHUNK=features.chunk > 0,
                SEQUSED_K=features.seqused_k is not None, FP8=fp8)
    # Bottom-right offsets count Tk - Tq; with varlen the kernels add each sequence's own.
    diagonal = (0 if features.varlen else seqlen_k - seqlen_q) + features.shift
    offset = 0 if features.causal == CAUSAL_TOP_LEFT else diagonal
    kwargs = dict(**tensors, mods=None, blocks=None,
                  mask_strides=mask.stride() if mask is not None else (0, 0, 0, 0),
                  alibi_strides=slopes.stride() if slopes is not None else (0, 0),
                  dims=(shape[0], num_heads, num_heads // k.shape[1], seqlen_q, seqlen_k),
                  bounds=(offset + max(right, 0), offset - max(left, 0), diagonal, features.chunk),
                  scales=(softmax_scale * LOG2E.value, softmax_scale, features.softcap, features.dropout_p,
                          1.0 / (1.0 - features.dropout_p)),
                  SPEC=spec)
    if features.flex is not None:
        spec, kwargs = with_flex(spec, kwargs, features.flex)
    return Call(spec, shape, kwargs)


def with_flex(spec, kwargs, flex):
    """The spec and kwargs of a flex call: its mods as switches, their arguments as `mods` (score_args,
    score_grads, mask_args), its key-block lists as `blocks` (block_lists; the dk/dv launcher passes q_blocks')."""
    spec = spec._replace(SCORE_MOD=flex.score_mod, SCORE_GRAD=flex.score_grad, SCORE_ARG_GRAD=flex.score_arg_grad,
                         MASK_MOD=flex.mask_mod, SPARSE_Q=flex.block_size[0], SPARSE_KV=flex.block_size[1])
    mods = (flex.score_args, flex.score_grads, flex.mask_args) if spec.modded else None
    return spec, dict(kwargs, SPEC=spec, mods=mods, blocks=block_lists(flex.kv_blocks))
