"""Drop-in fused LayerNorm and RMSNorm: ``layer_norm`` and ``rms_norm`` (torch's signatures), ``LayerNorm`` and
``RMSNorm`` (torch's modules, same state_dict), and ``add_layer_norm`` and ``add_rms_norm``, the residual add and
the normalisation in one pass, as a pre-norm block needs.

The kernels are the custom ops ``gptfast::layer_norm`` and ``gptfast::layer_norm_backward`` with an autograd
formula, so ``torch.compile(fullgraph=True)`` captures them; eager calls skip their dispatch (gptfast.custom_ops).
``gptfast.backend`` picks kernel or PyTorch.
The kernels cover float16, bfloat16 and float32 inputs and weights of any row length; other dtypes run PyTorch
under ``auto`` and raise under ``GPTFAST_BACKEND=triton``.
"""
import math
import numbers

import torch
import torch.nn.functional as F

from gptfast import backend
from gptfast.checked import checked_once
from gptfast.custom_ops import custom_op
from gptfast.dtypes import dtype_gap


@custom_op("gptfast::layer_norm")
def _layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float,
                rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptfast.kernels.layernorm import layer_norm_forward
    return layer_norm_forward(x, residual, weight, bias, eps, rms)


@_layer_norm.register_fake
def _(x, residual, weight, bias, eps, rms):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = x.new_empty(x.shape, dtype=dtype)
    sum_out = torch.empty_like(y) if residual is not None else x.new_empty(0)
    mean = x.new_empty(x.shape[0], dtype=torch.float32)
    return y, sum_out, mean, torch.empty_like(mean)


@custom_op("gptfast::layer_norm_backward")
def _layer_norm_backward(grad_y: torch.Tensor, grad_sum: torch.Tensor | None, x: torch.Tensor,
                         weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, dx_dtype: torch.dtype,
                         dresidual_dtype: torch.dtype,
                         rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptfast.kernels.layernorm import layer_norm_backward
    return layer_norm_backward(grad_y, grad_sum, x, weight, mean, rstd, dx_dtype, dresidual_dtype, rms)


@_layer_norm_backward.register_fake
def _(grad_y, grad_sum, x, weight, mean, rstd, dx_dtype, dresidual_dtype, rms):
    dx = x.new_empty(x.shape, dtype=dx_dtype)
    dresidual = x.new_empty(x.shape, dtype=dresidual_dtype) if grad_sum is not None else x.new_empty(0)
    dweight = x.new_empty(x.shape[1], dtype=torch.float32)
    return dx, dresidual, dweight, torch.empty_like(dweight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, ctx.rms = inputs
    y, sum_out, mean, rstd = output
    # The backward differentiates the normalised tensor: x itself, or the residual sum.
    ctx.save_for_backward(x if residual is None else sum_out, weight, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.x_dtype, ctx.residual_dtype = x.dtype, x.dtype if residual is None else residual.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, grad_sum, grad_mean, grad_rstd):
    normalized, weight, mean, rstd = ctx.saved_tensors
    # Gradients may arrive expanded (stride 0, from a .sum()); the kernel wants unit column stride.
    n_cols = normalized.shape[1]
    grad_y = torch.zeros_like(normalized) if grad_y is None else _rows(grad_y, n_cols)
    grad_sum = _rows(grad_sum, n_cols) if grad_sum is not None else None
    dx, dresidual, dweight, dbias = _layer_norm_backward(
        grad_y, grad_sum if ctx.has_residual else None, normalized, weight, mean, rstd, ctx.x_dtype,
        ctx.residual_dtype, ctx.rms)
    return (dx, dresidual if ctx.has_residual else None, None if weight is None else dweight.to(weight.dtype),
            None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype), None, None)


_layer_norm.register_autograd(_backward, setup_context=_setup_context)


def _normalized_size(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(n) for n in normalized_shape)


def _check(op, input, normalized_shape, weight, bias, extra=()):
    """Raises a clear error for arguments no backend can run. Returns the row length N."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if len(normalized_shape) == 0 or tuple(input.shape[input.dim() - len(normalized_shape):]) != normalized_shape \
            or input.dim() < len(normalized_shape):
        raise ValueError(f"{op}: normalized_shape {list(normalized_shape)} must equal the last dims of input, "
                         f"whose shape is {list(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias), *extra):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != normalized_shape:
            raise ValueError(f"{op}: {name} must have shape {list(normalized_shape)} (normalized_shape), "
                             f"got {list(t.shape)}")
    return math.prod(normalized_shape)


def _kernel_gap(input, weight, bias, *others):
    if (gap := dtype_gap(("input", input), ("weight", weight), ("bias", bias), *others)) is not None:
        return gap
    if input.numel() == 0:
        return "empty tensors"
    return None


def _rows(t, n_cols):
    """(..., N) -> (M, N) with unit column stride: a view whenever one exists (t itself when it is one: a reshape
    costs microseconds of host time even when it changes nothing)."""
    rows = t if t.dim() == 2 else t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _flat(t):
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def _checked_normalize(op, input, normalized_shape, weight, bias):
    """_normalize's checks, once per signature (gptfast.checked): (normalized_shape as a tuple, the row length N,
    what the kernel does not cover or None)."""
    normalized_shape = _normalized_size(normalized_shape)
    n_cols = _check(op, input, normalized_shape, weight, bias)
    return normalized_shape, n_cols, _kernel_gap(input, weight, bias)


def _torch_norm(input, normalized_shape, weight, bias, eps, rms):
    if rms:
        return F.rms_norm(input, normalized_shape, weight, eps)
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def _normalize(op, input, normalized_shape, weight, bias, eps, rms):
    """layer_norm or rms_norm (rms, bias None) of checked arguments, on the kernel or on PyTorch."""
    normalized_shape, n_cols, gap = checked_once(_checked_normalize, op, input, normalized_shape, weight, bias)
    if not backend.use_triton(op, input.device, gap):
        return _torch_norm(input, normalized_shape, weight, bias, eps, rms)
    y = _layer_norm(_rows(input, n_cols), None, _flat(weight), _flat(bias), float(eps), rms)[0]
    return y if input.dim() == 2 else y.reshape(input.shape)


def _add_normalize(op, x, residual, weight, bias, eps, rms):
    """(norm(x + residual), x + residual) over the last dim, on the kernel or on PyTorch."""
    if not isinstance(x, torch.Tensor) or not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: x and residual must be torch.Tensors")
    if x.shape != residual.shape:
        raise ValueError(f"{op}: x and residual must have one shape, got {list(x.shape)} and "
                         f"{list(residual.shape)}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dim")
    normalized_shape = (x.shape[-1],)
    n_cols = _check(op, x, normalized_shape, weight, bias, extra=(("residual", residual),))
    if not backend.use_triton(op, x.device, _kernel_gap(x, weight, bias, ("residual", residual))):
        summed = x + residual
        return _torch_norm(summed, normalized_shape, weight, bias, eps, rms), summed
    y, summed, _, _ = _layer_norm(_rows(x, n_cols), _rows(residual, n_cols), weight, bias, float(eps), rms)
    return y.reshape(x.shape), summed.reshape(x.shape)


def _rms_eps(eps, input):
    """torch.nn.functional.rms_norm's default: the input dtype's machine epsilon."""
    return torch.finfo(input.dtype).eps if eps is None and isinstance(input, torch.Tensor) else eps


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Drop-in for ``torch.nn.functional.layer_norm``: normalises over the last ``len(normalized_shape)`` dims.

    Args:
        input: (..., *normalized_shape), any strides.
        weight, bias: normalized_shape, or None.
    Returns:
        input's shape and dtype; statistics and arithmetic in float32.
    """
    return _normalize("layer_norm", input, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """Drop-in for ``torch.nn.functional.rms_norm``: x / sqrt(mean(x^2) + eps) * weight over the last
    ``len(normalized_shape)`` dims. eps defaults to input's dtype's machine epsilon, as torch's. Shapes, dtypes and
    arithmetic as layer_norm's."""
    return _normalize("rms_norm", input, normalized_shape, weight, None, _rms_eps(eps, input), rms=True)


def add_layer_norm(x, residual, weight, bias, eps=1e-5):
    """``(layer_norm(x + residual), x + residual)`` in one pass over memory, normalising over the last dim.

    Args:
        x, residual: (..., N), same shape and device, any strides. Their dtypes may differ: under autocast a bf16
            branch output meets a float32 residual stream.
        weight, bias: (N,) or None.
    Returns:
        (normed, summed), x's shape, in the promoted dtype of x and residual. summed is rounded to that dtype
        before it is normalised, as ``x + residual`` followed by ``layer_norm`` would be.
    """
    return _add_normalize("add_layer_norm", x, residual, weight, bias, eps, rms=False)


def add_rms_norm(x, residual, weight, eps=None):
    """``(rms_norm(x + residual), x + residual)`` in one pass over memory, as add_layer_norm (Llama's blocks)."""
    return _add_normalize("add_rms_norm", x, residual, weight, None, _rms_eps(eps, x), rms=True)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on gptfast's kernel: same constructor, parameters and state_dict keys, so a torch
    checkpoint loads unchanged."""

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on gptfast's kernel: same constructor, parameters and state_dict keys."""

    def forward(self, input):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)
