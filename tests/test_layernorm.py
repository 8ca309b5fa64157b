"""gptfast.layernorm against float64 PyTorch: output and every gradient (input, residual, weight, bias) over odd
shapes and every dtype, the chunked path for long rows, determinism, the module's state_dict, bad input."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from gptfast import backend
from gptfast.layernorm import LayerNorm, RMSNorm, add_layer_norm, add_rms_norm, layer_norm, rms_norm
from tolerance import DEVICE, DTYPES, assert_accurate


def random_inputs(shape, n_cols, dtype, affine, seed, residual=False):
    """x with a non-zero mean and scale (as a residual stream has), weight, bias and maybe a residual."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)
    x = rand(*shape) * 2 + 0.5
    weight = rand(n_cols) if affine in ("weight", "both") else None
    bias = rand(n_cols) if affine in ("bias", "both") else None
    return x, weight, bias, (rand(*shape) if residual else None)


def check_layer_norm(shape, dtype, affine, seed=0, residual=False, rms=False):
    """rms: RMSNorm (rms_norm, add_rms_norm) instead of LayerNorm; it has no bias."""
    n_cols = shape[-1]
    x, weight, bias, res = random_inputs(shape, n_cols, dtype, affine, seed, residual)
    if rms:
        bias = None
    leaves = {"x": x, "weight": weight, "bias": bias, "residual": res}
    leaves = {k: v for k, v in leaves.items() if v is not None}

    def run(impl, tensors):
        tensors = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
        if residual:
            out, summed = impl(tensors["x"], tensors["residual"], tensors.get("weight"), tensors.get("bias"))
        else:
            out, summed = impl(tensors["x"], None, tensors.get("weight"), tensors.get("bias")), None
        gen = torch.Generator().manual_seed(seed + 7)
        grad = torch.randn(out.shape, generator=gen).to(out)
        loss = (out * grad).sum()
        if summed is not None:
            loss = loss + (summed * grad.flip(-1)).sum()
        loss.backward()
        results = {"out": out, **{f"d{k}": v.grad for k, v in tensors.items()}}
        if summed is not None:
            results["sum"] = summed
        return results

    def norm(x, w, b):
        return F.rms_norm(x, (n_cols,), w, 1e-5) if rms else F.layer_norm(x, (n_cols,), w, b)

    def reference(x, r, w, b):
        return norm(x, w, b) if r is None else (norm(x + r, w, b), x + r)

    def kernel(x, r, w, b):
        if rms:
            return rms_norm(x, (n_cols,), w, 1e-5) if r is None else add_rms_norm(x, r, w, 1e-5)
        return layer_norm(x, (n_cols,), w, b) if r is None else add_layer_norm(x, r, w, b)

    with backend.use_backend("triton"):
        got = run(kernel, leaves)
    ref64 = run(reference, {k: v.double() for k, v in leaves.items()})
    lowp = run(reference, leaves)
    for name, value in got.items():
        assert value.dtype == dtype
        assert_accurate(name, value, ref64[name], lowp[name])


SHAPES = [(1, 1), (3, 5, 96), (7, 1000), (4, 768), (3, 1600), (2, 8200)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_float64_reference(shape, affine, dtype):
    check_layer_norm(shape, dtype, affine, seed=len(shape) + shape[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 96), (7, 1000), (2, 8200)], ids=str)
def test_add_layer_norm_matches_float64_reference(shape, dtype):
    check_layer_norm(shape, dtype, "both", seed=shape[-1], residual=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["weight", "none"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 96), (7, 1000), (2, 8200)], ids=str)
def test_rms_norm_matches_float64_reference(shape, residual, affine, dtype):
    """RMSNorm is the LayerNorm kernels' RMS switch: output and every gradient, with and without a residual."""
    check_layer_norm(shape, dtype, affine, seed=shape[-1] + 3, residual=residual, rms=True)


def test_rms_norm_long_rows_and_module():
    """The chunked path, and RMSNorm as a drop-in for torch.nn.RMSNorm (same state_dict; eps=None is the dtype's
    epsilon, as torch's)."""
    from gptfast.kernels import layernorm as kernels
    reference = torch.nn.RMSNorm(96)
    with torch.no_grad():
        reference.weight.normal_()
    module = RMSNorm(96)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(3, 96)
    with backend.use_backend("triton"):
        torch.testing.assert_close(module.to(DEVICE)(x.to(DEVICE)), reference.to(DEVICE)(x.to(DEVICE)))
    original = kernels.MAX_FUSED_N, kernels.CHUNK_N
    kernels.MAX_FUSED_N, kernels.CHUNK_N = 64, 32
    try:
        check_layer_norm((5, 1000), torch.float32, "weight", seed=4, rms=True)
    finally:
        kernels.MAX_FUSED_N, kernels.CHUNK_N = original


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 9), n_cols=st.integers(1, 2100), dtype=st.sampled_from(DTYPES),
       affine=st.sampled_from(["both", "weight", "none"]), residual=st.booleans(), seed=st.integers(0, 10_000))
def test_hypothesis_shapes(rows, n_cols, dtype, affine, residual, seed):
    check_layer_norm((rows, n_cols), dtype, affine, seed, residual)


@pytest.mark.parametrize("shape", [(5, 96), (2, 8200)], ids=str)
def test_add_layer_norm_mixed_dtypes(shape):
    """Under autocast a bf16 branch output meets a float32 residual stream: the sum and the output are float32,
    as PyTorch's x + residual makes them, and each gradient comes back in its input's dtype."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=gen).to(DEVICE, torch.bfloat16)
    residual, weight, bias = (torch.randn(s, generator=gen).to(DEVICE) for s in (shape, shape[-1:], shape[-1:]))
    grads = [torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2)]

    def run(impl, dtype=None):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, residual, weight, bias)]
        normed, summed = impl(*leaves)
        torch.autograd.backward((normed, summed), (grads[0].to(normed.dtype), grads[1].to(summed.dtype)))
        return {"out": normed, "sum": summed, **{f"d{n}": t.grad for n, t in zip(("x", "res", "w", "b"), leaves)}}

    reference = lambda x, r, w, b: (F.layer_norm(x + r, shape[-1:], w, b), x + r)
    with backend.use_backend("triton"):
        got = run(add_layer_norm)
    ref64, lowp = run(reference, torch.float64), run(reference)
    assert got["out"].dtype == got["sum"].dtype == torch.float32 and got["dx"].dtype == torch.bfloat16
    for name, value in got.items():
        assert value.dtype == lowp[name].dtype
        assert_accurate(name, value, ref64[name], lowp[name])


def test_long_rows_are_chunked_and_accurate(monkeypatch):
    """Rows longer than one block take the chunked path; shrink the block to cross many chunks cheaply."""
    from gptfast.kernels import layernorm as kernels
    monkeypatch.setattr(kernels, "MAX_FUSED_N", 64)
    monkeypatch.setattr(kernels, "CHUNK_N", 32)
    assert kernels._row_block(1000) == (32, False)
    check_layer_norm((5, 1000), torch.float32, "both", seed=1)
    check_layer_norm((5, 1000), torch.bfloat16, "both", seed=2, residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hidden_65536(dtype):
    """The largest hidden size the issue names, at its real chunk size: sixteen chunks per row."""
    check_layer_norm((2, 65536), dtype, "both", seed=11, residual=dtype == torch.bfloat16)


def test_multi_dim_normalized_shape():
    x = torch.randn(4, 5, 6).to(DEVICE)
    weight, bias = torch.randn(5, 6).to(DEVICE), torch.randn(5, 6).to(DEVICE)
    with backend.use_backend("triton"):
        out = layer_norm(x, (5, 6), weight, bias, eps=1e-3)
    ref = F.layer_norm(x.double(), (5, 6), weight.double(), bias.double(), eps=1e-3)
    assert (out.double() - ref).abs().max() < 1e-5


def test_eps_is_honoured():
    """With a variance of 1e-4, eps = 1e-2 changes the output by a factor of ten: it must match float64."""
    x = (torch.randn(2, 16) * 1e-2).to(DEVICE)
    with backend.use_backend("triton"):
        for eps in (1e-5, 1e-2):
            ref = F.layer_norm(x.double(), (16,), eps=eps)
            assert (layer_norm(x, (16,), eps=eps).double() - ref).abs().max() < 1e-5


def test_weight_gradients_are_deterministic():
    x, weight, bias, _ = random_inputs((50, 300), 300, torch.float32, "both", seed=3)
    grads = []
    for _ in range(2):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        with backend.use_backend("triton"):
            layer_norm(x, (300,), w, b).sum().backward()
        grads.append((w.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_module_loads_a_torch_state_dict():
    reference = torch.nn.LayerNorm(96, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    module = LayerNorm(96, eps=1e-6)
    assert module.state_dict().keys() == reference.state_dict().keys()
    module.load_state_dict(reference.state_dict())
    assert LayerNorm(8, bias=False).bias is None and LayerNorm(8, elementwise_affine=False).weight is None
    x = torch.randn(3, 96)
    with backend.use_backend("triton"):
        torch.testing.assert_close(module.to(DEVICE)(x.to(DEVICE)), reference.to(DEVICE)(x.to(DEVICE)))


@pytest.mark.parametrize("call, error, match", [
    (lambda: layer_norm(torch.randn(3, 8), (7,)), ValueError, "normalized_shape"),
    (lambda: layer_norm(torch.randn(3, 8), (3, 8, 1)), ValueError, "normalized_shape"),
    (lambda: layer_norm(torch.randn(3, 8), (8,), torch.randn(7)), ValueError, "weight must have shape"),
    (lambda: layer_norm(torch.randn(3, 8), (8,), None, torch.randn(2, 4)), ValueError, "bias must have shape"),
    (lambda: layer_norm(torch.randn(3, 8), (8,), torch.randn(8, device="meta")), ValueError, "weight is on meta"),
    (lambda: layer_norm("x", (8,)), TypeError, "input must be"),
    (lambda: add_layer_norm(torch.randn(3, 8), torch.randn(3, 9), None, None), ValueError, "one shape"),
    (lambda: add_layer_norm(torch.randn(3, 8), torch.randn(8), None, None), ValueError, "one shape"),
    (lambda: add_layer_norm(torch.randn(3, 8), torch.randn(3, 8), torch.randn(9), None), ValueError, "weight"),
])
def test_bad_input_raises_clearly(call, error, match):
    for name in ("auto", "triton", "torch"):
        with backend.use_backend(name), pytest.raises(error, match=match):
            call()


def test_float64_falls_back_visibly_or_raises():
    x = torch.randn(3, 8, dtype=torch.float64)
    backend._warned.clear()
    with backend.use_backend("auto"), pytest.warns(UserWarning, match="float64.*runs PyTorch"):
        torch.testing.assert_close(layer_norm(x, (8,)), F.layer_norm(x, (8,)))
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match="float64"):
        layer_norm(x, (8,))


def test_custom_ops_pass_opcheck():
    x, weight, bias, res = random_inputs((4, 40), 40, torch.float32, "both", seed=4, residual=True)
    for args in [(x, res, weight, bias, 1e-5, False), (x, None, None, bias, 1e-5, False),
                 (x, res, weight, None, 1e-6, True)]:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.gptfast.layer_norm.default, args)


def test_torch_compile_fullgraph():
    x, weight, bias, res = random_inputs((6, 48), 48, torch.float32, "both", seed=5, residual=True)
    x, weight = x.requires_grad_(), weight.requires_grad_()

    def loss(x, weight):
        normed, summed = add_layer_norm(x, res, weight, bias)
        return layer_norm(normed, (48,), weight).square().sum() + summed.sum()

    with backend.use_backend("triton"):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        expected = torch.autograd.grad(loss(x, weight), (x, weight))
        got = torch.autograd.grad(compiled(x, weight), (x, weight))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 2.0 ** 66), (torch.float32, 2.0 ** 100),
                                          (torch.float16, 2.0 ** 15)], ids=["fp32-1e20", "fp32-1e30", "fp16-6e4"])
@pytest.mark.parametrize("n_cols, chunked", [(300, False), (1000, True)])
def test_huge_finite_rows_normalise(monkeypatch, dtype, scale, n_cols, chunked):
    """Rows near 1e20 and 1e30 (float32; their squares pass float32's range) and near 6e4 (float16, its largest
    values). LayerNorm is scale-invariant, so x * scale (a power of two: exact) must give the output, weight and
    bias gradients of x, and scale times smaller input gradients, which the reference on x gives (eps / scale^2,
    as it is there, is 0). PyTorch itself returns zeros or NaN for the float32 rows."""
    from gptfast.kernels import layernorm as kernels
    if chunked:  # cross several chunks whose deviations need different scales
        monkeypatch.setattr(kernels, "MAX_FUSED_N", 64)
        monkeypatch.setattr(kernels, "CHUNK_N", 128)
    gen = torch.Generator().manual_seed(n_cols)
    x = (torch.rand(3, n_cols, generator=gen) * 3.6 - 1.8).to(dtype)  # |x * 2^15| < 6e4 <= float16's max
    x[0, :n_cols // 2] *= 1e-3  # a row whose chunks differ a thousandfold in spread
    weight, bias, grad = (torch.randn(*s, generator=gen).to(dtype) for s in ((n_cols,), (n_cols,), (3, n_cols)))

    def run(impl, x, eps):
        leaves = [t.detach().to(DEVICE, x.dtype).requires_grad_() for t in (x, weight, bias)]
        out = impl(leaves[0], (n_cols,), leaves[1], leaves[2], eps)
        out.backward(grad.to(out))
        return {"out": out, "dx": leaves[0].grad, "dweight": leaves[1].grad, "dbias": leaves[2].grad}

    with backend.use_backend("triton"):
        got = run(layer_norm, x * scale, eps=1e-5)
    got["dx"] = got["dx"].double() * scale  # undo the scaling of the input gradient (exact: a power of two)
    ref64 = run(F.layer_norm, x.double(), eps=0.0)
    lowp = run(F.layer_norm, x, eps=0.0)
    for name, value in got.items():
        assert_accurate(name, value.to(dtype), ref64[name], lowp[name], terms=n_cols)
    if dtype == torch.float32:  # the documented difference
        torch_out = F.layer_norm(x * scale, (n_cols,), weight, bias)
        assert not torch.allclose(torch_out.double(), ref64["out"].cpu(), atol=0.1)
