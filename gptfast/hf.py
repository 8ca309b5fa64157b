"""Hugging Face transformers on gptfast's kernels.

``register()`` adds "gptfast" to transformers' attention registry, so that
``GPT2LMHeadModel.from_pretrained(name, attn_implementation="gptfast")`` runs gptfast's flash-attention;
``patch_hf(model)`` switches a loaded model to it and also swaps its LayerNorms for gptfast's.
"""
import torch

from gptfast.attention import scaled_dot_product_attention
from gptfast.layernorm import LayerNorm


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' attention-interface signature: query (B, Hq, Tq, D), key and value (B, Hkv, Tk, D);
    returns ((B, Tq, Hq, D), None). Follows transformers' own SDPA integration: the causal flag is used when no
    mask is given and more than one query is new; a padding mask runs PyTorch under the auto backend."""
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and kv_len > q_len:  # prefill into an empty static cache: the keys past q_len are unused
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                       is_causal=is_causal, scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


def register():
    """Make attn_implementation="gptfast" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("gptfast", attention_forward)
    AttentionMaskInterface.register("gptfast", sdpa_mask)


def patch_hf(model):
    """Run a loaded transformers model on gptfast: its attention through the "gptfast" implementation and each
    torch.nn.LayerNorm replaced by gptfast's (same parameters). Returns the model."""
    register()
    model.set_attn_implementation("gptfast")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.LayerNorm:
                fused = LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine,
                                  bias=child.bias is not None, device=child.weight.device if child.weight is not None
                                  else None, dtype=child.weight.dtype if child.weight is not None else None)
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
    return model
