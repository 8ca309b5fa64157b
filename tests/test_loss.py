"""gptfast.loss against float64 PyTorch: the fused linear cross-entropy and the plain one, the loss and every
gradient (hidden, weight, bias; logits), over odd N and V (V = 1, V past one block, GPT-2's 50257), ignored
targets, label smoothing, softcapping, every reduction and dtype; the peak memory it saves; bad input."""
import json
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gptfast import backend
from gptfast.loss import LinearCrossEntropyLoss, cross_entropy, linear_cross_entropy
from tolerance import DEVICE, DTYPES, assert_accurate


def torch_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, softcap=None):
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing).reshape(
        target.shape if reduction == "none" else ())


def inputs(n, vocab, width, dtype, seed, bias=True, ignored=0.2):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(vocab, width, generator=gen) / width ** 0.5).to(DEVICE, dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < ignored] = -100
    leaves = {"hidden": hidden, "weight": weight}
    if bias:
        leaves["bias"] = torch.randn(vocab, generator=gen).to(DEVICE, dtype)
    return leaves, target.to(DEVICE)


def check(fused, reference, leaves, target, reduction, seed, **options):
    """fused(**leaves, target=..., reduction=...) against reference in float64 and in the leaves' dtype: the loss
    and the gradient of every leaf, for a random gradient of the loss."""
    def run(fn, dtype):
        ins = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
        loss = fn(**ins, target=target, reduction=reduction, **options)
        grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)).to(loss)
        loss.backward(grad)
        return {"loss": loss, **{f"d{k}": v.grad for k, v in ins.items()}}

    dtype = next(iter(leaves.values())).dtype
    with backend.use_backend("triton"):
        got = run(fused, dtype)
    ref64, lowp = run(reference, torch.float64), run(reference, dtype)
    # The longest float32 sums: over the vocabulary (the lse, dhidden), the rows (dweight), the width (logits).
    terms = max(*leaves.get("weight", leaves.get("logits")).shape, target.numel())
    for name, value in got.items():
        assert_accurate(name, value.to(lowp[name].dtype) if name == "loss" else value, ref64[name], lowp[name],
                        terms=terms)


CASES = [  # (N, V, C): V of 1, under one block, across blocks (64 on the interpreter), GPT-2's
    (1, 1, 8), (7, 101, 24), (33, 257, 40), (130, 1000, 16), (3, 50257, 16)]
# Every reduction on the small cases; the large ones, whose interpreted "none" took 15 s per dtype in CI, with
# the mean (the reduction changes only the scale each row's gradient gets, the same code at every size).
REDUCED_CASES = [(case, reduction) for case in CASES for reduction in ("mean", "sum", "none")
                 if case[1] <= 257 or reduction == "mean"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, reduction", REDUCED_CASES,
                         ids=[f"N{n}V{v}C{c}-{reduction}" for (n, v, c), reduction in REDUCED_CASES])
def test_linear_cross_entropy_matches_float64(case, reduction, dtype):
    n, vocab, width = case
    leaves, target = inputs(n, vocab, width, dtype, seed=n + vocab, ignored=0.0 if n == 1 else 0.2)
    check(linear_cross_entropy, torch_linear_cross_entropy, leaves, target, reduction, seed=vocab)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(softcap=2.0), dict(bias=False),
                                     dict(label_smoothing=0.3, softcap=30.0)], ids=str)
def test_smoothing_softcap_and_no_bias(options, dtype):
    options = dict(options)
    leaves, target = inputs(45, 300, 32, dtype, seed=5, bias=options.pop("bias", True))
    check(linear_cross_entropy, torch_linear_cross_entropy, leaves, target, "mean", seed=6, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_from_logits(reduction, dtype):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 13, 150, generator=gen) * 3).to(DEVICE, dtype)
    target = torch.randint(0, 150, (2, 13), generator=gen).to(DEVICE)
    target[0, :4] = -100
    reference = lambda logits, **kw: F.cross_entropy(logits.float().transpose(1, 2), **kw, label_smoothing=0.05)
    fused = lambda logits, **kw: cross_entropy(logits, **kw, label_smoothing=0.05)
    check(fused, reference, {"logits": logits}, target, reduction, seed=8)


def test_all_targets_ignored_gives_what_torch_gives():
    leaves, target = inputs(6, 50, 8, torch.float32, seed=9)
    target[:] = -100
    for reduction in ("mean", "sum", "none"):
        with backend.use_backend("triton"):
            got = linear_cross_entropy(**leaves, target=target, reduction=reduction)
        torch.testing.assert_close(got, torch_linear_cross_entropy(**leaves, target=target, reduction=reduction),
                                   equal_nan=True)
    assert torch.isnan(got.new_tensor(float("nan"))) and torch.isnan(
        linear_cross_entropy(**leaves, target=target))  # mean over nothing: NaN, as torch


def test_the_module_and_leading_dims():
    leaves, target = inputs(24, 70, 16, torch.float32, seed=10)
    hidden, target = leaves["hidden"].reshape(2, 12, 16), target.reshape(2, 12)
    with backend.use_backend("triton"):
        got = LinearCrossEntropyLoss(reduction="none")(hidden, leaves["weight"], target, leaves["bias"])
    assert got.shape == (2, 12)
    torch.testing.assert_close(got, torch_linear_cross_entropy(hidden, leaves["weight"], target, leaves["bias"],
                                                               reduction="none"))


def peak_cpu_bytes(fn):
    """The peak of the CPU memory fn allocated, over what was allocated when it started, from torch's profiler:
    its memory events carry the allocator's running total, which is what the CUDA allocator's
    max_memory_allocated reports on a GPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def test_peak_memory_is_a_fraction_of_the_unfused():
    """Forward and backward of 512 tokens over a 1024-token vocabulary (small enough for the interpreter; the
    GPU benchmark measures GPT-2's): the unfused loss holds the logits, the softmax and their gradient; the fused
    one a chunk of logits and the weight's gradient. The issue's target is a quarter."""
    leaves, target = inputs(512, 1024, 16, torch.float32, seed=11)
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}

    def step(fn):
        return lambda: fn(**leaves, target=target).backward()

    with backend.use_backend("triton"):
        fused = peak_cpu_bytes(step(linear_cross_entropy))
    unfused = peak_cpu_bytes(step(torch_linear_cross_entropy))
    assert unfused > 512 * 1024 * 4 * 2 and fused < unfused / 4, (fused, unfused)


@pytest.mark.parametrize("call, error, match", [
    (lambda h, w, t: linear_cross_entropy(h, w, t * 0 + 10), ValueError, r"class indices in \[10, 10\]"),
    (lambda h, w, t: linear_cross_entropy(h, w, t - 200), ValueError, "outside"),
    (lambda h, w, t: linear_cross_entropy(h, w, t.int()), TypeError, "target must be an int64"),
    (lambda h, w, t: linear_cross_entropy(h, w, t[:3]), ValueError, r"target must have shape \(6,\)"),
    (lambda h, w, t: linear_cross_entropy(h, w[:, :5], t), ValueError, "weight must have shape"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, bias=torch.zeros(3)), ValueError, "bias must have shape"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, softcap=0.0), ValueError, "softcap"),
    (lambda h, w, t: cross_entropy(h, t + 100), ValueError, "outside"),
    (lambda h, w, t: cross_entropy(t, t), TypeError, r"cross_entropy: logits must be a floating tensor"),
])
def test_bad_input_raises_clearly_on_every_backend(call, error, match):
    leaves, target = inputs(6, 10, 8, torch.float32, seed=12, bias=False, ignored=0.0)
    for name in ("auto", "triton", "torch"):
        with backend.use_backend(name), pytest.raises(error, match=match):
            call(leaves["hidden"], leaves["weight"], target)
