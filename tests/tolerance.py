"""The accuracy rule every kernel test applies, after FlashAttention's: against a float64 reference, the kernel's
error may be at most twice the error of plain PyTorch computing the same function in the kernel's dtype, plus
twice the dtype's rounding unit (torch.finfo(dtype).eps) at the reference's magnitude, or at 1 when the reference
is smaller. The second term is
FlashAttention's atol of 2 * (ref + 0.3 - 0.3 - ref) in spirit: it keeps a lucky, exact PyTorch result (the dq of
a single key is exactly 0 in PyTorch, by the softmax's structure) from demanding more than the dtype can hold.
The inputs are standard normal, so 1 is their natural magnitude.

For float32 this means errors around 1e-6 relative; for float16 around 1e-3 and bfloat16 around 1e-2, which is
what rounding inputs and outputs to those types costs. NaN or inf where the reference is finite always fails."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def max_error(actual, reference):
    return (actual.double() - reference.double()).abs().max().item() if reference.numel() else 0.0


def assert_accurate(name, actual, reference64, torch_lowp):
    """actual: the kernel's result; reference64: float64 PyTorch; torch_lowp: PyTorch in actual's dtype."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert torch.isfinite(actual).all() or not torch.isfinite(reference64).all(), f"{name}: non-finite values"
    scale = reference64.abs().max().item() if reference64.numel() else 0.0
    ulp = 2 * torch.finfo(actual.dtype).eps * max(scale, 1.0)
    error, baseline = max_error(actual, reference64), max_error(torch_lowp, reference64)
    bound = 2 * baseline + ulp
    assert error <= bound, (f"{name} ({actual.dtype}): max error {error:.3g} exceeds 2 x PyTorch's {baseline:.3g} "
                            f"+ 2 eps {ulp:.3g}")
