"""The attention core behind every public attention API (gptfast.attention, varlen, kvcache, hf): the custom ops
``gptfast::flash_attention`` and ``gptfast::flash_attention_backward`` with their autograd formula (so
``torch.compile(fullgraph=True)`` captures them without graph breaks; eager calls skip their dispatch,
gptfast.custom_ops), the input checks, the choice between the
kernels and PyTorch (``gptfast.backend``, and kernel_gap for what the kernels do not cover), and the PyTorch path
with the kernels' semantics. It imports torch only: Triton is imported by the first kernel call.
"""
import math
import operator

import torch
import torch.nn.functional as F

from gptfast import backend
from gptfast.checked import checked_once
from gptfast.custom_ops import custom_op
from gptfast.dtypes import dtype_gap
from gptfast.kernels import cuda_capability

# The same constants as gptfast.kernels.attention_spec, repeated so that the PyTorch path never imports Triton.
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2
MAX_HEAD_DIM = 512  # of queries and keys, and of values: the largest block the tuning tables hold
# Queries and keys of the decoding kernel: a 512-wide block and a tail (DeepSeek's absorbed MLA decoding: 576 and
# values 512; gptfast.kernels.decode.key_blocks)
DECODE_MAX_HEAD_DIM = 576
# Past this head dim (Gemma 4's global layers: 512) the tiles hold a 512-wide accumulator and q tile in 16 or 32 rows,
# and compile without spills only for 16-bit inputs, without dropout, chunks or gptfast.flex's mods (gptfast inspect).
FULL_FEATURE_HEAD_DIM = 256


def _empty_bthd(b, h, t, d, like):
    return torch.empty((b, t, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


def kernel_features(mask, alibi_slopes, sinks, seed_offset, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                    max_seqlen_k, causal, window_left, window_right, chunk, softcap, dropout_p, deterministic=False,
                    descale=None):
    """The kernels' attention_spec.Features from a custom op's flat arguments."""
    from gptfast.kernels.attention_spec import Features
    varlen = None if cu_seqlens_q is None else (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return Features(causal, (window_left, window_right), mask, alibi_slopes, softcap, dropout_p, seed_offset,
                    deterministic, varlen, sinks, chunk, seqused_k, descale=descale)


@custom_op("gptfast::flash_attention")
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                       seed_offset: torch.Tensor | None,
                       cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                       seqused_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: int,
                       window_left: int, window_right: int, chunk: int, softcap: float, dropout_p: float,
                       softmax_scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """sinks: None or float32 (Hq,), contiguous; chunk: 0 or Llama 4's chunk size (attention_spec.Features).
    deterministic is for the backward (saved with the other flags): the forward has no atomics. With
    cu_seqlens (varlen) q, k, v are (1, H, total, D), the sequences packed along T (seqused_k: None or int32
    (num_seqs,), the keys each uses); else the max lengths are unused."""
    from gptfast.kernels.attention import attention_forward
    features = kernel_features(mask, alibi_slopes, sinks, seed_offset, cu_seqlens_q, cu_seqlens_k, seqused_k,
                               max_seqlen_q, max_seqlen_k, causal, window_left, window_right, chunk, softcap,
                               dropout_p)
    return attention_forward(q, k, v, softmax_scale, features)


@flash_attention_op.register_fake
def _(q, k, v, mask, alibi_slopes, sinks, seed_offset, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
      max_seqlen_k, causal, window_left, window_right, chunk, softcap, dropout_p, softmax_scale, deterministic):
    b, h, t = q.shape[:3]
    return _empty_bthd(b, h, t, v.shape[3], q), q.new_empty((b, h, t), dtype=torch.float32)


@custom_op("gptfast::flash_attention_backward")
def flash_attention_backward_op(
        grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
        sinks: torch.Tensor | None, seed_offset: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_k: torch.Tensor | None, seqused_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
        causal: int, window_left: int, window_right: int, chunk: int, softcap: float, dropout_p: float,
        softmax_scale: float, deterministic: bool, mask_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask, dsinks); dmask is (B, Hq, Tq, Tk) float32 with mask_grad, dsinks (Hq,) float32 with
    sinks, else each empty."""
    from gptfast.kernels.attention import attention_backward
    features = kernel_features(mask, alibi_slopes, sinks, seed_offset, cu_seqlens_q, cu_seqlens_k, seqused_k,
                               max_seqlen_q, max_seqlen_k, causal, window_left, window_right, chunk, softcap,
                               dropout_p, deterministic)
    dq, dk, dv, dmask, dsinks = attention_backward(grad_out, grad_lse, q, k, v, out, lse, softmax_scale, features,
                                                   mask_grad)
    empty = lambda: q.new_empty(0, dtype=torch.float32)  # one each: a custom op's outputs may not alias
    return dq, dk, dv, empty() if dmask is None else dmask, empty() if dsinks is None else dsinks


@flash_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, mask, alibi_slopes, sinks, seed_offset, cu_seqlens_q, cu_seqlens_k,
      seqused_k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, chunk, softcap, dropout_p,
      softmax_scale, deterministic, mask_grad):
    b, h, t, d = q.shape
    dmask = q.new_empty((b, h, t, k.shape[2]) if mask_grad else (0,), dtype=torch.float32)
    dsinks = q.new_empty((h,) if sinks is not None else (0,), dtype=torch.float32)
    return _empty_bthd(*q.shape, q), _empty_bthd(*k.shape, k), _empty_bthd(*v.shape, v), dmask, dsinks


_SAVED_INPUTS = 10  # q, k, v, mask, alibi_slopes, sinks, seed_offset, cu_seqlens_q, cu_seqlens_k, seqused_k; flags


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.flags = inputs[_SAVED_INPUTS:]
    ctx.save_for_backward(*inputs[:_SAVED_INPUTS], out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, mask, alibi_slopes, sinks, seed_offset, cu_seqlens_q, cu_seqlens_k, seqused_k, out, lse = (
        ctx.saved_tensors)
    mask_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dmask, dsinks = flash_attention_backward_op(
        *output_grads(grad_out, grad_lse, out, lse), q, k, v, out, lse, mask, alibi_slopes, sinks, seed_offset,
        cu_seqlens_q, cu_seqlens_k, seqused_k, *ctx.flags, mask_grad)
    dmask = dmask.sum_to_size(mask.shape).to(mask.dtype) if mask_grad else None  # over the broadcast dims
    dsinks = dsinks.to(sinks.dtype) if ctx.needs_input_grad[5] else None
    return dq, dk, dv, dmask, None, dsinks, *([None] * (_SAVED_INPUTS - 6 + len(ctx.flags)))


def output_grads(grad_out, grad_lse, out, lse):
    """The gradients of an attention's out and lse as the backward kernels take them (zeros where none reached
    it; grad_lse float32, contiguous)."""
    # lse is an output users may differentiate (flash_attn_func(return_lse=True)); d lse / d scores = p.
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
    return torch.zeros_like(out) if grad_out is None else grad_out, grad_lse


def op_flags(causal, window, chunk, softcap, dropout_p, softmax_scale, deterministic):
    """The custom op's flags after its optional tensors, for a call of dense (not packed) sequences."""
    return 0, 0, causal, window[0], window[1], chunk, float(softcap), float(dropout_p), softmax_scale, bool(
        deterministic)


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def softmax_scale_for(head_dim, scale):
    """The softmax scale of a call: scale as a float, or 1 / sqrt(head_dim) (the attention paper's) when None."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def draw_dropout_seed(device):
    """The Philox seed and offset of one attention call's dropout: int64 (2,) on device, drawn from torch's
    generator of that device, so torch.manual_seed makes runs reproducible and each call draws anew (also under
    torch.compile and CUDA graphs, where it is a traced random op). Calling torch.manual_seed(s) and then this
    reproduces the draw of a call made right after torch.manual_seed(s)."""
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def check_inputs(query, key, value, enable_gqa):
    """Raises a clear error for inputs that no backend can run; shapes are (..., H, T, D)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., heads, seq_len, head_dim), got {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same number of dims, got {query.dim()}, "
                         f"{key.dim()} and {value.dim()}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype} and {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device} and "
                         f"{value.device}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"query, key and value must share their batch dims, got {tuple(query.shape[:-3])}, "
                         f"{tuple(key.shape[:-3])} and {tuple(value.shape[:-3])}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same head_dim, got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same seq_len, got {key.shape[-2]} and {value.shape[-2]}")
    if query.dim() >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv:
            raise ValueError(f"key and value must have the same number of heads, got {hk} and {hv}")
        if hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0):
            raise ValueError(f"query has {hq} heads and key/value {hk}: they must be equal, or (with enable_gqa="
                             f"True) query's a multiple of key's")


def check_mask(attn_mask, query, key):
    """A dense mask must be bool or floating and broadcast to (..., Hq, Tq, Tk)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, a CausalBias or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (False hides a key) or floating (added to the scores), got "
                        f"{attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    target = (*query.shape[:-1], key.shape[-2])
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, target)
    except RuntimeError:
        broadcast = None
    if broadcast != target:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., Hq, Tq, Tk) = "
                         f"{target}")


def window_pair(window_size):
    """flash-attn's window_size as a tuple of two Python ints: any pair of ints (a tuple, a list, a 1-dim integer
    tensor, NumPy ints), each -1 (unbounded) or >= 0."""
    values = window_size
    if isinstance(values, torch.Tensor):
        values = values.tolist() if values.dim() == 1 and not values.is_floating_point() else ()
    try:
        pair = tuple(operator.index(w) for w in values)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < -1:
        raise ValueError(f"window_size must be (left, right), each -1 (unbounded) or >= 0, got {window_size!r}")
    return pair


def chunk_size(attention_chunk):
    """flash-attn 3's attention_chunk as a Python int: 0 (no chunks) or the chunk size. Not a tensor: the checks
    that call this are paid once per signature (gptfast.checked), which a tensor's value is not part of."""
    try:
        chunk = -1 if isinstance(attention_chunk, torch.Tensor) else operator.index(attention_chunk)
    except TypeError:
        chunk = -1
    if chunk < 0:
        raise ValueError(f"attention_chunk must be an int, 0 (no chunks) or the chunk size >= 1, got "
                         f"{attention_chunk!r}")
    return chunk


def check_flash_options(batch, heads, device, dropout_p, window_size, softcap, alibi_slopes):
    """flash-attn's options, for batch sequences of heads query heads on device; returns the window as
    window_pair's (left, right)."""
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    window = window_pair(window_size)
    if not (isinstance(softcap, (int, float)) and softcap >= 0):
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap!r}")
    if alibi_slopes is None:
        return window
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be a float32 tensor, got "
                        f"{alibi_slopes.dtype if isinstance(alibi_slopes, torch.Tensor) else type(alibi_slopes)}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({heads},) or (batch, nheads) = ({batch}, "
                         f"{heads}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    return window


def check_sinks(sinks, heads, device):
    """Attention sinks: None, or a floating (Hq,) tensor on the queries' device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating tensor of one logit per query head, got "
                        f"{sinks.dtype if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must have shape (nheads,) = ({heads},), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}")


def compute_capability(device):
    """(major, minor) of a CUDA device, None for any other."""
    return cuda_capability(device) if device.type == "cuda" else None


def kernel_gap(q, v, softmax_scale, chunk=0, dropout_p=0.0, flex=False, decode=False, fp8=False):
    """Why the kernels cannot run this (already valid) call, or None when they can; flex: a gptfast.flex call,
    decode: one for the decoding kernel (flash_attn_with_kvcache, paged prefill), whose 512-wide tiles hold
    chunks; fp8: gptfast.fp8's forward of float8 e4m3 inputs, which needs head dims to 256 (other calls take 16-
    and 32-bit queries only). float8 values (v: the FP8 forward's, or a decoding call's caches) need sm_89 or
    newer. Worked out once per signature (gptfast.checked)."""
    return checked_once(_kernel_gap, q, v, softmax_scale, chunk, dropout_p, flex, decode, fp8,
                        compute_capability(q.device))


def _kernel_gap(q, v, softmax_scale, chunk, dropout_p, flex, decode, fp8, capability):
    if chunk > 0 and dropout_p > 0:  # attention_spec.Spec.chunked says why
        return "attention_chunk with dropout (the chunked tiles leave dropout out to fit in registers)"
    if v.dtype == torch.float8_e4m3fn and capability is not None and capability < (8, 9):
        # FP8 inputs, or a decoding call's float8 caches: Triton 3.6 compiles float8 e4m3 for sm_89 and newer only
        return "float8 e4m3 tensors on GPUs before sm_89 (Triton compiles float8 e4m3 from sm_89 on)"
    if fp8:
        if max(q.shape[-1], v.shape[-1]) > FULL_FEATURE_HEAD_DIM:
            return f"FP8 attention at head dims past {FULL_FEATURE_HEAD_DIM}"
    elif (gap := dtype_gap(("query", q))) is not None:
        return gap
    if capability is not None and capability < (8, 0):
        # Measured with `gptfast inspect --arch sm_75`: a 64 x 64 float16 tl.dot compiles to 2048 FFMA and no HMMA,
        # and backward tiles of head dim 128 spill hundreds of bytes even at 16 x 16; torch's SDPA uses the chip's
        # tensor cores.
        return "GPUs before sm_80 (Triton 3.6 compiles tl.dot there without tensor cores; PyTorch's SDPA is faster)"
    if not softmax_scale > 0:
        return f"softmax_scale {softmax_scale} (the kernels fold a positive scale into the softmax's max)"
    for name, head_dim, limit in (("head_dim", q.shape[-1], DECODE_MAX_HEAD_DIM if decode else MAX_HEAD_DIM),
                                  ("value head_dim", v.shape[-1], MAX_HEAD_DIM)):
        if head_dim > limit:
            return f"{name} {head_dim} (the kernels take up to {limit})"
    if max(q.shape[-1], v.shape[-1]) > FULL_FEATURE_HEAD_DIM:
        left_out = ("dropout" if dropout_p > 0 else "attention_chunk" if chunk > 0 and not decode else
                    "float32 inputs" if q.dtype == torch.float32 else "gptfast.flex's mods" if flex else None)
        if left_out is not None:
            return (f"{left_out} at head dims past {FULL_FEATURE_HEAD_DIM} (the 512-wide tiles spill with it: the "
                    f"kernels run 16-bit inputs there, without dropout, chunks or mods)")
    if q.numel() == 0 or v.numel() == 0:
        return "empty tensors"
    return None


def as_bhtd(t):
    """(..., H, T, D) -> (B, H, T, D), a view whenever the batch dims allow one."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.flatten(0, -4) if t.dim() > 4 else t


def kernel_sinks(sinks):
    """Sinks as the kernels read them: float32, contiguous, through a differentiable cast (None stays None)."""
    return None if sinks is None else sinks.float().contiguous()


def run_kernel(q, k, v, mask, alibi_slopes, causal, window, softcap, dropout_p, softmax_scale,
               deterministic=False, sinks=None, chunk=0):
    """Kernel path for (..., H, T, D) inputs already checked (v's D may differ); returns (out (..., Hq, Tq, Dv),
    lse (..., Hq, Tq), the dropout's seed_offset or None). The kernels read a mask broadcastable to
    (B, Hq, Tq, Tk) through its strides; only inputs with more than one batch dim make it 4-dim by a reshape,
    which may copy. sinks (Hq,) of any float dtype are read as float32 (a differentiable cast); chunk: 0 or the
    chunk size of chunked attention (attention_spec.Features)."""
    if mask is not None and q.dim() != 4:
        mask = as_bhtd(mask.expand(*q.shape[:-1], k.shape[-2]))
    elif mask is not None:
        mask = mask[(None,) * (4 - mask.dim())]
    seed_offset = draw_dropout_seed(q.device) if dropout_p > 0 else None
    four_dims = q.dim() == 4  # a reshape costs microseconds of host time even when it changes nothing
    out, lse = flash_attention_op(*((q, k, v) if four_dims else map(as_bhtd, (q, k, v))), mask, alibi_slopes,
                                  kernel_sinks(sinks), seed_offset, None, None, None,
                                  *op_flags(causal, window, chunk, softcap, dropout_p, softmax_scale, deterministic))
    if not four_dims:
        out, lse = out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])
    return out, lse, seed_offset


def flag_pattern(seqlen_q, seqlen_k, causal, window, device, chunk=0, shift=0):
    """(diagonal, hidden), both (Tq, Tk): diagonal[i, j] = j - (i + Tk - Tq + shift), 0 on the bottom-right
    diagonal (ALiBi's distance; shift: attention_spec.Features'); hidden[i, j] whether the causal mode, the window
    (left, right) and chunks of size chunk (when > 0: position i + Tk - Tq and key j in different chunks) hide key
    j from query i."""
    diagonal = (torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None]
                - (seqlen_k - seqlen_q + shift))
    left, right = window
    if causal != CAUSAL_NONE:
        right = 0
    offset = seqlen_k - seqlen_q + shift if causal == CAUSAL_TOP_LEFT else 0  # top-left: the diagonal is j = i
    hidden = torch.zeros_like(diagonal, dtype=torch.bool)
    if right >= 0:
        hidden |= diagonal + offset > right
    if left >= 0:
        hidden |= diagonal + offset < -left
    if chunk > 0:
        positions = torch.arange(seqlen_q, device=device)[:, None] + seqlen_k - seqlen_q
        hidden |= positions.div(chunk, rounding_mode="floor") != torch.arange(seqlen_k, device=device) // chunk
    return diagonal, hidden


def work_dtype(dtype):
    """The dtype PyTorch's paths compute attention in for inputs of dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_attention(q, k, v, causal, window, mask, softcap, alibi_slopes, dropout_p, softmax_scale, sinks=None,
                    chunk=0, shift=0):
    """PyTorch for what F.scaled_dot_product_attention cannot do (windows, softcapping, ALiBi, sinks, the lse),
    with the kernels' semantics, on (B, H, T, D) inputs: (out, lse, probs, kept), probs (B, Hq, Tq, Tk) being the
    softmax before dropout and kept its keep mask (None without dropout; torch's random numbers, not the
    kernels'). sinks: None or (Hq,), one learned logit per query head that joins every row's softmax denominator
    and takes no value (gpt-oss's s_aux); the lse then includes it. chunk, shift: see flag_pattern."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    work = work_dtype(q.dtype)
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    diagonal, hidden = flag_pattern(q.shape[-2], k.shape[-2], causal, window, q.device, chunk, shift)
    if alibi_slopes is not None:
        slopes = alibi_slopes.expand(q.shape[0], q.shape[1]).to(work)
        scores = scores - slopes[:, :, None, None] * diagonal.abs().to(work)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(work)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(scores, dim=-1)
    else:
        sink_column = sinks.to(work).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)
    sees_no_key = lse == float("-inf")  # exp(-inf - -inf) is NaN: such rows are 0 instead, as the kernel's
    probs = torch.exp(scores - lse[..., None]).masked_fill(sees_no_key[..., None], 0.0)  # NaN inputs stay NaN
    kept = None
    weights = probs
    if dropout_p > 0:
        kept = torch.rand_like(probs) >= dropout_p
        weights = probs * kept / (1 - dropout_p)
    out = (weights @ v.to(work)).to(q.dtype)
    return out, lse.float().masked_fill(sees_no_key, float("inf")), probs, kept


def attend(q, k, v, causal=CAUSAL_NONE, window=(-1, -1), mask=None, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
           softmax_scale=None, need_lse=False, need_keep=False, op="flash_attn_func", deterministic=False,
           sinks=None, chunk=0):
    """The path behind the flash-attn functions and the Hugging Face integration, for checked (B, H, T, D)
    inputs: the kernels, or PyTorch where they cannot run (F.scaled_dot_product_attention when it can express the
    call and no lse is needed). mask: None or bool/additive, broadcastable to (B, Hq, Tq, Tk). sinks: None or
    (Hq,) learned logits (see torch_attention); chunk: 0 or the chunk size of chunked attention (flag_pattern).
    Returns (out (B, Hq, Tq, Dv), lse (B, Hq, Tq) float32 or None, kept): kept is the dropout's keep mask
    (B, Hq, Tq, Tk) when need_keep and dropout_p > 0, else None."""
    softmax_scale = softmax_scale_for(q.shape[-1], softmax_scale)
    if backend.use_triton(op, q.device, kernel_gap(q, v, softmax_scale, chunk, dropout_p)):
        out, lse, seed_offset = run_kernel(q, k, v, mask, alibi_slopes, causal, window, softcap, dropout_p,
                                           softmax_scale, deterministic, sinks, chunk)
        kept = None
        if need_keep and dropout_p > 0:
            from gptfast.kernels.attention import dropout_keep_mask
            kept = dropout_keep_mask(seed_offset, *q.shape[:3], k.shape[2], float(dropout_p))
        return out, lse, kept
    return pytorch_attention(q, k, v, causal, window, mask, softcap, alibi_slopes, dropout_p, softmax_scale,
                             need_lse or need_keep, sinks, chunk)


def pytorch_attention(q, k, v, causal, window, mask, softcap, alibi_slopes, dropout_p, softmax_scale, need_lse,
                      sinks=None, chunk=0):
    """attend's PyTorch path, (out, lse or None, kept): F.scaled_dot_product_attention where it can express the
    call and no lse is needed, else torch_attention."""
    if need_lse or window != (-1, -1) or softcap > 0 or alibi_slopes is not None or (
            sinks is not None) or chunk > 0 or (mask is not None and causal != CAUSAL_NONE):
        out, lse, _, kept = torch_attention(q, k, v, causal, window, mask, softcap, alibi_slopes, dropout_p,
                                             softmax_scale, sinks, chunk)
        return out, lse, kept
    if causal == CAUSAL_BOTTOM_RIGHT:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(q.shape[-2], k.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale,
                                         is_causal=causal == CAUSAL_TOP_LEFT, enable_gqa=True)
    return out, None, None
