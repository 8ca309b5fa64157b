"""The accuracy rule every kernel test applies, after FlashAttention's: against a float64 reference, the kernel's
error may be at most twice the error of plain PyTorch computing the same function in the kernel's dtype, plus a
floor for rounding that no implementation avoids:
- twice the dtype's rounding unit (torch.finfo(dtype).eps) at the reference's magnitude, or at 1 when the
  reference is smaller, in the spirit of FlashAttention's atol of 2 * (ref + 0.3 - 0.3 - ref): a lucky, exact
  PyTorch result must not demand more than the dtype can hold (the inputs are standard normal, so 1 is their
  natural magnitude);
- twice float32's rounding unit times sqrt(terms) at that magnitude: the kernels accumulate in float32, and a sum
  of `terms` products of standard-normal values (attention's dot products run over the head dim) keeps rounding
  of that size even where the exact result is 0. PyTorch can be exact there by structure (the dq of a query that
  sees one key is exactly 0), the kernel cannot.
For float32 this allows about 1e-6 relative; for float16 about 1e-3 and bfloat16 about 1e-2, which is what
rounding inputs and outputs to those types costs. A float32 result of a 16-bit call (the sinks' gradient, which
comes from the rounded output as FlashAttention's backward does) takes the floor of the call's dtype. NaN or inf
where the reference is finite always fails."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def max_error(actual, reference):
    return (actual.double() - reference.double()).abs().max().item() if reference.numel() else 0.0


def assert_accurate(name, actual, reference64, torch_lowp, terms=1, dtype=None):
    """actual: the kernel's result; reference64: float64 PyTorch; torch_lowp: PyTorch in actual's dtype;
    terms: the length of the longest float32 dot product behind the result; dtype: the call's, when its rounding
    is coarser than actual's own dtype."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert torch.isfinite(actual).all() or not torch.isfinite(reference64).all(), f"{name}: non-finite values"
    scale = reference64.abs().max().item() if reference64.numel() else 0.0
    eps = max(torch.finfo(actual.dtype).eps, torch.finfo(dtype or actual.dtype).eps)
    floor = 2 * (eps + torch.finfo(torch.float32).eps * terms ** 0.5) * max(scale, 1.0)
    error, baseline = max_error(actual, reference64), max_error(torch_lowp, reference64)
    assert error <= 2 * baseline + floor, (f"{name} ({actual.dtype}): max error {error:.3g} exceeds 2 x PyTorch's "
                                           f"{baseline:.3g} + rounding floor {floor:.3g}")
