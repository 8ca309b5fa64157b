"""Programmable attention: gptfast.flex against torch's flex_attention (compiled; the GPU only) and SDPA with a
dense boolean mask, forward and forward+backward, for three masks: causal document packing (16 documents of
equal length), prefix-LM (a quarter of the sequence as prefix) and a causal sliding window with 4 sink tokens;
and create_block_mask's time for a document mask, gptfast's against torch's.

FLOPs count only the visible pairs' work (4 * H * D per pair forward, 3.5 times that forward and backward), as
FlashAttention's benchmarks count a causal mask, so that skipped blocks show as throughput and a dense mask's
wasted work as lost throughput. On a CPU without Triton's interpreter gptfast's flex_attention and
create_block_mask run their mods' PyTorch twins densely: code of their own, so no baseline is named as the same.
"""
import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, FULL, GPTFAST_BACKEND, measure
from gptfast import use_backend
from gptfast.flex import and_masks, create_block_mask, flex_attention, or_masks
from gptfast.flex_mods import causal_mask, document_mask, prefix_lm_mask, sliding_window_mask

if FULL:
    DTYPE, HEADS, HEAD_DIM, LENGTH, WINDOW, MASK_LENGTH = torch.bfloat16, 16, 128, 8192, 1024, 32768
else:
    DTYPE, HEADS, HEAD_DIM, LENGTH, WINDOW, MASK_LENGTH = torch.float32, 2, 32, 128, 16, 256
DOCUMENTS, SINKS = 16, 4


def _documents(length):
    return torch.arange(length, device=DEVICE) * DOCUMENTS // length


def _masks():
    """name -> (gptfast's mask mod, the same mask in torch: a function of (q_idx, kv_idx) index tensors)."""
    ids = _documents(LENGTH)
    return {
        "document": (and_masks(causal_mask, document_mask(ids)), lambda q, kv: (kv <= q) & (ids[q] == ids[kv])),
        "prefix_lm": (or_masks(causal_mask, prefix_lm_mask(LENGTH // 4)), lambda q, kv: (kv <= q) | (kv < LENGTH // 4)),
        "window_sinks": (or_masks(and_masks(causal_mask, sliding_window_mask(WINDOW)), prefix_lm_mask(SINKS)),
                         lambda q, kv: (kv <= q) & ((q - kv <= WINDOW) | (kv < SINKS))),
    }


def _runner(impl, mask_name):
    """The attention call of impl for the mask, its block mask built once, outside the timed step."""
    mask_mod, torch_mask = _masks()[mask_name]
    rows = torch.arange(LENGTH, device=DEVICE)
    dense = torch_mask(rows[:, None], rows[None, :])
    if impl == "gptfast-flex":
        with use_backend(GPTFAST_BACKEND):
            block_mask = create_block_mask(mask_mod, None, None, LENGTH, LENGTH, device=DEVICE)

        def run(q, k, v):
            with use_backend(GPTFAST_BACKEND):
                return flex_attention(q, k, v, block_mask=block_mask)
    elif impl == "torch-sdpa-dense":
        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    else:
        from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
        from torch.nn.attention.flex_attention import flex_attention as torch_flex
        compiled = torch.compile(torch_flex)
        block_mask = torch_block_mask(lambda b, h, q, kv: torch_mask(q, kv), None, None, LENGTH, LENGTH, device=DEVICE)

        def run(q, k, v):
            return compiled(q, k, v, block_mask=block_mask)
    return run, int(dense.sum())


def _attention(benchmark, impl, mask_name, mode):
    backward = mode == "fwd_bwd"
    run, visible = _runner(impl, mask_name)
    q, k, v = (torch.randn(1, HEADS, LENGTH, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=backward)
               for _ in range(3))

    def step():
        out = run(q, k, v)
        if backward:
            out.sum().backward()
        return out

    forward_flops = 4 * HEADS * HEAD_DIM * visible
    measure(benchmark, step, cpu_twin=None, group=f"flex {mask_name} {mode} T={LENGTH}", impl=impl,
            flops=forward_flops * (3.5 if backward else 1.0), op="flex", mode=mode, mask=mask_name)


MASK_NAMES = ("document", "prefix_lm", "window_sinks")


@pytest.mark.parametrize("impl", ["gptfast-flex", "torch-sdpa-dense"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
def test_flex_attention(benchmark, mask_name, mode, impl):
    _attention(benchmark, impl, mask_name, mode)


@pytest.mark.compiled
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
def test_flex_attention_compiled_baseline(benchmark, mask_name, mode):
    if DEVICE != "cuda":
        pytest.skip("torch's compiled flex_attention runs on CUDA only here (it builds C++ for minutes on a CPU)")
    _attention(benchmark, "torch-flex-compiled", mask_name, mode)


@pytest.mark.parametrize("impl", ["gptfast", "torch"])
def test_create_block_mask(benchmark, impl):
    """A causal document mask of MASK_LENGTH tokens, 16 documents, 128 x 128 blocks."""
    ids = _documents(MASK_LENGTH)
    if impl == "gptfast":
        def step():
            with use_backend(GPTFAST_BACKEND):
                return create_block_mask(and_masks(causal_mask, document_mask(ids)), None, None, MASK_LENGTH,
                                         MASK_LENGTH, device=DEVICE)
    else:
        from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

        def step():
            return torch_block_mask(lambda b, h, q, kv: (kv <= q) & (ids[q] == ids[kv]), None, None, MASK_LENGTH,
                                    MASK_LENGTH, device=DEVICE)
    measure(benchmark, step, cpu_twin=None, group=f"create_block_mask document T={MASK_LENGTH}", impl=impl,
            op="create_block_mask", tokens=MASK_LENGTH)
