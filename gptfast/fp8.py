"""FP8 attention: flash-attn 3's FP8 forward on gptfast's kernels, and the quantisation that feeds it.

q, k and v are float8 e4m3 (torch.float8_e4m3fn), each with a float32 descale per (batch, kv head): flash-attn 3's
q_descale, k_descale and v_descale, (B, Hkv) or a scalar tensor, None for 1 (flash_attn_varlen_func's: one per
(sequence, kv head), (num_seqs, Hkv)). The real values are the float8 ones times their descale; a query head
takes its kv head's q descale. The kernels fold q's and k's descales into the
softmax scale and v's into the output, so no dequantised copy is written, and run P @ V in float8 too (as
FlashAttention-3 does), the weights scaled by 256 first so that small ones stay normal numbers
(kernels/attention.FP8_P_SCALE), accumulating in float32. The output is bfloat16, or out_dtype. Forward only, as
flash-attn 3's: inputs that require grad, dropout and return_attn_probs raise. The kernels run it on sm_89 and newer
(Ada, Hopper, Blackwell) at head dims to 256; elsewhere ``auto`` warns once and runs PyTorch on the dequantised
inputs, and ``triton`` raises. (gptfast.kvcache's float8 caches, whose queries stay 16-bit, store with to_fp8.)
"""
import torch

from gptfast import backend
from gptfast.attention_core import kernel_features, kernel_gap, kernel_sinks, pytorch_attention
from gptfast.custom_ops import custom_op

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_fp8(x, per="head", kv_heads=None):
    """(x_fp8, descale) for x (B, T, H, D) of a floating dtype: x_fp8 float8 e4m3, scaled so that the largest
    magnitude of each (batch, head) (per="head"; with kv_heads, of each (batch, kv head) over the query heads that
    share it, as flash-attn 3's q_descale is) or of the whole tensor (per="tensor") lands on 448 (saturating, never
    inf); descale float32 (B, H), (B, kv_heads) or (), what multiplies x_fp8 back. The amax is one pass over x."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (batch, seq_len, heads, head_dim) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if per not in ("head", "tensor"):
        raise ValueError(f"per must be 'head' or 'tensor', got {per!r}")
    heads = x.shape[2]
    groups = heads if kv_heads is None else kv_heads
    if per == "head" and (not isinstance(groups, int) or groups < 1 or heads % groups):
        raise ValueError(f"kv_heads must divide the {heads} heads, got {kv_heads!r}")
    if per == "tensor":
        amax = torch.linalg.vector_norm(x, float("inf")).float()
        expanded = amax
    else:
        amax = torch.linalg.vector_norm(x.unflatten(2, (groups, heads // groups)), float("inf"), dim=(1, 3, 4))
        amax = amax.float()
        expanded = amax.repeat_interleave(heads // groups, dim=1)[:, None, :, None]
    # An all-zero slice gets descale 1 rather than 0 (0 / 0 would make NaNs).
    descale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    scale = torch.where(expanded > 0, FP8_MAX / expanded, 1.0)
    return to_fp8(x, scale), descale


def to_fp8(x, scale):
    """x * scale (computed in float32, scale broadcastable to x) rounded to float8 e4m3, saturating at +-448."""
    return (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def is_fp8_call(q, k, v, descales):
    """Whether a flash_attn_func call is an FP8 one: float8 inputs, or a descale given."""
    return any(isinstance(t, torch.Tensor) and t.dtype == FP8 for t in (q, k, v)) or any(
        d is not None for d in descales)


def check_fp8(q, k, v, dropout_p, return_attn_probs, out_dtype):
    """Raises a clear error for an FP8 call the forward-only FP8 path cannot take; q, k, v (B, T, H, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != FP8:
            raise TypeError(f"FP8 attention takes q, k and v all in torch.float8_e4m3fn (with their descales); "
                            f"{name} is {t.dtype}")
        if t.requires_grad:
            raise ValueError(f"FP8 attention is forward-only, as flash-attn 3's: {name} must not require grad")
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0 with FP8 inputs (FP8 attention is forward-only), got {dropout_p}")
    if return_attn_probs:
        raise ValueError("return_attn_probs is not available with FP8 inputs")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of torch.bfloat16, torch.float16, torch.float32, got {out_dtype!r}")


def fp8_descales(batch, kv_heads, device, q_descale, k_descale, v_descale):
    """The kernels' descales (attention_spec.Features.descale) of a call of batch (or, packed, num_seqs) sequences
    and kv_heads: float32 (2, batch, Hkv), q's times k's, then v's."""

    def full(name, descale):
        if descale is None:
            return torch.ones((batch, kv_heads), device=device)
        if not isinstance(descale, torch.Tensor) or descale.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got "
                            f"{descale.dtype if isinstance(descale, torch.Tensor) else type(descale).__name__}")
        if descale.device != device:
            raise ValueError(f"{name} is on {descale.device} but q is on {device}")
        if descale.dim() != 0 and tuple(descale.shape) != (batch, kv_heads):
            raise ValueError(f"{name} must have shape (batch, nheads_k) = ({batch}, {kv_heads}) or be a scalar "
                             f"tensor, got {tuple(descale.shape)}")
        return descale.expand(batch, kv_heads)

    return torch.stack((full("q_descale", q_descale) * full("k_descale", k_descale), full("v_descale", v_descale)))


@custom_op("gptfast::flash_attention_fp8")
def _fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale: torch.Tensor,
                      alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                      cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                      seqused_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: int,
                      window_left: int, window_right: int, chunk: int, softcap: float, softmax_scale: float,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' FP8 forward: (out in out_dtype, lse) for float8 (B, H, T, D) views, or with cu_seqlens packed
    (1, H, total, D) ones, as gptfast::flash_attention's (no autograd formula: the callers refuse inputs that
    require grad)."""
    from gptfast.kernels.attention import attention_forward
    features = kernel_features(None, alibi_slopes, sinks, None, cu_seqlens_q, cu_seqlens_k, seqused_k,
                               max_seqlen_q, max_seqlen_k, causal, window_left, window_right, chunk, softcap, 0.0,
                               descale=descale)
    return attention_forward(q, k, v, softmax_scale, features, out_dtype)


@_fp8_attention_op.register_fake
def _(q, k, v, descale, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
      causal, window_left, window_right, chunk, softcap, softmax_scale, out_dtype):
    b, h, t = q.shape[:3]
    out = torch.empty((b, t, h, v.shape[3]), dtype=out_dtype, device=q.device).transpose(1, 2)
    return out, q.new_empty((b, h, t), dtype=torch.float32)


def fp8_kernel_attention(q, k, v, descale, out_dtype, causal, window, softcap, alibi_slopes, sinks, chunk,
                         softmax_scale, sequences=None):
    """The kernels' FP8 forward for checked float8 q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D or Dv) and fp8_descales'
    descale: (out (B, Hq, Tq, Dv) in out_dtype, lse (B, Hq, Tq) float32). sequences: None, or varlen's
    (cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k) for packed (1, H, total, D) views."""
    packing = sequences or (None, None, None, 0, 0)
    return _fp8_attention_op(q, k, v, descale, alibi_slopes, kernel_sinks(sinks), *packing, causal, window[0],
                             window[1], chunk, float(softcap), softmax_scale, out_dtype)


def fp8_attention(q, k, v, descale, out_dtype, causal, window, softcap, alibi_slopes, sinks, chunk, softmax_scale):
    """fp8_kernel_attention's result on the kernels, or where they cannot run on PyTorch from the dequantised
    inputs."""
    if backend.use_triton("flash_attn_func", q.device, kernel_gap(q, v, softmax_scale, chunk, fp8=True)):
        return fp8_kernel_attention(q, k, v, descale, out_dtype, causal, window, softcap, alibi_slopes, sinks, chunk,
                                    softmax_scale)
    out, lse, _ = pytorch_attention(*dequantized(q, k, v, descale), causal, window, None, softcap, alibi_slopes, 0.0,
                                    softmax_scale, True, sinks, chunk)
    return out.to(out_dtype), lse


def dequantized(q, k, v, descale, tokens=None):
    """float32 q, k, v from checked float8 (B, H, T, D) ones and fp8_descales' descale: q's rows times q's and k's
    descales, v's times v's. tokens: None, or for sequences packed along T (B = 1) the sequence of each query and
    of each key, int64 (total_q,) and (total_k,)."""
    group = q.shape[1] // k.shape[1]

    def factor(per_sequence, rows):  # (B, H) -> broadcastable to (B, H, T, D)
        return per_sequence[:, :, None, None] if rows is None else per_sequence[rows].T[None, :, :, None]

    qk, values = descale[0].repeat_interleave(group, dim=1), descale[1]
    rows_q, rows_k = (None, None) if tokens is None else tokens
    return q.float() * factor(qk, rows_q), k.float(), v.float() * factor(values, rows_k)
