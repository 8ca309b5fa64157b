"""Packed variable-length attention against padding, forward and forward+backward, at a realistic mix of lengths
(documents of a pretraining batch: many short, a few long): gptfast's flash_attn_varlen_func on the packed
tokens, gptfast's flash_attn_func on the batch padded to its longest sequence (the padded rows' work is waste),
and torch's SDPA on the padded batch with a boolean mask.

FLOPs count only the real tokens' work, as FlashAttention's benchmarks count varlen: 4 * H * D * sum_b T_b^2 / 2
for the causal forward, 3.5 times that forward and backward; so padding shows as lost throughput.
"""
import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, FULL, GPTFAST_BACKEND, measure
from gptfast import use_backend
from gptfast.attention import flash_attn_func
from gptfast.varlen import flash_attn_varlen_func

if FULL:
    DTYPE, HEADS, HEAD_DIM = torch.bfloat16, 16, 128
    LENGTHS = [4096, 2048, 1500, 900, 640, 512, 300, 256, 200, 128, 100, 64, 50, 32, 20, 16]  # 10,772 tokens
else:
    DTYPE, HEADS, HEAD_DIM = torch.float32, 2, 32
    LENGTHS = [64, 33, 17, 7, 1]


def _inputs(backward):
    total, longest = sum(LENGTHS), max(LENGTHS)
    packed = [torch.randn(total, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=backward)
              for _ in range(3)]
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    padded = [torch.zeros(len(LENGTHS), longest, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(3)]
    for tensor, source in zip(padded, packed):
        for b, (start, length) in enumerate(zip(cu_seqlens[:-1].tolist(), LENGTHS)):
            tensor[b, :length] = source[start:start + length].detach()
        tensor.requires_grad_(backward)
    keep = torch.arange(longest, device=DEVICE)[None, :] < torch.tensor(LENGTHS, device=DEVICE)[:, None]
    return packed, cu_seqlens, padded, keep


def _run(impl, packed, cu_seqlens, padded, keep):
    with use_backend(GPTFAST_BACKEND):
        if impl == "gptfast-varlen":
            return flash_attn_varlen_func(*packed, cu_seqlens, cu_seqlens, max(LENGTHS), max(LENGTHS), causal=True)
        if impl == "gptfast-padded":
            return flash_attn_func(*padded, causal=True)
    q, k, v = (t.transpose(1, 2) for t in padded)
    mask = keep[:, None, None, :] & torch.ones(max(LENGTHS), max(LENGTHS), dtype=torch.bool,
                                                  device=DEVICE).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("impl", ["gptfast-varlen", "gptfast-padded", "torch-sdpa-padded"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_varlen_attention(benchmark, mode, impl):
    backward = mode == "fwd_bwd"
    inputs = _inputs(backward)

    def step():
        out = _run(impl, *inputs)
        if backward:
            out.sum().backward()
        return out

    forward_flops = 4 * HEADS * HEAD_DIM * sum(length * length for length in LENGTHS) / 2
    measure(benchmark, step, cpu_twin="torch-sdpa-padded", group=f"varlen attention {mode} {len(LENGTHS)} sequences",
            impl=impl, flops=forward_flops * (3.5 if backward else 1.0), op="varlen", mode=mode,
            tokens=sum(LENGTHS))
