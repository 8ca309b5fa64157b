"""gptfast.flex's built-in mods: each the @triton.jit function the kernels inline (gptfast.kernels.mods) with its
arguments and its PyTorch twin (for the PyTorch path and the tests), and, for score mods, their derivatives.
Positions are 0-based; masks are top-left aligned as FlexAttention's (query i is aligned with key i)."""
import torch

from gptfast.flex import MaskMod, Mod, ScoreMod
from gptfast.kernels import mods


def _causal(batch, head, q_idx, kv_idx):
    return kv_idx <= q_idx


causal_mask = MaskMod.of(mods.causal, (), _causal)


def sliding_window_mask(left):
    """Keys at most `left` positions before the query (combine with causal_mask for the usual window)."""
    return MaskMod.of(mods.sliding_window, (int(left),), lambda b, h, q, kv, left: q - kv <= left)


def prefix_lm_mask(prefix_lengths):
    """The keys before prefix_lengths (an int, or an int tensor (B,) of one per sequence) are visible to every
    query: or_masks(causal_mask, prefix_lm_mask(n)) is prefix-LM attention."""
    lengths = torch.as_tensor(prefix_lengths).to(torch.int32).flatten().contiguous()
    stride = 1 if lengths.numel() > 1 else 0
    return MaskMod.of(mods.prefix_lm, (lengths, stride),
                      lambda b, h, q, kv, lengths, stride: kv < lengths[b * stride])


def document_mask(document_ids):
    """A query sees only keys of its own document: document_ids, int (T,) or (B, T) (one row per sequence), the
    document of each position (packed training; Tq = Tk = T). and_masks(causal_mask, document_mask(ids)) is
    causal packing."""
    ids = document_ids.to(torch.int32).contiguous()
    stride = ids.shape[1] if ids.dim() == 2 else 0
    return MaskMod.of(mods.document, (ids, stride),
                      lambda b, h, q, kv, ids, stride: ids.view(-1)[b * stride + q] == ids.view(-1)[b * stride + kv])


def chunked_mask(chunk_size):
    """A query sees only keys of its own chunk of chunk_size positions (Llama 4's attention_chunk_size; combine
    with causal_mask)."""
    return MaskMod.of(mods.chunked, (int(chunk_size),), lambda b, h, q, kv, size: q // size == kv // size)


def alibi_score(slopes):
    """score - slopes[head] * |q_idx - kv_idx| (ALiBi); slopes float32 (H,). Its derivative in score is 1; the
    slopes get no gradient (detach them, or write a ScoreMod with an arg_grad)."""
    slopes = slopes.float().contiguous()
    return ScoreMod(Mod(mods.alibi, (slopes,),
                        lambda s, b, h, q, kv, slopes: s - slopes[h] * (q - kv).abs()), mods.identity_grad)


def softcap_score(cap):
    """cap * tanh(score / cap) (Gemma 2's attention logit softcapping)."""
    return ScoreMod(Mod(mods.softcap, (float(cap),), lambda s, b, h, q, kv, cap: cap * torch.tanh(s / cap)),
                    mods.softcap_grad)


def relative_bias_score(table):
    """score + table[head, T - 1 + q_idx - kv_idx], a learned bias per head and relative position: table
    (H, 2T - 1), floating, contiguous, for sequences of at most T queries and keys; it gets its gradient (summed
    over the pairs that read each entry, as torch's autograd sums it)."""
    if table.dim() != 2 or table.shape[1] % 2 != 1 or not table.is_floating_point() or not table.is_contiguous():
        raise ValueError(f"table must be a contiguous floating (H, 2T - 1) tensor, got {table.dtype} "
                         f"{tuple(table.shape)}")
    offset = (table.shape[1] - 1) // 2

    def reference(s, b, h, q, kv, table, stride, offset):
        return s + table.view(-1)[h * stride + q - kv + offset]
    return ScoreMod(Mod(mods.relative_bias, (table, table.stride(0), offset), reference), mods.identity_grad,
                    mods.relative_bias_arg_grad)
