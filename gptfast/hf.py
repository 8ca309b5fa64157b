"""Hugging Face transformers on gptfast's kernels.

``register()`` adds "gptfast" to transformers' attention and mask registries, so that
``AutoModelForCausalLM.from_pretrained(name, attn_implementation="gptfast")`` runs gptfast's flash-attention, with
dropout, grouped-query heads, sliding windows (Mistral, Qwen2, Gemma 2) and logit softcapping (Gemma 2) in the
kernels; ``patch_hf(model)`` switches a loaded model to it and also swaps its LayerNorms and RMSNorms for
gptfast's fused ones.

Masks: where the kernels' own flags say everything (a causal pattern, a window the layer names, no padding, the
queries being the last of the keys), transformers is told to build no mask at all; otherwise (padding, a static
cache's empty slots, packed sequences) it builds its dense boolean mask, which the kernels read as it is.
"""
import sys

import torch

from gptfast import backend
from gptfast.attention_core import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, attend, flag_pattern, softmax_scale_for
from gptfast.attention_plan import make_plan, plan_key, planned
from gptfast.layernorm import LayerNorm, rms_norm

# Keywords transformers passes to an attention function that do not change its result: the rotary embedding is
# applied before the call, and packed position_ids reach the attention as the mask transformers builds from them;
# the rest are about other layers or the outputs. output_attentions is harmless only when false.
HARMLESS_KEYWORDS = frozenset({"position_ids", "use_cache", "cache_position", "output_attentions",
                               "output_hidden_states", "output_router_logits", "num_items_in_batch",
                               "return_dict"})


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers' attention-interface signature: query (B, Hq, Tq, D), key and value (B, Hkv, Tk, D);
    returns ((B, Tq, Hq, D), None). attention_mask is None when attention_mask_for_kernels below found the flags
    enough, else transformers' dense mask (B, 1, Tq, Tk) holding causality, the window and padding already.
    sliding_window W lets query i see keys j > i - W, as transformers' own masks (flash-attn's left = W - 1); a
    layer of type "chunked_attention" (Llama 4) sees the keys of its query's chunk of attention_chunk_size.
    s_aux: gpt-oss's learned sinks (Hq,), run by the kernels (flash_attn_func's sinks). Any other
    keyword that is not None and not in HARMLESS_KEYWORDS (or output_attentions=True) runs the model's own eager
    attention instead, with a warning once per keyword (an error under GPTFAST_BACKEND=triton)."""
    causal = CAUSAL_NONE
    window = (-1, -1)
    chunk = 0
    if attention_mask is None:
        if is_causal if is_causal is not None else getattr(module, "is_causal", True):
            causal = CAUSAL_BOTTOM_RIGHT
        if sliding_window:
            window = (sliding_window - 1, -1)
        chunk = _layer_chunk(module)
    unknown = sorted(name for name, value in kwargs.items() if (value is not None and name not in HARMLESS_KEYWORDS)
                     or (name == "output_attentions" and value))
    if unknown:
        backend.use_triton("hf.attention_forward", query.device,
                           f"the keyword argument {unknown[0]} (the model's own eager attention runs instead)")
        if attention_mask is None:
            attention_mask = ~flag_pattern(query.shape[-2], key.shape[-2], causal, window, query.device, chunk)[1]
        mask = _additive(attention_mask, query.dtype)
        return _eager_attention(module)(module, query, key, value, mask, dropout=dropout,
                                        scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                                        s_aux=s_aux, **kwargs)
    signature = plan_key(query, key, value, window, ("hf.attention_forward", causal, chunk, attention_mask, dropout,
                                                      scaling, softcap, s_aux))
    out = None if signature is None else planned(signature, query, key, value)
    if out is None:
        out = attend(query, key, value, causal=causal, window=window, mask=attention_mask, softcap=softcap or 0.0,
                     dropout_p=dropout, softmax_scale=scaling, op="hf.attention_forward", sinks=s_aux, chunk=chunk)[0]
        if signature is not None and attention_mask is None and dropout == 0 and s_aux is None:
            make_plan(signature, "hf.attention_forward", query, key, value,
                      softmax_scale_for(query.shape[-1], scaling), causal, window, softcap or 0.0, chunk)
    return out.transpose(1, 2), None


def _layer_chunk(module):
    """The chunk size of a module whose layer type is "chunked_attention" (Llama 4's attention_chunk_size), else 0."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None) or ()
    layer = getattr(module, "layer_idx", None)
    if layer is not None and layer < len(layer_types) and layer_types[layer] == "chunked_attention":
        return config.attention_chunk_size
    return 0


def _additive(mask, dtype):
    """A boolean mask as the additive one transformers' eager attention functions add to the scores."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _eager_attention(module):
    """The eager attention function of the module's own model file (gpt-oss's handles s_aux, Gemma 2's softcap),
    else transformers' generic one."""
    model_file = sys.modules.get(type(module).__module__)
    eager = getattr(model_file, "eager_attention_forward", None)
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as eager
    return eager


def attention_mask_for_kernels(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                               allow_is_causal_skip=True, **kwargs):
    """transformers' mask interface for "gptfast": None where the kernels' causal, window and chunk flags describe
    the mask (no padding in the keys, the queries the last of them, a plain causal, sliding-window or chunked
    pattern: attention_forward reads the layer's window and chunk), else transformers' own dense boolean mask
    (sdpa_mask)."""
    from transformers.masking_utils import sdpa_mask
    # The kernels count chunks from the first key given, right only when the keys start at position 0 (a chunked
    # layer's cache that dropped old keys has kv_offset > 0).
    chunked = getattr(kwargs.get("config"), "attention_chunk_size", None) is not None
    plain_pattern = allow_is_causal_skip and not (chunked and kv_offset != 0)
    queries_last = isinstance(q_offset, int) and isinstance(kv_offset, int) and (
        q_offset + q_length == kv_offset + kv_length)
    if plain_pattern and queries_last and (attention_mask is None or bool(
            attention_mask[:, kv_offset:kv_offset + kv_length].all())):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)


def register():
    """Make attn_implementation="gptfast" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register("gptfast", attention_forward)
    AttentionMaskInterface.register("gptfast", attention_mask_for_kernels)


class HFRMSNorm(torch.nn.Module):
    """A transformers RMSNorm on gptfast's kernel, holding the original's weight (so the state_dict is unchanged):
    Llama's family and Gemma 4 scale by weight, Gemma 1-3 by 1 + weight (unit_offset), Gemma 4's value norm has
    none (weight None). Returns the input's dtype."""

    def __init__(self, weight, eps, unit_offset):
        super().__init__()
        self.weight, self.eps, self.unit_offset = weight, eps, unit_offset

    def forward(self, hidden):
        weight = self.weight + 1.0 if self.unit_offset and self.weight is not None else self.weight
        return rms_norm(hidden, (hidden.shape[-1],), weight, self.eps)


def _fused_norm(module, like):
    """gptfast's replacement for a LayerNorm or a transformers RMSNorm (Llama, Mistral, Qwen2/3, Gemma 1-4,
    DeepSeek, Llama 4), or None. like: a tensor of the model's device and dtype, for a norm without weight."""
    if type(module) is torch.nn.LayerNorm:
        weight = module.weight
        fused = LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                          bias=module.bias is not None, device=None if weight is None else weight.device,
                          dtype=None if weight is None else weight.dtype)
        fused.load_state_dict(module.state_dict())
        return fused
    weight = getattr(module, "weight", None)
    if type(module).__name__.endswith("RMSNorm") and (weight is None or isinstance(weight, torch.nn.Parameter)):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        unit_offset = _scale_convention(module, weight, eps, like) if eps is not None else None
        if unit_offset is not None:
            return HFRMSNorm(weight, eps, unit_offset)
    return None


@torch.no_grad()
def _scale_convention(module, weight, eps, like):
    """Whether an RMSNorm scales by 1 + weight (Gemma 1-3) or by weight (Llama, Gemma 4, the rest), found by
    running it once on a probe (names do not say: Gemma 4 dropped Gemma 3's 1 + weight; the two differ by the
    normalised probe itself, far beyond any dtype's rounding); a norm without weight must compute the plain
    normalisation (unit_offset False). None if it computes neither, or takes more than the hidden states (a gated
    norm): it is then left alone."""
    like = like if weight is None else weight
    probe = torch.randn(2, 64 if weight is None else weight.shape[-1],
                        generator=torch.Generator().manual_seed(0)).to(like.device, like.dtype)
    normed = probe.float() * torch.rsqrt(probe.float().square().mean(-1, keepdim=True) + eps)
    try:
        out = module(probe).float()
    except (TypeError, RuntimeError):  # another signature or layout than (..., dim) -> (..., dim)
        return None
    scales = (1.0,) if weight is None else (weight.float(), weight.float() + 1)
    for unit_offset, scale in enumerate(scales):
        if torch.allclose(out, normed * scale, rtol=0.02, atol=0.02):
            return bool(unit_offset)
    return None


def patch_hf(model):
    """Run a loaded transformers model on gptfast: its attention through the "gptfast" implementation, and each
    torch.nn.LayerNorm and transformers RMSNorm replaced by gptfast's fused one (same parameters). Returns the
    model."""
    register()
    model.set_attn_implementation("gptfast")
    like = next(model.parameters())
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fused = _fused_norm(child, like)
            if fused is not None:
                setattr(parent, name, fused)
    return model
