"""Which blocks of the (Tq, Tk) score matrix a flex call's mask mod leaves empty, partial or full: the kernel
behind gptfast.flex.create_block_mask, one pass over the blocks on the device."""
import torch
import triton
import triton.language as tl

from gptfast.kernels import cdiv
from gptfast.kernels.attention_blocks import mask_mods

EMPTY, PARTIAL, FULL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
CHUNK_ELEMENTS = 2048  # pairs evaluated at once: 16 per thread of 4 warps, no spills (gptfast inspect)


@triton.jit
def block_states_kernel(STATES, mask_args, num_heads, seqlen_q, seqlen_k, key_blocks, MASK_MOD: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, CHUNK: tl.constexpr):
    """STATES (B, H, cdiv(Tq, BLOCK_Q), key_blocks) uint8, contiguous: EMPTY where no pair of the block is
    visible, FULL where every pair is inside the sequences and visible, else PARTIAL. The mods see indices clamped
    into the sequences, as in the attention kernels. Grid: (query blocks, B * H); a program walks its row of
    blocks, each CHUNK query rows at a time (a whole 128 x 128 block of mod results spills)."""
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    STATES += (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * key_blocks
    for block in range(key_blocks):
        keys = block * BLOCK_KV + tl.arange(0, BLOCK_KV)[None, :]
        count = 0
        for chunk in range(0, BLOCK_Q, CHUNK):  # not unrolled: each chunk's tile dies before the next
            rows = tl.program_id(0) * BLOCK_Q + chunk + tl.arange(0, CHUNK)[:, None]
            inside = (rows < seqlen_q) & (keys < seqlen_k)
            visible = mask_mods(batch, head, tl.minimum(rows, seqlen_q - 1), tl.minimum(keys, seqlen_k - 1),
                                mask_args, MASK_MOD) & inside
            count += tl.sum(tl.sum(visible.to(tl.int32), 1), 0)
        state = tl.where(count == BLOCK_Q * BLOCK_KV, FULL, tl.where(count > 0, PARTIAL, EMPTY))
        tl.store(STATES + block, state.to(tl.uint8))


def block_states(mask_mod, mask_args, batch, num_heads, seqlen_q, seqlen_k, block_size, device):
    """(B, H, cdiv(Tq, block_q), cdiv(Tk, block_kv)) uint8 block states of the mask mod (a MASK_MOD tuple of
    terms, attention_spec.Spec) with its args, block_size = (block_q, block_kv)."""
    block_q, block_kv = block_size
    rows, columns = cdiv(seqlen_q, block_q), cdiv(seqlen_k, block_kv)
    states = torch.empty((batch, num_heads, rows, columns), dtype=torch.uint8, device=device)
    block_states_kernel[(rows, batch * num_heads)](states, mask_args, num_heads, seqlen_q, seqlen_k, columns,
                                                   MASK_MOD=mask_mod, BLOCK_Q=block_q, BLOCK_KV=block_kv,
                                                   CHUNK=min(block_q, CHUNK_ELEMENTS // block_kv))
    return states
