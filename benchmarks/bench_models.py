"""Today's models' attention shapes, forward and forward+backward, gptfast against what each model runs without
it: gpt-oss (learned sinks; transformers' own eager attention, the path its sinks take without a fused kernel, and
torch's SDPA without the sinks as the speed to reach), DeepSeek-V3's MLA (queries and keys 192 wide, values 128;
SDPA takes the two head dims), Llama 4's chunked attention (SDPA with the dense chunked causal mask) and Gemma 4's
global layers (head dim 512, past FlashAttention's 256: SDPA runs its memory-efficient or math backend there).

FLOPs count the visible (query, key) pairs only, as FlashAttention's benchmarks count causal attention:
2 * pairs * (D + Dv) per head for the forward, 3.5 times that forward and backward (the backward's 2.5).
"""
import types

import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, FULL, GPTFAST_BACKEND, measure
from gptfast import use_backend
from gptfast.attention import flash_attn_func

# (name, batch, Hq, Hkv, T, D, Dv, chunk): gpt-oss-120b's attention (64 query heads, 8 kv heads, D 64), 16 of
# DeepSeek-V3's 128 heads, Llama 4 Scout's (40 query heads, 8 kv heads, D 128, chunks of 8192), a Gemma 4 global
# layer's head dim 512 (16 query heads, 4 kv heads: an illustrative grouping)
if FULL:
    SHAPES = {"gpt-oss": (1, 64, 8, 4096, 64, 64, 0), "deepseek-v3": (1, 16, 16, 4096, 192, 128, 0),
              "llama4": (1, 40, 8, 16384, 128, 128, 8192), "gemma4-global": (1, 16, 4, 4096, 512, 512, 0)}
else:
    SHAPES = {"gpt-oss": (1, 4, 2, 64, 16, 16, 0), "deepseek-v3": (1, 2, 2, 64, 24, 16, 0),
              "llama4": (1, 4, 2, 64, 16, 16, 16), "gemma4-global": (1, 4, 2, 64, 16, 16, 0)}
DTYPE = torch.bfloat16 if FULL else torch.float32
IMPLS = {"gpt-oss": ("gptfast", "transformers-eager", "torch-sdpa-without-sinks"),
         "deepseek-v3": ("gptfast", "torch-sdpa"), "llama4": ("gptfast", "torch-sdpa-dense-mask"),
         "gemma4-global": ("gptfast", "torch-sdpa")}


def visible_pairs(seqlen, chunk):
    """Causal pairs of one head, within chunks when chunk > 0."""
    if not chunk:
        return seqlen * (seqlen + 1) // 2
    whole, rest = divmod(seqlen, chunk)
    return whole * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def chunked_causal_mask(seqlen, chunk):
    positions = torch.arange(seqlen, device=DEVICE)
    return (positions[None, :] <= positions[:, None]) & (positions[None, :] // chunk == positions[:, None] // chunk)


def _inputs(batch, heads, kv_heads, seqlen, head_dim, head_dim_v, backward):
    """q, k, v in flash-attn's (B, T, H, D) layout, sinks (Hq,) float32."""
    make = lambda h, d: torch.randn(batch, seqlen, h, d, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    sinks = torch.randn(heads, device=DEVICE, requires_grad=backward)
    return make(heads, head_dim), make(kv_heads, head_dim), make(kv_heads, head_dim_v), sinks


def _run(model, impl, q, k, v, sinks, chunk):
    """One attention call of the model's shape by impl; returns (B, T, Hq, Dv)."""
    if impl == "gptfast":
        with use_backend(GPTFAST_BACKEND):
            return flash_attn_func(q, k, v, causal=True, sinks=sinks if model == "gpt-oss" else None,
                                   attention_chunk=chunk)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if impl == "transformers-eager":
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
        module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks, training=False)
        causal = torch.full((q.shape[2], q.shape[2]), float("-inf"), device=DEVICE, dtype=q.dtype).triu(1)
        return eager_attention_forward(module, q, k, v, causal, scaling=q.shape[-1] ** -0.5)[0]
    if impl == "torch-sdpa-dense-mask":  # kv heads repeated: SDPA's memory-efficient kernel takes a mask, not GQA
        group = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             attn_mask=chunked_causal_mask(q.shape[2], chunk))
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


CASES = [(model, impl, mode) for model in SHAPES for mode in ("fwd", "fwd_bwd") for impl in IMPLS[model]]


@pytest.mark.parametrize("model, impl, mode", CASES, ids=[f"{m}-{i}-{mode}" for m, i, mode in CASES])
def test_model_attention(benchmark, model, impl, mode):
    batch, heads, kv_heads, seqlen, head_dim, head_dim_v, chunk = SHAPES[model]
    backward = mode == "fwd_bwd"
    q, k, v, sinks = _inputs(batch, heads, kv_heads, seqlen, head_dim, head_dim_v, backward)
    grad_out = torch.randn(batch, seqlen, heads, head_dim_v, device=DEVICE, dtype=DTYPE)

    def step():
        out = _run(model, impl, q, k, v, sinks, chunk)
        if backward:
            for t in (q, k, v, sinks):
                t.grad = None
            out.backward(grad_out)
        return out

    forward_flops = 2 * batch * heads * visible_pairs(seqlen, chunk) * (head_dim + head_dim_v)
    measure(benchmark, step, cpu_twin=IMPLS[model][1], group=f"{model} attention {mode} T={seqlen}", impl=impl,
            flops=forward_flops * (3.5 if backward else 1.0), op="model attention", model=model, mode=mode,
            seqlen=seqlen, head_dim=head_dim, head_dim_v=head_dim_v)
