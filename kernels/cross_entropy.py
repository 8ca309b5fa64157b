"""Cross-entropy from logits in Triton: one program per row, which walks the vocabulary once for the loss and
once more for the gradient, and may write the gradient over the logits.

The loss uses an online log-sum-exp over vocabulary blocks (Milakov and Gimelshein, 2018, arXiv:1805.02867), so a
row of any length is read in blocks. Writing the gradient over the logits is what lets gptfast.loss's fused
linear cross-entropy hold one chunk of logits at a time (the design of Liger-Kernel's, Hsu et al., 2024,
arXiv:2410.10989).

Layouts: logits and grad (N, V), unit column stride, any row stride (grad may be logits itself), float16,
bfloat16 or float32; target (N,) int64, already checked to lie in [0, V) or equal ignore_index; loss (N,) float32;
row_scale (N,) float32 with any stride (0 to broadcast one value): what each row's gradient is multiplied by.
"""
import torch
import triton
import triton.language as tl

from gptfast.kernels.math import LOG2E, tanh_f32

BLOCK_V = 4096  # the vocabulary block on a GPU (16 values a thread at 8 warps)
# A register cap for the GPU: without one, ptxas held the gradient pass to 64 registers on sm_90 and spilled a word
# (`gptfast inspect`); with it, it takes 71.
MAX_REGISTERS = 128
INTERPRETER_BLOCK_V = 256  # smaller on the CPU, so that tests cross block edges


@triton.jit
def _logits(LOGITS, cols, mask, softcap, SOFTCAP: tl.constexpr):
    """(z, tanh): a block of logits as float32, capped to softcap * tanh(z / softcap) with SOFTCAP (the tanh is
    kept for the derivative; else a placeholder), -inf outside the mask."""
    z = tl.load(LOGITS + cols, mask=mask, other=0.0).to(tl.float32)
    tanh = z
    if SOFTCAP:
        tanh = tanh_f32(z * (1.0 / softcap))  # one division, not one per logit (IEEE's needs a stack frame)
        z = softcap * tanh
    return tl.where(mask, z, float("-inf")), tanh


@triton.jit
def cross_entropy_kernel(
        LOGITS, GRAD, TARGET, LOSS, ROW_SCALE, stride_logits, stride_grad, stride_scale, n_cols, ignore_index,
        label_smoothing, softcap,
        SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row. LOSS[row] = lse - (1 - eps) z_target - eps mean(z) (0 for an ignored row), and with
    WRITE_GRAD GRAD[row] = ROW_SCALE[row] * (softmax(z) - (1 - eps) onehot(target) - eps / V), through the softcap.
    Grid: (N,)."""
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * stride_logits
    target = tl.load(TARGET + row)
    cols = tl.arange(0, BLOCK_V)
    row_max = float("-inf")
    row_sum = 0.0
    logit_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        z, _ = _logits(LOGITS, start + cols, start + cols < n_cols, softcap, SOFTCAP=SOFTCAP)
        new_max = tl.maximum(row_max, tl.max(z, 0))
        row_sum = row_sum * tl.exp2((row_max - new_max) * LOG2E) + tl.sum(tl.exp2((z - new_max) * LOG2E), 0)
        row_max = new_max
        if SMOOTHING:
            logit_sum += tl.sum(tl.where(start + cols < n_cols, z, 0.0), 0)
    lse = row_max + tl.log2(row_sum) / LOG2E
    ignored = target == ignore_index
    safe_target = tl.where(ignored, 0, target)
    z_target, _ = _logits(LOGITS, safe_target, safe_target < n_cols, softcap, SOFTCAP=SOFTCAP)
    loss = lse - z_target
    if SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - logit_sum / n_cols)
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
    if WRITE_GRAD:
        scale = tl.where(ignored, 0.0, tl.load(ROW_SCALE + row * stride_scale))
        GRAD += row * stride_grad
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < n_cols
            z, tanh = _logits(LOGITS, start + cols, mask, softcap, SOFTCAP=SOFTCAP)
            grad = tl.exp2((z - lse) * LOG2E)
            grad -= tl.where(start + cols == target, 1.0 - label_smoothing, 0.0)
            if SMOOTHING:
                grad -= label_smoothing / n_cols
            grad *= scale
            if SOFTCAP:
                grad *= 1.0 - tanh * tanh
            tl.store(GRAD + start + cols, grad.to(GRAD.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits, target, ignore_index, label_smoothing, softcap, grad=None, row_scale=None):
    """Per-row losses (N,) float32 of logits (N, V); with grad (N, V) (which may be logits itself) and row_scale,
    also writes the scaled gradient of the logits into grad."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    on_gpu = logits.device.type == "cuda"
    launch = dict(num_warps=8, maxnreg=MAX_REGISTERS) if on_gpu else dict(num_warps=1)
    write = grad is not None
    cross_entropy_kernel[(n_rows,)](
        logits, grad if write else logits, target, loss, row_scale if write else loss, logits.stride(0),
        grad.stride(0) if write else 0, row_scale.stride(0) if write else 0, n_cols, ignore_index,
        float(label_smoothing), float(softcap or 1.0),
        SOFTCAP=bool(softcap), SMOOTHING=label_smoothing > 0, WRITE_GRAD=write,
        BLOCK_V=BLOCK_V if on_gpu else INTERPRETER_BLOCK_V, **launch)
    return loss
