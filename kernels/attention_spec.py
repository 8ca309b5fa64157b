"""One attention call, described once: what it computes (Features, from the public API), the compile-time switches
that select the kernels' code for it (Spec), and the keyword arguments every attention kernel takes for it (Call).

A Spec is passed to the kernels whole, as one tl.constexpr argument SPEC (a NamedTuple: Triton inlines each
field as a constant, so a switch that is off compiles out). It is the autotuners' key, picks the tuning table
(has_features) and is what `gptfast inspect` compiles (Spec.plain, Spec.every_feature). Adding a feature is a field
here, its runtime values in Call, and one helper in the kernels.
"""
from typing import NamedTuple

import torch

from gptfast.kernels import input_precision, padded_head_dim
from gptfast.kernels.attention_blocks import MASK_ADDITIVE, MASK_BOOLEAN, MASK_NONE
from gptfast.kernels.math import LOG2E

CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2


class Spec(NamedTuple):
    """The attention kernels' compile-time switches. HEAD_DIM is the real head dim, BLOCK_D its padded block;
    INPUT_PRECISION the dots' ("ieee", or "tf32" for float32 inputs when torch allows it). CAUSAL, WINDOW: the
    bounds (module docstring of gptfast.kernels.attention); MASK_KIND: MASK_NONE, MASK_BOOLEAN or MASK_ADDITIVE;
    ALIBI: per-head slopes; SOFTCAP: tanh softcapping; DROPOUT: on the weights; VARLEN: sequences packed along T;
    SINKS: one learned logit per head in every row's softmax denominator (gpt-oss)."""
    HEAD_DIM: int
    BLOCK_D: int
    INPUT_PRECISION: str = "ieee"
    CAUSAL: bool = False
    WINDOW: bool = False
    MASK_KIND: int = MASK_NONE.value
    ALIBI: bool = False
    SOFTCAP: bool = False
    DROPOUT: bool = False
    VARLEN: bool = False
    SINKS: bool = False

    @property
    def has_features(self):
        """Whether the call adds a feature past the bounds: a mask, ALiBi, softcapping, dropout, or packed
        sequences (VARLEN: its per-sequence offsets cost registers). Such calls take the feature tiles, which
        `gptfast inspect` compiles with every feature at once."""
        return bool(self.MASK_KIND or self.ALIBI or self.SOFTCAP or self.DROPOUT or self.VARLEN or self.SINKS)

    def absent(self):
        """The names of the optional tensors this spec never reads: the launchers pass them as None."""
        unused = {"MASK": not self.MASK_KIND, "ALIBI": not self.ALIBI, "SEED": not self.DROPOUT,
                  "CU_SEQLENS_Q": not self.VARLEN, "CU_SEQLENS_K": not self.VARLEN, "SINKS": not self.SINKS}
        return tuple(name for name, off in unused.items() if off)

    @classmethod
    def plain(cls, block_d, precision):
        """The plain causal call: GPT training's."""
        return cls(block_d, block_d, precision, CAUSAL=True)

    @classmethod
    def every_feature(cls, block_d, precision):
        """Every switch on at once (an additive mask): the most registers any call needs."""
        return cls(block_d, block_d, precision, CAUSAL=True, WINDOW=True, MASK_KIND=MASK_ADDITIVE.value, ALIBI=True,
                   SOFTCAP=True, DROPOUT=True, VARLEN=True, SINKS=True)


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
    softmax denominator and takes no value (gpt-oss's attention sinks); the lse includes it."""
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


def describe(q, k, features, softmax_scale):
    """The Call for q (B, Hq, Tq, D) and k (B, Hkv, Tk, D) (packed: B = 1, T the totals) with features. kwargs:
    the optional tensors (MASK, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, SINKS; None when absent), mask_strides (4) and
    alibi_strides (2) (0 where broadcast or absent), dims (batch, Hq, group size, Tq, Tk), bounds (causal_offset,
    window_offset, alibi_offset) and scales (softmax_scale * log2(e), softmax_scale, softcap, dropout_p,
    1 / (1 - dropout_p)), and SPEC."""
    num_heads, seqlen_q, head_dim = q.shape[1:]
    seqlen_k = k.shape[2]
    shape = launch_shape(q, k, features)
    left, right = features.window
    if features.causal != CAUSAL_NONE:
        right = 0
    mask, slopes = features.mask, features.alibi_slopes
    if mask is not None:  # views: a broadcast dim gets stride 0
        mask = mask.expand(shape[0], num_heads, seqlen_q, seqlen_k)
    if slopes is not None:
        slopes = slopes.expand(shape[0], num_heads)
    mask_kind = MASK_NONE if mask is None else MASK_BOOLEAN if mask.dtype == torch.bool else MASK_ADDITIVE
    spec = Spec(head_dim, padded_head_dim(head_dim), input_precision(q.dtype), CAUSAL=right >= 0, WINDOW=left >= 0,
                MASK_KIND=mask_kind.value, ALIBI=slopes is not None, SOFTCAP=features.softcap > 0,
                DROPOUT=features.dropout_p > 0, VARLEN=features.varlen is not None, SINKS=features.sinks is not None)
    cu_seqlens = features.varlen[:2] if features.varlen else (None, None)
    # Bottom-right offsets count Tk - Tq; with varlen the kernels add each sequence's own.
    offset = 0 if features.causal == CAUSAL_TOP_LEFT or features.varlen else seqlen_k - seqlen_q
    kwargs = dict(MASK=mask, ALIBI=slopes, SEED=features.seed_offset, CU_SEQLENS_Q=cu_seqlens[0],
                  CU_SEQLENS_K=cu_seqlens[1], SINKS=features.sinks,
                  mask_strides=mask.stride() if mask is not None else (0, 0, 0, 0),
                  alibi_strides=slopes.stride() if slopes is not None else (0, 0),
                  dims=(shape[0], num_heads, num_heads // k.shape[1], seqlen_q, seqlen_k),
                  bounds=(offset + max(right, 0), offset - max(left, 0), 0 if features.varlen else seqlen_k - seqlen_q),
                  scales=(softmax_scale * LOG2E.value, softmax_scale, features.softcap, features.dropout_p,
                          1.0 / (1.0 - features.dropout_p)),
                  SPEC=spec)
    return Call(spec, shape, kwargs)
