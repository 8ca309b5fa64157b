"""LayerNorm and the fused residual add + LayerNorm, forward and forward+backward: gptfast against
torch.nn.functional.layer_norm and a torch.compile'd one.

GB/s counts the bytes that must move, as Triton's LayerNorm tutorial does: each input read once and each output
written once (weights and per-row statistics are negligible). For M rows of N elements of e bytes:
layer_norm forward 2MNe (x in, y out); its backward 3MNe (dy and x in, dx out); add_layer_norm forward 4MNe
(x and residual in, y and the sum out); its backward 5MNe (dy, the sum's gradient and the sum in; dx and the
residual's gradient out). forward+backward adds the two.
"""
import pytest
import torch
import torch.nn.functional as F

from gptfast import use_backend
from gptfast.layernorm import add_layer_norm, layer_norm
from harness import DEVICE, FULL, GPTFAST_BACKEND, measure, rotating

ROWS, HIDDEN = (16384, (768, 1024, 2048, 4096, 8192)) if FULL else (256, (768, 1024))
DTYPE = torch.bfloat16
ELEMENTS_MOVED = {("layer_norm", "fwd"): 2, ("layer_norm", "fwd_bwd"): 5, ("add_layer_norm", "fwd"): 4,
                  ("add_layer_norm", "fwd_bwd"): 9}  # times M * N


def torch_add_layer_norm(x, residual, weight, bias):
    summed = x + residual
    return F.layer_norm(summed, (x.shape[-1],), weight, bias), summed


def gptfast_layer_norm(x, weight, bias):
    with use_backend(GPTFAST_BACKEND):
        return layer_norm(x, (x.shape[-1],), weight, bias)


def gptfast_add_layer_norm(x, residual, weight, bias):
    with use_backend(GPTFAST_BACKEND):
        return add_layer_norm(x, residual, weight, bias)


def torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias)


IMPLS = {
    "layer_norm": {"gptfast": gptfast_layer_norm, "torch": torch_layer_norm, "torch-compile": torch_layer_norm},
    "add_layer_norm": {"gptfast": gptfast_add_layer_norm, "torch": torch_add_layer_norm,
                       "torch-compile": torch_add_layer_norm},
}


def _run(op, impl, hidden, mode, benchmark):
    if impl == "torch-compile" and DEVICE != "cuda":
        pytest.skip("torch.compile builds C++ for minutes on a CPU; the compiled baseline runs on CUDA only")
    backward = mode == "fwd_bwd"
    fn = IMPLS[op][impl]
    if impl == "torch-compile":
        fn = torch.compile(fn)
    n_inputs = 2 if op == "add_layer_norm" else 1

    def make_inputs():
        tensors = [torch.randn(ROWS, hidden, device=DEVICE, dtype=DTYPE, requires_grad=backward)
                   for _ in range(n_inputs)]
        grads = [torch.randn(ROWS, hidden, device=DEVICE, dtype=DTYPE) for _ in range(n_inputs)]
        return tensors, grads

    take = rotating(make_inputs, 2 * n_inputs * ROWS * hidden * DTYPE.itemsize)
    weight = torch.randn(hidden, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    bias = torch.randn(hidden, device=DEVICE, dtype=DTYPE, requires_grad=backward)

    def step():
        tensors, grads = take()
        if not backward:
            return fn(*tensors, weight, bias)
        for t in (*tensors, weight, bias):
            t.grad = None
        outputs = fn(*tensors, weight, bias)
        torch.autograd.backward(outputs if isinstance(outputs, tuple) else (outputs,), grads)

    measure(benchmark, step, cpu_twin="torch", group=f"{op} {mode} {str(DTYPE)[6:]} N={hidden}", impl=impl,
            bytes_moved=ELEMENTS_MOVED[op, mode] * ROWS * hidden * DTYPE.itemsize, op=op, mode=mode,
            dtype=str(DTYPE)[6:], hidden=hidden, rows=ROWS)


CASES = [(op, mode, hidden) for op in IMPLS for mode in ("fwd", "fwd_bwd") for hidden in HIDDEN]
IDS = [f"{op}-{mode}-N{hidden}" for op, mode, hidden in CASES]


@pytest.mark.parametrize("impl", ["gptfast", "torch"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_norm(benchmark, case, impl):
    _run(case[0], impl, case[2], case[1], benchmark)


# torch.compile builds one kernel per shape: two hidden sizes keep the build time within the GPU check's budget.
COMPILED_CASES = [case for case in CASES if case[2] in (HIDDEN[0], HIDDEN[-2])]


@pytest.mark.compiled
@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: f"{c[0]}-{c[1]}-N{c[2]}")
def test_layer_norm_compiled_baseline(benchmark, case):
    _run(case[0], "torch-compile", case[2], case[1], benchmark)
