"""gptfast.flex's built-in mods, as the attention kernels call them on tiles (attention_spec.Spec): a mask mod
takes (batch, head, q_idx, kv_idx, args) and returns whether each pair is visible; a score mod takes (score,
batch, head, q_idx, kv_idx, args) and returns the new score, its derivative (grad, score, batch, head, q_idx,
kv_idx, args) the gradient reaching score, and an argument gradient (..., args, grads) adds into grads the
gradient of a tensor it reads. q_idx and kv_idx are int32 index tiles that broadcast against each other, clamped
into the sequences; args is the mod's own tuple (gptfast.flex_mods documents each)."""
import triton
import triton.language as tl

from gptfast.kernels.math import tanh_f32


@triton.jit
def causal(batch, head, q_idx, kv_idx, args):
    return kv_idx <= q_idx


@triton.jit
def sliding_window(batch, head, q_idx, kv_idx, args):
    """args = (left,): keys at most `left` before the query (and none after it when combined with causal)."""
    return q_idx - kv_idx <= args[0]


@triton.jit
def prefix_lm(batch, head, q_idx, kv_idx, args):
    """args = (prefix_lengths, batch_stride): keys inside the sequence's prefix are visible to every query."""
    return kv_idx < tl.load(args[0] + batch * args[1])


@triton.jit
def document(batch, head, q_idx, kv_idx, args):
    """args = (document_ids, batch_stride): a query sees only keys of its own document."""
    ids = args[0] + batch * args[1]
    return tl.load(ids + q_idx) == tl.load(ids + kv_idx)


@triton.jit
def chunked(batch, head, q_idx, kv_idx, args):
    """args = (chunk_size,): a query sees only keys of its own chunk (Llama 4's attention_chunk_size)."""
    return q_idx // args[0] == kv_idx // args[0]


@triton.jit
def alibi(score, batch, head, q_idx, kv_idx, args):
    """args = (slopes,): score - slope[head] * |q_idx - kv_idx| (ALiBi, Press et al., 2022)."""
    return score - tl.load(args[0] + head) * tl.abs(q_idx - kv_idx).to(tl.float32)


@triton.jit
def identity_grad(grad, score, batch, head, q_idx, kv_idx, args):
    """The derivative of any mod that adds to the score."""
    return grad


@triton.jit
def softcap(score, batch, head, q_idx, kv_idx, args):
    """args = (cap,): cap * tanh(score / cap) (Gemma 2's logit softcapping)."""
    return args[0] * tanh_f32(score / args[0])


@triton.jit
def softcap_grad(grad, score, batch, head, q_idx, kv_idx, args):
    tanh = tanh_f32(score / args[0])
    return grad * (1.0 - tanh * tanh)


@triton.jit
def relative_bias(score, batch, head, q_idx, kv_idx, args):
    """args = (table, head_stride, offset): score + table[head, q_idx - kv_idx + offset], a learned bias per
    head and relative position."""
    return score + tl.load(args[0] + head * args[1] + q_idx - kv_idx + args[2]).to(tl.float32)


@triton.jit
def relative_bias_arg_grad(grad, score, batch, head, q_idx, kv_idx, args, grads):
    """Adds each pair's gradient into the table's: the sum over the pairs that read each entry."""
    tl.atomic_add(grads[0] + head * args[1] + q_idx - kv_idx + args[2], grad, sem="relaxed")


@triton.jit
def block_bits(batch, head, q_idx, kv_idx, args):
    """args = (bits, block_index, batch_stride, head_stride, columns, log2_block_q, log2_block_kv): a mask evaluated
    ahead of time on its partial blocks (a torch BlockMask's mask_mod). block_index (B', H', rows, columns) int32
    holds each block's index into bits (P, block_q, block_kv) bool, or -1 where the block is empty, -2 where full.
    The blocks are at least the kernels' largest tile (gptfast.flex coarsens them), so a tile lies in one block,
    whose index is loaded once; shifts, not divisions by a runtime block size, and int32 offsets (bits holds fewer
    than 2**31 entries: gptfast.flex checks). Its per-pair load spills float32 tiles (`gptfast inspect`): float32
    calls with a torch BlockMask run PyTorch."""
    bits, block_index, batch_stride, head_stride, columns, log2_q, log2_kv = args
    block = tl.load(block_index + batch * batch_stride + head * head_stride + (tl.min(q_idx) >> log2_q) * columns
                    + (tl.min(kv_idx) >> log2_kv))
    row, key = q_idx & ((1 << log2_q) - 1), kv_idx & ((1 << log2_kv) - 1)
    offset = (block << (log2_q + log2_kv)) + (row << log2_kv) + key
    return (block == -2) | (tl.load(bits + offset, mask=block >= 0, other=0) != 0)
