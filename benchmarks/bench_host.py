"""The host's share of each public call: its Python work with gptfast's kernel launches replaced by no-ops, beside
torch's own call on the same tiny inputs, in microseconds per call (pytest-benchmark's fastest round: a call's host
work is the same every time, and a shared CPU's noise only adds to it), on any machine.

How the launch is removed (no_launch below): Triton's JITFunction.run, Autotuner.run and the interpreter's
InterpretedFunction.run return at once, and gptfast's backend treats CPU tensors as the kernels' (as it does under
TRITON_INTERPRET=1). A call then runs every check, feature description, autotuner choice, allocation and argument
list that it runs on a GPU, and stops where Triton's own launch (its argument binding and cache lookup) would
begin; what it returns is uninitialised memory. torch runs the same call for real on the same inputs, so small
(a few elements a head) that its computation is a small part of its time: its figure is its dispatch plus that.
What a GPU adds to either (CUDA's launch, the device's allocator) is not counted. Torch runs one thread here
(set_num_threads(1)): host work is one thread's, and a loaded CPU would slow torch's threads many times over.

Each case also records, from one call under a TorchDispatchMode: host synchronisations (aten ops that read a
tensor's value on the host: item(), bool(), equal) and tensor allocations (aten ops whose output is neither a view
nor an in-place result). The model's paths must show no synchronisation.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gptfast import backend
from gptfast.attention import flash_attn_func, scaled_dot_product_attention
from gptfast.decoder import decode_step, prefill
from gptfast.kvcache import flash_attn_with_kvcache
from gptfast.layernorm import layer_norm
from gptfast.loss import linear_cross_entropy
from gptfast.model import GPT, GPTConfig, KVCache

BATCH, SEQLEN, HEADS, KV_HEADS, HEAD_DIM = 1, 4, 2, 2, 16
WIDTH, TOKENS, VOCAB = 32, 8, 64
READS_A_VALUE = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def no_launch():
    """Every Triton kernel launch a no-op, and gptfast's kernel path open to CPU tensors (see the docstring)."""
    from triton.runtime import autotuner, interpreter, jit
    skip = lambda *args, **kwargs: None  # noqa: E731
    with contextlib.ExitStack() as stack:
        for owner in (jit.JITFunction, autotuner.Autotuner, interpreter.InterpretedFunction):
            stack.enter_context(_patched(owner, "run", skip))
        stack.enter_context(_patched(backend, "INTERPRETER", True))
        stack.enter_context(backend.use_backend("auto"))
        yield


@contextlib.contextmanager
def _patched(owner, name, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


class HostCounts(TorchDispatchMode):
    """Counts host synchronisations (the aten ops that read a value, and Tensor.tolist, which reads a CPU tensor
    without one) and tensor allocations of what runs inside it."""

    def __init__(self):
        super().__init__()
        self.syncs = self.allocations = 0

    def __enter__(self):
        tolist = torch.Tensor.tolist

        def counted(tensor):
            self.syncs += 1
            return tolist(tensor)

        self._restore = contextlib.ExitStack()
        self._restore.enter_context(_patched(torch.Tensor, "tolist", counted))
        return super().__enter__()

    def __exit__(self, *exc):
        self._restore.close()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func._schema.name in READS_A_VALUE
        self.allocations += sum(ret.alias_info is None and str(ret.type) == "Tensor" for ret in func._schema.returns)
        return func(*args, **(kwargs or {}))


def measure_host(benchmark, call, case, impl):
    """Times call (gptfast's with no_launch, torch's as it is), after counting one call's syncs and allocations."""
    benchmark.group = f"host {case}"
    benchmark.extra_info.update(impl=impl, op="host", case=case)
    with no_launch() if impl.startswith("gptfast") else contextlib.nullcontext():
        call()  # caches and autotuners filled, as in any call after the first
        with HostCounts() as counts:
            call()
        benchmark.extra_info.update(syncs=counts.syncs, allocations=counts.allocations)
        benchmark(call)
    if benchmark.stats is not None:
        benchmark.extra_info["us_per_call"] = benchmark.stats.stats.min * 1e6


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, requires_grad=requires_grad)


ATTENTION_CASES = {"causal": dict(causal=True),
                   "window+softcap": dict(causal=True, window_size=(63, 0), softcap=30.0)}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("options", list(ATTENTION_CASES))
@pytest.mark.parametrize("impl", ["gptfast", "gptfast_sdpa", "torch"])
def test_attention_host(benchmark, impl, options, mode):
    """flash_attn_func, and gptfast's scaled_dot_product_attention, beside torch's SDPA (no window or softcap
    there) on (B, T, H, D) inputs (the SDPAs on their (B, H, T, D) transposes)."""
    if impl != "gptfast" and options != "causal":
        pytest.skip("SDPA has no window or softcap")
    backward = mode == "fwd_bwd"
    q, k, v = (randn(BATCH, SEQLEN, h, HEAD_DIM, requires_grad=backward) for h in (HEADS, KV_HEADS, KV_HEADS))
    grad_out = randn(BATCH, SEQLEN, HEADS, HEAD_DIM)
    if impl == "gptfast":
        attend = lambda: flash_attn_func(q, k, v, **ATTENTION_CASES[options])  # noqa: E731
    else:
        sdpa = F.scaled_dot_product_attention if impl == "torch" else scaled_dot_product_attention
        attend = lambda: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # noqa: E731
                              is_causal=True).transpose(1, 2)

    def call():
        out = attend()
        if backward:
            q.grad = k.grad = v.grad = None
            out.backward(grad_out)

    measure_host(benchmark, call, f"attention {mode} {options}", impl)


def test_kvcache_decode_host(benchmark):
    """flash_attn_with_kvcache as flash-attn's users call it: one new token per sequence, written and attended.
    Its value checks cost one synchronisation per call (the model's cached_attention makes none)."""
    batch, capacity = 2, 64
    k_cache, v_cache = (torch.zeros(batch, capacity, KV_HEADS, HEAD_DIM) for _ in range(2))
    q = randn(batch, 1, HEADS, HEAD_DIM)
    k, v = randn(batch, 1, KV_HEADS, HEAD_DIM), randn(batch, 1, KV_HEADS, HEAD_DIM)
    lengths = torch.full((batch,), 10, dtype=torch.int32)
    measure_host(benchmark, lambda: flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                            causal=True), "kvcache decode", "gptfast")


@pytest.mark.parametrize("impl", ["gptfast", "torch"])
def test_layer_norm_host(benchmark, impl):
    x, weight, bias = randn(TOKENS, WIDTH), randn(WIDTH), randn(WIDTH)
    norm = layer_norm if impl == "gptfast" else F.layer_norm
    measure_host(benchmark, lambda: norm(x, (WIDTH,), weight, bias), "layer_norm", impl)


@pytest.mark.parametrize("impl", ["gptfast", "torch"])
def test_linear_cross_entropy_host(benchmark, impl):
    """Forward and backward of the language-model loss: gptfast's fused one beside F.linear + F.cross_entropy."""
    hidden, weight = randn(TOKENS, WIDTH, requires_grad=True), randn(VOCAB, WIDTH, requires_grad=True)
    target = torch.randint(0, VOCAB, (TOKENS,))

    def call():
        hidden.grad = weight.grad = None
        if impl == "gptfast":
            loss = linear_cross_entropy(hidden, weight, target)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight), target)
        loss.backward()

    measure_host(benchmark, call, "linear_cross_entropy fwd_bwd", impl)


def test_gpt2_decode_step_host(benchmark):
    """One decoding step, without a CUDA graph, of GPT-2 small's structure (12 layers of 12 heads, a KV cache of 4
    sequences) at width 96 and a vocabulary of 512, so that the CPU's own matrix products stay small."""
    model = GPT(GPTConfig(vocab_size=512, n_layer=12, n_head=12, n_embd=96, block_size=64)).eval()
    cache = KVCache(model.config, 4, 64, "cpu")
    token = torch.zeros(4, dtype=torch.int64)
    with torch.no_grad(), no_launch():
        prefill(model, [torch.zeros(10, dtype=torch.int64)] * 4, cache)

    def call():
        with torch.no_grad():
            decode_step(model, token, cache)
        cache.seqlens.sub_(1)  # the step advanced them: every call decodes at the same position

    measure_host(benchmark, call, "gpt2 decode step", "gptfast")
