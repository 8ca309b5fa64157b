"""Drop-in fused attention: ``scaled_dot_product_attention`` (torch's signature) and ``flash_attn_func``
(flash-attn's layout), both running gptfast's Triton flash-attention kernels.

The kernels are registered as the custom ops ``gptfast::flash_attention`` and ``gptfast::flash_attention_backward``
with an autograd formula, so ``torch.compile(fullgraph=True)`` captures them without graph breaks. Which path a
call takes (kernel or PyTorch) is decided by ``gptfast.backend``.

What the kernels cover: float16, bfloat16 and float32 (float32 uses tf32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set); head dims that are multiples of 8 from 8 to 256, the same for
q, k and v; any sequence lengths; grouped-query attention; no mask, a top-left causal mask (``is_causal``,
``causal_upper_left``) or a bottom-right one (``causal_lower_right``). Everything else (a dense ``attn_mask``,
dropout, float64, other head dims) runs PyTorch under ``auto`` and raises under ``GPTFAST_BACKEND=triton``.
"""
import math

import torch
import torch.nn.functional as F

from gptfast import backend

# The same constants as gptfast.kernels.attention, repeated so that the PyTorch path never imports Triton.
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty_bthd(b, h, t, d, like):
    return torch.empty((b, t, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


@torch.library.custom_op("gptfast::flash_attention", mutates_args=())
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: int,
                     softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from gptfast.kernels.attention import attention_forward
    return attention_forward(q, k, v, causal, softmax_scale)


@_flash_attention.register_fake
def _(q, k, v, causal, softmax_scale):
    b, h, t, d = q.shape
    return _empty_bthd(b, h, t, d, q), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("gptfast::flash_attention_backward", mutates_args=())
def _flash_attention_backward(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: int,
                              softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptfast.kernels.attention import attention_backward
    return attention_backward(grad_out, grad_lse, q, k, v, out, lse, causal, softmax_scale)


@_flash_attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, causal, softmax_scale):
    return (_empty_bthd(*q.shape, q), _empty_bthd(*k.shape, k), _empty_bthd(*v.shape, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # lse is an output users may differentiate (flash_attn_func(return_lse=True)); d lse / d scores = p.
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _flash_attention_backward(grad_out, grad_lse, q, k, v, out, lse, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None


_flash_attention.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(query, key, value, enable_gqa):
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


def _causal_mode(attn_mask, is_causal):
    """The kernel's causal mode for is_causal or a CausalBias mask (causal_upper_left, causal_lower_right); None
    for a dense mask. torch.nn.attention.bias takes a second to import, so only a call with a mask imports it."""
    if attn_mask is None:
        return CAUSAL_TOP_LEFT if is_causal else CAUSAL_NONE
    from torch.nn.attention.bias import CausalBias, CausalVariant
    if not isinstance(attn_mask, CausalBias):
        return None
    return CAUSAL_BOTTOM_RIGHT if attn_mask.variant == CausalVariant.LOWER_RIGHT else CAUSAL_TOP_LEFT


def _kernel_gap(q, v, causal, dropout_p):
    """Why the kernels cannot run this (already valid) call, or None when they can."""
    if causal is None:
        return "a dense attn_mask (only None, is_causal, causal_upper_left and causal_lower_right)"
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (only float16, bfloat16, float32)"
    head_dim = q.shape[-1]
    if not (head_dim % 8 == 0 and 8 <= head_dim <= 256):
        return f"head_dim {head_dim} (only multiples of 8 from 8 to 256)"
    if v.shape[-1] != head_dim:
        return f"a value head_dim ({v.shape[-1]}) different from the query's ({head_dim})"
    if q.numel() == 0 or v.numel() == 0:
        return "empty tensors"
    return None


def _as_bhtd(t):
    """(..., H, T, D) -> (B, H, T, D), a view whenever the batch dims allow one."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.flatten(0, -4) if t.dim() > 4 else t


def _run_kernel(q, k, v, causal, softmax_scale):
    """Kernel path for (..., H, T, D) inputs already checked; returns (out (..., Hq, Tq, D), lse (..., Hq, Tq))."""
    out, lse = _flash_attention(_as_bhtd(q), _as_bhtd(k), _as_bhtd(v), causal, softmax_scale)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, same signature and semantics.

    Args:
        query: (..., Hq, Tq, D); key: (..., Hkv, Tk, D); value: (..., Hkv, Tk, Dv). Any strides.
        attn_mask: None, ``causal_upper_left(Tq, Tk)`` or ``causal_lower_right(Tq, Tk)`` from
            ``torch.nn.attention.bias`` (run in the kernel), or a dense boolean/additive mask (PyTorch only).
        dropout_p: dropout on the attention weights (PyTorch only).
        is_causal: top-left causal mask (query i sees keys j <= i), as torch's.
        scale: softmax scale, default 1 / sqrt(D).
        enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention).
    Returns:
        (..., Hq, Tq, Dv) in query's dtype. A query row that sees no key (bottom-right mask with Tq > Tk) is 0.
    """
    _check_inputs(query, key, value, enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("pass either is_causal=True or attn_mask, not both")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    seqlen_q, seqlen_k = query.shape[-2], key.shape[-2]
    causal = _causal_mode(attn_mask, is_causal)
    if attn_mask is not None and causal is not None:
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (seqlen_q, seqlen_k):
            raise ValueError(f"attn_mask is a causal bias for ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) "
                             f"but query and key have seq_len ({seqlen_q}, {seqlen_k})")
    if not backend.use_triton("scaled_dot_product_attention", query.device,
                              _kernel_gap(query, value, causal, dropout_p)):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    softmax_scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _run_kernel(query, key, value, causal, softmax_scale)[0]


def _torch_attention_with_lse(q, k, v, causal, softmax_scale):
    """PyTorch fallback of flash_attn_func(return_lse=True) on (B, H, T, D) inputs: SDPA returns no lse, so this
    forms the scores itself."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * softmax_scale
    if causal != CAUSAL_NONE:
        seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
        offset = seqlen_k - seqlen_q if causal == CAUSAL_BOTTOM_RIGHT else 0
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        visible = torch.arange(seqlen_k, device=q.device)[None, :] <= rows + offset
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    sees_no_key = lse == float("-inf")  # exp(-inf - -inf) is NaN: such rows are 0 instead, as the kernel's
    p = torch.exp(scores - lse[..., None]).masked_fill(sees_no_key[..., None], 0.0)  # NaN inputs stay NaN
    return (p.to(v.dtype) @ v), lse.masked_fill(sees_no_key, float("inf"))


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, return_lse=False):
    """flash-attn's ``flash_attn_func`` layout, on gptfast's kernels.

    Args:
        q: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D), Hq a multiple of Hkv. Any strides; nothing is copied.
        causal: bottom-right causal mask, as flash-attn >= 2.1: query i sees keys j <= i + Tk - Tq.
        softmax_scale: default 1 / sqrt(D).
        return_lse: also return the log-sum-exp of each query row's scores.
    Returns:
        out (B, Tq, Hq, D) in q's dtype, contiguous; with return_lse also lse (B, Hq, Tq) float32 (natural log,
        +inf for a row that sees no key). Both are differentiable.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (batch, seq_len, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    _check_inputs(q, k, v, enable_gqa=True)
    causal = CAUSAL_BOTTOM_RIGHT if causal else CAUSAL_NONE
    softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if backend.use_triton("flash_attn_func", q.device, _kernel_gap(q, v, causal, 0.0)):
        out, lse = _run_kernel(q, k, v, causal, softmax_scale)
    elif return_lse:
        out, lse = _torch_attention_with_lse(q, k, v, causal, softmax_scale)
    else:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(q.shape[-2], k.shape[-2]) if causal != CAUSAL_NONE else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
