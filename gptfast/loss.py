"""Cross-entropy without the (N, V) logits in memory: ``linear_cross_entropy(hidden, weight, target)`` is
``F.cross_entropy(hidden @ weight.T + bias, target)``, computed a chunk of rows at a time: one matmul gives a
chunk's logits, gptfast's Triton kernel turns them into the loss and writes their gradient over them, and that
chunk's share of the hidden and weight gradients is taken before the next chunk (Liger-Kernel's fused linear
cross-entropy, Hsu et al., 2024, arXiv:2410.10989). ``cross_entropy(logits, target)`` is the same kernel for
logits one already has; ``LinearCrossEntropyLoss`` is the module.

Both are custom ops with autograd formulas (``gptfast::linear_cross_entropy``, ``gptfast::cross_entropy``; eager
calls skip their dispatch, gptfast.custom_ops). For
reductions mean and sum the gradients are computed in the forward pass, while the logits are at hand, and the
backward only scales them; for reduction none (each row's gradient weighted by its own grad_output) the backward
recomputes the logits chunk by chunk.
"""
import torch
import torch.nn.functional as F

from gptfast import backend
from gptfast.custom_ops import custom_op
from gptfast.dtypes import dtype_gap

REDUCTIONS = ("mean", "sum", "none")


def _chunk_rows(n_rows, vocab, width):
    """Rows per chunk: as many as make the chunk's logits about the size of the hidden states (Liger-Kernel's
    rule), a power of two."""
    rows = max(1, -(-n_rows // max(1, -(-vocab // width))))
    return 1 << (rows - 1).bit_length()


def _chunked(hidden, weight, bias, target, ignore_index, label_smoothing, softcap, row_scale=None):
    """(loss per row (N,) float32, grad_hidden, grad_weight, grad_bias): with row_scale (N,) the gradients of
    sum(row_scale * loss), grad_weight and grad_bias float32; else only the losses."""
    from gptfast.kernels.cross_entropy import cross_entropy_rows
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grads = row_scale is not None
    grad_hidden = torch.empty_like(hidden) if grads else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if grads and bias is not None else None
    chunk = _chunk_rows(n_rows, vocab, hidden.shape[1])
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        logits = F.linear(hidden[rows], weight, bias)
        loss[rows] = cross_entropy_rows(logits, target[rows], ignore_index, label_smoothing, softcap,
                                        grad=logits if grads else None,
                                        row_scale=row_scale[rows] if grads else None)
        if grads:  # logits now hold their gradient
            grad_hidden[rows] = logits @ weight
            grad_weight += (logits.t() @ hidden[rows]).float()
            if grad_bias is not None:
                grad_bias += logits.float().sum(0)
    return loss, grad_hidden, grad_weight, grad_bias


def _loss_scale(target, ignore_index, reduction):
    """What each row's loss is multiplied by in the reduced loss, as a (N,) view of one value: 1 for sum; for mean
    1 / (rows not ignored), inf when all are ignored (whose gradients are 0 anyway; the mean is then NaN, as
    torch's)."""
    if reduction == "sum":
        return torch.ones(1, device=target.device).expand(len(target))
    return (1.0 / (target != ignore_index).sum().float()).reshape(1).expand(len(target))


@custom_op("gptfast::linear_cross_entropy")
def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          target: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                          reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias). hidden (N, C), weight (V, C), bias (V,) or None, target (N,)
    int64 checked; softcap 0 for none. For mean and sum the gradients of the loss, in their inputs' dtypes (grad_bias
    empty without a bias); for none, all three empty."""
    if reduction == "none":
        loss = _chunked(hidden, weight, bias, target, ignore_index, label_smoothing, softcap)[0]
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    scale = _loss_scale(target, ignore_index, reduction)
    loss_rows, grad_hidden, grad_weight, grad_bias = _chunked(hidden, weight, bias, target, ignore_index,
                                                              label_smoothing, softcap, scale)
    grad_bias = hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype)
    return loss_rows.sum() * scale[0], grad_hidden, grad_weight.to(weight.dtype), grad_bias


@_linear_cross_entropy.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, softcap, reduction):
    if reduction == "none":
        return (hidden.new_empty(len(target), dtype=torch.float32), hidden.new_empty(0), hidden.new_empty(0),
                hidden.new_empty(0))
    grad_bias = hidden.new_empty(0) if bias is None else torch.empty_like(bias)
    return (hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight),
            grad_bias)


@custom_op("gptfast::linear_cross_entropy_backward")
def _linear_cross_entropy_backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
                                   label_smoothing: float,
                                   softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduction none's backward: the gradients of sum(grad_loss * loss), recomputing the logits chunk by chunk."""
    _, grad_hidden, grad_weight, grad_bias = _chunked(hidden, weight, bias, target, ignore_index, label_smoothing,
                                                      softcap, grad_loss.float())
    grad_bias = hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias


@_linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, weight, bias, target, ignore_index, label_smoothing, softcap):
    grad_bias = hidden.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _setup_linear(ctx, inputs, output):
    hidden, weight, bias, target, *ctx.options = inputs
    loss, *grads = output
    ctx.save_for_backward(hidden, weight, bias, target, *grads)


def _backward_linear(ctx, grad_loss, *unused):
    hidden, weight, bias, target, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    ignore_index, label_smoothing, softcap, reduction = ctx.options
    if reduction == "none":
        grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_backward(
            grad_loss, hidden, weight, bias, target, ignore_index, label_smoothing, softcap)
    else:  # the gradients of the loss are at hand: scale them by its own gradient
        grad_hidden, grad_weight, grad_bias = (g * grad_loss.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias))
    return grad_hidden, grad_weight, grad_bias if bias is not None else None, None, None, None, None, None


_linear_cross_entropy.register_autograd(_backward_linear, setup_context=_setup_linear)


@custom_op("gptfast::cross_entropy")
def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                   softcap: float) -> torch.Tensor:
    """Per-row losses (N,) float32 of checked logits (N, V)."""
    from gptfast.kernels.cross_entropy import cross_entropy_rows
    return cross_entropy_rows(logits, target, ignore_index, label_smoothing, softcap)


@_cross_entropy.register_fake
def _(logits, target, ignore_index, label_smoothing, softcap):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@custom_op("gptfast::cross_entropy_backward")
def _cross_entropy_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                            label_smoothing: float, softcap: float) -> torch.Tensor:
    """The gradient of sum(grad_loss * loss) with respect to logits, in their dtype."""
    from gptfast.kernels.cross_entropy import cross_entropy_rows
    grad = torch.empty_like(logits)
    cross_entropy_rows(logits, target, ignore_index, label_smoothing, softcap, grad=grad, row_scale=grad_loss.float())
    return grad


@_cross_entropy_backward.register_fake
def _(grad_loss, logits, target, ignore_index, label_smoothing, softcap):
    return torch.empty_like(logits)


def _setup_rows(ctx, inputs, output):
    logits, target, *ctx.options = inputs
    ctx.save_for_backward(logits, target)


def _backward_rows(ctx, grad_loss):
    logits, target = ctx.saved_tensors
    return _cross_entropy_backward(grad_loss, logits, target, *ctx.options), None, None, None, None


_cross_entropy.register_autograd(_backward_rows, setup_context=_setup_rows)


def _check(op, x, target, ignore_index, reduction, label_smoothing, softcap, name, last_dim):
    """Raises a clear error for arguments no backend can run (never a device-side assert on the GPU). x is the
    input called name, shaped (..., last_dim)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"{op}: {name} must be a floating tensor (..., {last_dim}), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be an int64 tensor of class indices, got "
                        f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.shape != x.shape[:-1]:
        raise ValueError(f"{op}: target must have shape {tuple(x.shape[:-1])} (the leading dims of its input), "
                         f"got {tuple(target.shape)}")
    if target.device != x.device:
        raise ValueError(f"{op}: target is on {target.device} but its input on {x.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be None or > 0, got {softcap}")


def _check_classes(op, target, ignore_index, vocab):
    """Every target is a class of the vocabulary or ignore_index: one synchronisation, skipped under
    torch.compile (as torch's own loss does everywhere), where the data-dependent check would split the graph."""
    if target.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.stack(torch.aminmax(target.masked_fill(target == ignore_index, 0))).tolist()
    if low < 0 or high >= vocab:
        raise ValueError(f"{op}: target holds class indices in [{low}, {high}], outside [0, {vocab}) and not "
                         f"ignore_index ({ignore_index})")


def _autocast(*tensors):
    """The tensors in autocast's dtype where autocast is on (the custom op runs below autocast, as F.linear would
    run under it), else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, softcap=None, *, check_classes=True):
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` without holding the logits.

    Args:
        hidden: (..., C) float16, bfloat16 or float32, e.g. a language model's last hidden states.
        weight: (V, C), the output projection (GPT's lm_head.weight); bias: (V,) or None.
        target: (...) int64 class indices in [0, V), or ignore_index.
        reduction: "mean" (over the targets not ignored; NaN when all are, as torch's), "sum" or "none".
        label_smoothing: as torch's. softcap: None, or > 0 to cap the logits to softcap * tanh(logits / softcap)
            before the loss (Gemma 2's final logits).
        check_classes: False skips checking that target lies in [0, V) (a host synchronisation), for a caller
            that already has (GPT checks its ids and targets in one).
    Returns:
        float32: a scalar, or (...) for reduction "none". Differentiable in hidden, weight and bias. Under
        autocast the matmuls run in its dtype, as F.linear's would.
    """
    op = "linear_cross_entropy"
    _check(op, hidden, target, ignore_index, reduction, label_smoothing, softcap, "hidden", "width")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (vocab, hidden) with hidden = {hidden.shape[-1]} (hidden's "
                         f"last dim), got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{op}: bias must have shape (vocab,) = ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias}")
    if check_classes:
        _check_classes(op, target, ignore_index, weight.shape[0])
    hidden, weight, bias = _autocast(hidden, weight, bias)
    rows, flat_target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if not backend.use_triton(op, hidden.device, dtype_gap(("hidden", hidden), ("weight", weight), ("bias", bias))):
        logits = F.linear(rows, weight, bias)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        loss = F.cross_entropy(logits.float(), flat_target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    else:
        loss = _linear_cross_entropy(rows, weight, bias, flat_target, ignore_index, float(label_smoothing),
                                     float(softcap or 0.0), reduction)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None):
    """``F.cross_entropy`` for logits (..., V) and class indices (...) int64, on gptfast's kernel: float32 math
    whatever the logits' dtype, and a gradient written straight in the logits' dtype, with no float32 copy of the
    logits or softmax held. Arguments and returns as linear_cross_entropy's."""
    op = "cross_entropy"
    _check(op, logits, target, ignore_index, reduction, label_smoothing, softcap, "logits", "vocab")
    _check_classes(op, target, ignore_index, logits.shape[-1])
    rows, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    if not backend.use_triton(op, logits.device, dtype_gap(("logits", logits))):
        if softcap:
            rows = softcap * torch.tanh(rows / softcap)
        loss_rows = F.cross_entropy(rows.float(), flat_target, ignore_index=ignore_index, reduction="none",
                                    label_smoothing=label_smoothing)
    else:
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        loss_rows = _cross_entropy(rows, flat_target, ignore_index, float(label_smoothing), float(softcap or 0.0))
    if reduction == "none":
        return loss_rows.reshape(target.shape)
    return loss_rows.sum() * _loss_scale(flat_target, ignore_index, reduction)[0]


class LinearCrossEntropyLoss(torch.nn.Module):
    """The module form: ``LinearCrossEntropyLoss(ignore_index=-100, reduction="mean", label_smoothing=0.0,
    softcap=None)(hidden, weight, target, bias=None)``, as linear_cross_entropy."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.softcap = label_smoothing, softcap

    def forward(self, hidden, weight, target, bias=None):
        return linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, self.softcap)
