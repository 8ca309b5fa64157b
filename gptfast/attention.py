"""Drop-in fused attention on gptfast's Triton flash-attention kernels, the public face of the attention APIs:
torch's ``scaled_dot_product_attention`` (its exact signature) and flash-attn 2's ``flash_attn_func``,
``flash_attn_kvpacked_func``, ``flash_attn_qkvpacked_func``, ``flash_attn_varlen_func`` and its packed forms
(gptfast.varlen) and
``flash_attn_with_kvcache`` (gptfast.kvcache), their exact signatures, argument order included. What they share
(the custom ops, the checks, the PyTorch path) is gptfast.attention_core; which path a call takes (kernel or
PyTorch) is decided by ``gptfast.backend``.

What the kernels cover: float16, bfloat16 and float32 (float32 uses tf32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set); any head dim from 1 to 256, v's may differ from q's and k's
(DeepSeek's MLA: 192 and 128), and up to 512 for 16-bit inputs without dropout or chunks (attention_core.kernel_gap);
any sequence lengths; grouped-query attention; causal masks aligned top-left (torch's ``is_causal``,
``causal_upper_left``) or bottom-right (flash-attn's ``causal``, ``causal_lower_right``); sliding windows; chunks;
boolean and additive masks of any broadcastable shape (an additive one gets its gradient); ALiBi; logit
softcapping; learnable sinks; dropout on the attention weights; and a forward on float8 e4m3 inputs with flash-attn
3's descales (gptfast.fp8). Everything else (float64, head dims past 512) runs PyTorch under ``auto``, with a
warning once per reason, and raises under ``GPTFAST_BACKEND=triton``.
"""
import torch
import torch.nn.functional as F

from gptfast import backend
from gptfast.attention_core import (CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, attend, check_flash_options,
                                    check_inputs, check_mask, check_sinks, chunk_size, kernel_gap, run_kernel,
                                    softmax_scale_for, torch_attention, window_pair)
from gptfast.attention_plan import make_plan, plan_key, planned
from gptfast.checked import checked_once
from gptfast.fp8 import check_fp8, fp8_attention, fp8_descales, is_fp8_call, quantize_fp8
from gptfast.kvcache import flash_attn_with_kvcache
from gptfast.varlen import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

__all__ = ["scaled_dot_product_attention", "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache", "quantize_fp8"]


def _causal_mode(attn_mask, is_causal):
    """The kernel's causal mode for is_causal or a CausalBias mask (causal_upper_left, causal_lower_right); None
    for a dense mask. torch.nn.attention.bias takes a second to import, so only a call with a mask imports it."""
    if attn_mask is None:
        return CAUSAL_TOP_LEFT if is_causal else CAUSAL_NONE
    from torch.nn.attention.bias import CausalBias, CausalVariant
    if not isinstance(attn_mask, CausalBias):
        return None
    return CAUSAL_BOTTOM_RIGHT if attn_mask.variant == CausalVariant.LOWER_RIGHT else CAUSAL_TOP_LEFT


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, same signature and semantics.

    Args:
        query: (..., Hq, Tq, D); key: (..., Hkv, Tk, D); value: (..., Hkv, Tk, Dv). Any strides.
        attn_mask: None; ``causal_upper_left(Tq, Tk)`` or ``causal_lower_right(Tq, Tk)`` from
            ``torch.nn.attention.bias``; or a dense mask broadcastable to (..., Hq, Tq, Tk), boolean (False hides
            a key) or floating (added to the scores; it gets a gradient when it requires one), read through its
            strides with no copy for 4-dim inputs.
        dropout_p: dropout on the attention weights (as torch's, applied whatever the module's mode).
        is_causal: top-left causal mask (query i sees keys j <= i), as torch's.
        scale: softmax scale, default 1 / sqrt(D).
        enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention).
    Returns:
        (..., Hq, Tq, Dv) in query's dtype. A query row that sees no key (a mask hiding its whole row, or a
        bottom-right mask with Tq > Tk) is 0, as torch's SDPA gives it.
    """
    signature = plan_key(query, key, value, (-1, -1), ("scaled_dot_product_attention", attn_mask, dropout_p,
                                                       is_causal, scale, enable_gqa))
    if signature is not None and (out := planned(signature, query, key, value)) is not None:
        return out
    check_inputs(query, key, value, enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("pass either is_causal=True or attn_mask, not both")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    causal = _causal_mode(attn_mask, is_causal)
    dense = attn_mask if causal is None else None
    if dense is not None:
        check_mask(dense, query, key)
    elif attn_mask is not None and (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[-2], key.shape[-2]):
        raise ValueError(f"attn_mask is a causal bias for ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) "
                         f"but query and key have seq_len ({query.shape[-2]}, {key.shape[-2]})")
    softmax_scale = softmax_scale_for(query.shape[-1], scale)
    if not backend.use_triton("scaled_dot_product_attention", query.device,
                              kernel_gap(query, value, softmax_scale, dropout_p=dropout_p)):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out = run_kernel(query, key, value, dense, None, causal or CAUSAL_NONE, (-1, -1), 0.0, dropout_p,
                     softmax_scale)[0]
    if signature is not None and attn_mask is None and dropout_p == 0:
        make_plan(signature, "scaled_dot_product_attention", query, key, value, softmax_scale, causal)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, return_lse=False, sinks=None,
                    attention_chunk=0, q_descale=None, k_descale=None, v_descale=None, out_dtype=None):
    """flash-attn 2's ``flash_attn_func``, same signature and argument order, on gptfast's kernels.

    Args:
        q: (B, Tq, Hq, D); k: (B, Tk, Hkv, D); v: (B, Tk, Hkv, Dv), Dv = D or not (MLA: 192 and 128); Hq a
            multiple of Hkv: query head h reads key/value head h // (Hq // Hkv) (Hq = 8, Hkv = 2: heads 0-3 read
            0, 4-7 read 1). Any strides; nothing is copied.
        dropout_p: dropout on the attention weights (pass 0.0 in evaluation, as with flash-attn).
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right causal mask, as flash-attn >= 2.1: query i sees keys j <= i + Tk - Tq. For Tq = 2,
            Tk = 5 the mask is [[1 1 1 1 0], [1 1 1 1 1]]; for Tq = 5, Tk = 2 it is [[0 0], [0 0], [0 0],
            [1 0], [1 1]] (rows that see no key give 0).
        window_size: (left, right): query i sees keys j in [i + Tk - Tq - left, i + Tk - Tq + right]; -1 is
            unbounded. causal sets right to 0.
        softcap: > 0 caps the scores as softcap * tanh(scores / softcap) (Gemma 2).
        alibi_slopes: float32 (Hq,) or (B, Hq): adds -slope * |i + Tk - Tq - j| to the score of query i, key j.
        deterministic: the backward runs the two-kernel variant, without atomics, bit-reproducible run to run
            (so does every call under torch.use_deterministic_algorithms(True)); else the faster of it and the
            single-pass one (atomic adds of dq), timed on the device.
        return_attn_probs: also return the lse and S_dmask, (B, Hq, Tq, Tk) float32: the softmax weights with
            the dropped ones negated, as flash-attn returns them, for testing (computed in PyTorch from q and k).
        return_lse (keyword only, gptfast's): also return the lse, differentiable.
        sinks (keyword only): None, or a floating (Hq,) tensor of learned logits, one per query head, that join
            every row's softmax denominator and take no value (gpt-oss's attention sinks; the lse includes them);
            differentiable. A row that sees no key then gives 0 and lse = the sink.
        attention_chunk (keyword only, flash-attn 3's): 0, or a chunk size C: query i sees only keys j in the
            same chunk of C positions as i + Tk - Tq (Llama 4's chunked attention), on top of causal and
            window_size. With dropout too the call runs PyTorch (a warning under auto): the kernels' chunked
            tiles leave dropout out to fit in registers.
        q_descale, k_descale, v_descale, out_dtype (keyword only, flash-attn 3's FP8 forward, gptfast.fp8): with
            torch.float8_e4m3fn q, k and v, float32 (B, Hkv) descales (or scalar tensors; None for 1) that
            multiply them back to their real values; the output is out_dtype (default bfloat16). Forward only.
            gptfast.fp8.quantize_fp8 makes such inputs.
    Returns:
        out (B, Tq, Hq, Dv) in q's dtype (out_dtype for FP8 inputs); with return_attn_probs (out, lse, S_dmask), with
        return_lse (out, lse): lse (B, Hq, Tq) float32, natural log, +inf for a row that sees no key.
    """
    key = plan_key(q, k, v, window_size, ("flash_attn_func", dropout_p, softmax_scale, causal, softcap, alibi_slopes,
                                          deterministic, return_attn_probs, return_lse, sinks, attention_chunk,
                                          q_descale, k_descale, v_descale, out_dtype))
    if key is not None and (result := planned(key, q, k, v)) is not None:
        return result
    if isinstance(window_size, torch.Tensor):  # its values are the window: read before the checks' signature
        window_size = window_pair(window_size)
    window_size, chunk = checked_once(_check_flash_call, q, k, v, dropout_p, window_size, softcap, alibi_slopes,
                                      sinks, attention_chunk)
    descale = None
    if is_fp8_call(q, k, v, (q_descale, k_descale, v_descale)):
        out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
        check_fp8(q, k, v, dropout_p, return_attn_probs, out_dtype)
        descale = fp8_descales(q.shape[0], k.shape[2], q.device, q_descale, k_descale, v_descale)
    elif out_dtype is not None:
        raise ValueError("out_dtype applies to FP8 inputs only (the output is in q's dtype)")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    causal = CAUSAL_BOTTOM_RIGHT if causal else CAUSAL_NONE
    softmax_scale = softmax_scale_for(q.shape[-1], softmax_scale)
    options = dict(causal=causal, window=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                   chunk=chunk)
    if descale is not None:
        out, lse = fp8_attention(q, k, v, descale, out_dtype, **options, softmax_scale=softmax_scale)
        return (out.transpose(1, 2), lse) if return_lse else out.transpose(1, 2)
    out, lse, kept = attend(q, k, v, **options, dropout_p=dropout_p, softmax_scale=softmax_scale,
                            need_lse=return_lse or return_attn_probs, need_keep=return_attn_probs,
                            deterministic=deterministic)
    if key is not None and dropout_p == 0 and alibi_slopes is None and sinks is None and not return_attn_probs:
        make_plan(key, "flash_attn_func", q, k, v, softmax_scale, causal, window_size, softcap, chunk, deterministic,
                  return_lse, bthd=True)
    out = out.transpose(1, 2)
    if return_attn_probs:
        with torch.no_grad():
            probs = torch_attention(q, k, v, mask=None, dropout_p=0.0, softmax_scale=softmax_scale, **options)[2]
        return out, lse, probs if kept is None else torch.where(kept, probs, -probs)
    return (out, lse) if return_lse else out


def _check_flash_call(q, k, v, dropout_p, window_size, softcap, alibi_slopes, sinks, attention_chunk):
    """flash_attn_func's checks of its (B, T, H, D) inputs and options; returns (window (left, right), chunk)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (batch, seq_len, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    window = check_flash_options(q.shape[0], q.shape[2], q.device, dropout_p, window_size, softcap, alibi_slopes)
    check_sinks(sinks, q.shape[2], q.device)
    check_inputs(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return window, chunk_size(attention_chunk)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             q_descale=None, k_descale=None, v_descale=None, out_dtype=None):
    """flash-attn 2's ``flash_attn_kvpacked_func``: kv (B, Tk, 2, Hkv, D), keys then values, read as views.
    Everything else as flash_attn_func (the FP8 keywords too)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be a (batch, seq_len, 2, heads, head_dim) tensor, got "
                         f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, q_descale=q_descale, k_descale=k_descale,
                           v_descale=v_descale, out_dtype=out_dtype)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              q_descale=None, k_descale=None, v_descale=None, out_dtype=None):
    """flash-attn 2's ``flash_attn_qkvpacked_func``: qkv (B, T, 3, H, D), the fused projection's output, read as
    views (no copy). Everything else as flash_attn_func (the FP8 keywords too)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be a (batch, seq_len, 3, heads, head_dim) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, q_descale=q_descale, k_descale=k_descale,
                           v_descale=v_descale, out_dtype=out_dtype)
