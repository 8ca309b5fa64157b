"""Ring attention (gptfast.distributed.ring_attention): on one GPU with N simulated ranks, as a pytest-benchmark
suite, and on N real GPUs under torchrun.

One GPU: rank 0 of a zigzag ring of N does its whole share of the work, every step's blocks of the plan, forward
(and backward), while its messages are device-to-device copies of the keys and values (and, backward, of the
dk/dv accumulators): "overlapped" copies them on a second CUDA stream, as the ring's transfers run beside its
compute; "serial" on the compute stream, after it. Their gap is the transfer time the compute hides. A copy within
one GPU is faster than NVLink, so this measures the overlap of the mechanism, not a multi-GPU speed. Beside them
the whole sequence on one GPU: gptfast's flash_attn_func and torch's SDPA. Tokens/s: the whole sequence's tokens
over the time of one rank (its N ranks run at once); TFLOP/s per GPU: the ring rank's share of the causal FLOPs,
the whole's / N (the zigzag layout balances them); peak memory per GPU, which bounds the longest sequence each
can hold.

N GPUs: `torchrun --nproc-per-node N benchmarks/bench_ring.py OUT.jsonl` times ring_attention forward and
backward over NCCL (gloo on CPUs) against one GPU's flash_attn_func on the whole sequence, and appends a JSON
line: world, tokens, seconds for each, tokens/s, and each one's peak memory per GPU.
"""
import argparse
import json
import math
import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import DEVICE, FULL, GPTFAST_BACKEND, KERNELS_RUN, measure, synchronized_clock
from gptfast import use_backend
from gptfast.attention import flash_attn_func
from gptfast.attention_core import softmax_scale_for
from gptfast.distributed import ring_attention, zigzag_shard
from gptfast.distributed.ring import Options, ring_backward, ring_forward

if FULL:
    DTYPE, HEADS, HEAD_DIM, TOKENS, RANKS = torch.bfloat16, 16, 128, 16384, (2, 8)
else:
    DTYPE, HEADS, HEAD_DIM, TOKENS, RANKS = torch.float32, 2, 32, 128, (2,)


class SimulatedRing:
    """Rank 0 of a ring of world ranks, in one process: pass_on copies the tensors it is given, on a stream of
    its own (overlap, on a GPU) or on the current one."""

    def __init__(self, world, overlap):
        self.rank, self.world = 0, world
        self.stream = torch.cuda.Stream() if overlap and torch.cuda.is_available() else None

    def pass_on(self, tensors):
        received = [torch.empty_like(t) for t in tensors]
        if self.stream is None:
            for into, sent in zip(received, tensors):
                into.copy_(sent)
            return received, lambda: None
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for into, sent in zip(received, tensors):
                into.copy_(sent)
        return received, lambda: torch.cuda.current_stream().wait_stream(self.stream)


def simulated_rank(q, k, v, grad, ring, backward):
    """Rank 0's forward (and backward) of a causal zigzag ring, on its (1, T / N, H, D) shards."""
    options = Options(softmax_scale_for(HEAD_DIM, None), True, (-1, -1), 0.0)
    with use_backend(GPTFAST_BACKEND):
        out, lse = ring_forward(q, k, v, ring, "zigzag", options, KERNELS_RUN)
        if backward:
            out = out.to(q.dtype).transpose(1, 2)
            lse = lse.masked_fill(lse == -math.inf, math.inf)
            ring_backward(grad, torch.zeros_like(lse), q, k, v, out, lse, ring, "zigzag", options, KERNELS_RUN)


def whole_sequence(impl, q, k, v, grad, backward):
    """One GPU's attention on the whole (1, T, H, D) sequence."""
    if impl == "gptfast-one-gpu":
        with use_backend(GPTFAST_BACKEND):
            out = flash_attn_func(q, k, v, causal=True)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                               is_causal=True).transpose(1, 2)
    if backward:
        out.backward(grad)


def causal_flops(tokens, backward):
    """FlashAttention's count: 4 * H * D * T^2 / 2 forward, 3.5 times that forward and backward."""
    return 4 * HEADS * HEAD_DIM * tokens * tokens / 2 * (3.5 if backward else 1.0)


@pytest.mark.parametrize("impl", ["gptfast-ring-overlapped", "gptfast-ring-serial", "gptfast-one-gpu",
                                  "torch-sdpa"])
@pytest.mark.parametrize("world", RANKS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_ring_attention(benchmark, mode, world, impl):
    backward = mode == "fwd_bwd"
    ranked = impl.startswith("gptfast-ring")
    length = TOKENS // world if ranked else TOKENS
    q, k, v, grad = (torch.randn(1, length, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(4))
    if ranked:
        ring = SimulatedRing(world, overlap=impl.endswith("overlapped"))
        step = lambda: simulated_rank(q, k, v, grad, ring, backward)  # noqa: E731
    else:
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        step = lambda: whole_sequence(impl, q, k, v, grad, backward)  # noqa: E731
    measure(benchmark, step, cpu_twin="torch-sdpa", group=f"ring attention {mode} T={TOKENS} N={world}", impl=impl,
            flops=causal_flops(TOKENS, backward) / (world if ranked else 1), op="ring", mode=mode, tokens=TOKENS,
            world=world)
    benchmark.extra_info["peak_memory_gb"] = peak_memory(step)  # per GPU: how long a sequence each can hold


def timed(step, repeats):
    """Seconds per call of step, the median of repeats after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = synchronized_clock()
        step()
        times.append(synchronized_clock() - start)
    return sorted(times)[len(times) // 2]


def peak_memory(step):
    """The GPU memory allocated at most during one call of step, in GB; 0 on a CPU."""
    if not torch.cuda.is_available():
        step()
        return 0.0
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() / 1e9


def main():
    """Under torchrun: ring_attention over the real ranks against one GPU on the whole sequence."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="a JSONL file the result line is appended to")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="the whole sequence's length")
    parser.add_argument("--repeats", type=int, default=10 if FULL else 2)
    args = parser.parse_args()
    dist.init_process_group("nccl" if FULL else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if FULL else torch.device("cpu")
    if FULL:
        torch.cuda.set_device(device)
    whole = [torch.randn(1, args.tokens, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(i)).to(device, DTYPE)
             for i in range(4)]
    shards = [zigzag_shard(t, rank, world).requires_grad_(i < 3) for i, t in enumerate(whole)]
    whole = [t.requires_grad_(i < 3) for i, t in enumerate(whole)]

    def ring_step():
        with use_backend(GPTFAST_BACKEND):
            ring_attention(*shards[:3], causal=True).backward(shards[3])

    def one_gpu_step():
        whole_sequence("gptfast-one-gpu", *whole, backward=True)

    result = dict(world=world, tokens=args.tokens, heads=HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE),
                  ring_s=timed(ring_step, args.repeats), ring_peak_gb=peak_memory(ring_step))
    if rank == 0:  # one GPU alone, the others waiting
        result.update(one_gpu_s=timed(one_gpu_step, args.repeats), one_gpu_peak_gb=peak_memory(one_gpu_step))
        result.update(ring_tokens_per_s=args.tokens / result["ring_s"],
                      one_gpu_tokens_per_s=args.tokens / result["one_gpu_s"], time=time.time())
        with open(args.output, "a") as file:
            file.write(json.dumps(result) + "\n")
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
