"""Decoding attention, one query per sequence against a long KV cache (Tq = 1): gptfast's split-KV kernel
(flash_attn_with_kvcache, splits chosen by its rule), the same kernel reading a float8 e4m3 cache (vLLM's
k_scale/v_scale, here 1), the same kernel held to one split, gptfast's prefill kernel (flash_attn_func: one program
per block of query rows), and torch's SDPA, at cache lengths 1k to 64k.

Decoding reads the whole cache once and does little arithmetic on it, so it is counted as memory traffic, as
flash-decoding's write-up measures it: GB/s = the bytes of K and V read (2 * B * Tk * Hkv * D * 2 for 16-bit, * 1
for float8) over the time; tokens/s = B (one new token per sequence) over the time. Heads as Llama 3 8B's: 32
query heads over 8 kv heads, D = 128.
"""
import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, FULL, GPTFAST_BACKEND, measure, rotating
from gptfast import use_backend
from gptfast.attention import flash_attn_func
from gptfast.kvcache import flash_attn_with_kvcache

if FULL:
    DTYPE, HEADS, KV_HEADS, HEAD_DIM, CACHE_LENGTHS, BATCHES = torch.bfloat16, 32, 8, 128, (1024, 4096, 16384,
                                                                                             65536), (1, 8)
else:
    DTYPE, HEADS, KV_HEADS, HEAD_DIM, CACHE_LENGTHS, BATCHES = torch.float32, 4, 2, 32, (64, 256), (1, 2)


def _split_kv(q, k, v, splits):
    with use_backend(GPTFAST_BACKEND):
        return flash_attn_with_kvcache(q, k, v, causal=True, num_splits=splits)


def _prefill_kernel(q, k, v):
    with use_backend(GPTFAST_BACKEND):
        return flash_attn_func(q, k, v, causal=True)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          enable_gqa=True).transpose(1, 2)


IMPLS = {"gptfast-split-kv": lambda q, k, v: _split_kv(q, k, v, 0),
         "gptfast-split-kv-fp8-cache": lambda q, k, v: _split_kv(q, k, v, 0),  # float8 k, v (test_decode_attention)
         "gptfast-one-split": lambda q, k, v: _split_kv(q, k, v, 1),
         "gptfast-prefill-kernel": _prefill_kernel,
         "torch-sdpa": _sdpa}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("cache_length", CACHE_LENGTHS)
def test_decode_attention(benchmark, cache_length, batch, impl):
    cache_dtype = torch.float8_e4m3fn if impl.endswith("fp8-cache") else DTYPE

    def make_inputs():
        return (torch.randn(batch, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE),
                torch.randn(batch, cache_length, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE).to(cache_dtype),
                torch.randn(batch, cache_length, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE).to(cache_dtype))

    cache_bytes = 2 * batch * cache_length * KV_HEADS * HEAD_DIM * cache_dtype.itemsize
    take = rotating(make_inputs, cache_bytes)
    attend = IMPLS[impl]
    measure(benchmark, lambda: attend(*take()), cpu_twin="torch-sdpa", group=f"decode attention B={batch} "
            f"Tk={cache_length}", impl=impl, bytes_moved=cache_bytes, op="decode", batch=batch, seqlen=cache_length,
            tokens=batch)
