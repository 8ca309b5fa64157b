"""Fused LayerNorm and RMSNorm in Triton, with an optional residual add: forward and backward kernels and their
launchers. RMSNorm (Zhang and Sennrich, 2019) is the same kernels with the RMS flag: no mean is subtracted and
no bias added, y = x / sqrt(mean(x^2) + eps) * w.

Layouts, for every tensor the launchers take:
    x, residual, grad_y, grad_sum: (M, N) rows, unit column stride, any row stride; float16, bfloat16 or float32,
    x and residual not necessarily alike (under autocast a bf16 branch output meets a float32 residual stream).
    weight, bias: (N,) contiguous, or None. mean, rstd: (M,) float32.
All arithmetic is float32. With a residual the kernels normalise s = x + residual, rounded to the promoted dtype
of the two first (as PyTorch's x + residual would be), and also return s: that rounded sum is what the next block
adds to, and what the backward differentiates. The normalised output has s's dtype (x's without a residual).

A row that fits one block (N <= MAX_FUSED_N) is read once and kept in registers. A longer row is walked in
chunks twice (statistics, then normalisation), merging the chunks' statistics with Chan, Golub and LeVeque's
parallel variance update (1979), which stays accurate where sum-of-squares would cancel.

Any row of finite float32 values whose sum is finite normalises (|x| up to ~4e34 at N = 8192): when the row's
largest |x| exceeds SQUARE_SAFE, the deviations from the mean are divided by it before they are squared, so a row
of values near 1e20, whose squares pass float32's range, keeps a finite variance (PyTorch returns zeros or NaN
there). Ordinary rows never reach the threshold and are computed exactly as without it.

The weight and bias gradients are deterministic: each backward program sums its own rows into a private row of
a float32 buffer, and a second kernel adds those rows in a fixed order.
"""
import functools

import torch
import triton
import triton.language as tl

from gptfast.kernels import cdiv, device_arch, next_power_of_2
from gptfast.kernels.autotune import autotune

MAX_FUSED_N = 8192  # the largest padded row held in registers; longer rows are chunked
CHUNK_N = 4096  # the chunk of a longer row
# Rows with a larger |x| are scaled down before squaring. Below it, deviations are at most 2^41, and N of their
# squares stay far inside float32's range for any row a tensor can hold (2^31 * 2^82 = 2^113 < 2^128).
SQUARE_SAFE = tl.constexpr(2.0 ** 40)

# Tuning spaces: the num_warps to try, the same on every GPU architecture (a row kernel is bound by memory, not by
# the chip's tensor cores or shared memory). A row block is held in registers, so a config is used only when each
# thread holds at most ELEMENTS_PER_THREAD of it: the backward keeps seven row-sized arrays live, the forward
# three. `gptfast inspect` compiles each config at each block size it serves, for every architecture.
CONFIGS = {
    "forward": {"gpu": [4, 8, 16], "interpreter": [1]},
    "backward": {"gpu": [4, 8, 16], "interpreter": [1]},
}
ELEMENTS_PER_THREAD = {"forward": 32, "backward": 16}


def configs_for(kernel_name, arch, block_n):
    limit = 1 if arch == "interpreter" else ELEMENTS_PER_THREAD[kernel_name]
    table = "interpreter" if arch == "interpreter" else "gpu"
    return [triton.Config({}, num_warps=w) for w in CONFIGS[kernel_name][table]
            if arch == "interpreter" or block_n <= limit * 32 * w]


@triton.jit
def _square_scale(largest):
    """What deviations are divided by before squaring: 1, or `largest` when it exceeds SQUARE_SAFE."""
    return tl.where(largest > SQUARE_SAFE, largest, 1.0)


@triton.jit
def _chunk_stats(x, mask, count, RMS: tl.constexpr):
    """(mean, m2, scale) of the masked elements of one chunk (zero where masked): their mean (0 for RMS, whose
    deviations are from 0), and their sum of squared deviations M2 as m2 = M2 / scale^2. The scale comes from the
    largest |x|, which bounds every deviation by twice itself; in float32 a non-zero deviation is at least 2^-24 of
    it, so no scaled square underflows. (A scale from the deviations themselves would keep one more row-sized
    array live, and spilled.)"""
    mean = 0.0
    if not RMS:
        mean = tl.sum(x, 0) / count
    scale = _square_scale(tl.max(tl.abs(x), 0))
    centered = tl.where(mask, x - mean, 0.0) * (1.0 / scale)  # one division a row; exact when scale is 1
    return mean, tl.sum(centered * centered, 0), scale


@triton.jit
def _load_row_chunk(X, RES, SUM_OUT, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """x (+ residual, rounded to SUM_OUT's dtype, and stored when STORE_SUM) as float32."""
    x = tl.load(X + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(RES + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(SUM_OUT.dtype.element_ty)
        if STORE_SUM:
            tl.store(SUM_OUT + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _normalize_store(x, cols, mask, mean, rstd, W, B, Y, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = (x - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask).to(tl.float32)
    tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_forward_kernel(
        X, RES, W, B, Y, SUM_OUT, MEAN, RSTD,
        stride_x, stride_res, stride_y, stride_sum, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
        BLOCK_N: tl.constexpr, ROW_FITS: tl.constexpr):
    """One program per row. Grid: (M,)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    RES += row * stride_res
    Y += row * stride_y
    SUM_OUT += row * stride_sum
    cols = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        mask = cols < n_cols
        x = _load_row_chunk(X, RES, SUM_OUT, cols, mask, HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=True)
        mean, m2, scale = _chunk_stats(x, mask, n_cols, RMS=RMS)
    else:
        mean = 0.0
        m2 = 0.0
        scale = 1.0
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            x = _load_row_chunk(X, RES, SUM_OUT, start + cols, mask, HAS_RESIDUAL=HAS_RESIDUAL, STORE_SUM=True)
            count = tl.minimum(n_cols - start, BLOCK_N)
            chunk_mean, chunk_m2, chunk_scale = _chunk_stats(x, mask, count, RMS=RMS)
            # Chan et al.: merge (start, mean, M2) with (count, chunk_mean, chunk M2), all M2 at a common scale.
            total = start + count
            delta = chunk_mean - mean
            common = tl.maximum(tl.maximum(scale, chunk_scale), _square_scale(tl.abs(delta)))
            delta_scaled = delta / common
            m2 = (m2 * (scale / common) * (scale / common) + chunk_m2 * (chunk_scale / common) * (chunk_scale / common)
                  + delta_scaled * delta_scaled * start * count / total)
            scale = common
            mean = mean + delta * count / total
    # 1 / sqrt(M2 / N + eps) with M2 = m2 * scale^2, never forming scale^2, which may overflow (eps / scale / scale
    # then underflows to 0, as it should).
    rstd = 1.0 / (scale * tl.sqrt(m2 / n_cols + eps / scale / scale))
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    if ROW_FITS:
        _normalize_store(x, cols, mask, mean, rstd, W, B, Y, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)
    else:
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            if HAS_RESIDUAL:
                x = tl.load(SUM_OUT + start + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            _normalize_store(x, start + cols, mask, mean, rstd, W, B, Y, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS)


@triton.jit
def _backward_chunk(X, DY, W, cols, mask, mean, rstd, HAS_WEIGHT: tl.constexpr):
    """(xhat, dy, dy * w) of one chunk of a row, float32, zero outside the mask."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = dy
    if HAS_WEIGHT:
        wdy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return xhat, dy, wdy


@triton.jit
def _store_grad_x(DX, DRES, DSUM, cols, mask, xhat, wdy, c1, c2, rstd, HAS_DSUM: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy)), plus the gradient reaching the residual sum.
    With a residual, the residual's gradient (the same values) goes to its own buffer: autograd may accumulate
    into each input's gradient in place, so the two must not share memory."""
    dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DSUM:
        dx += tl.load(DSUM + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DRES + cols, dx.to(DRES.dtype.element_ty), mask=mask)
    tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_backward_kernel(
        DY, DSUM, X, W, MEAN, RSTD, DX, DRES, PARTIAL,
        stride_dy, stride_dsum, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
        HAS_WEIGHT: tl.constexpr, HAS_DSUM: tl.constexpr, RMS: tl.constexpr, BLOCK_N: tl.constexpr,
        ROW_FITS: tl.constexpr):
    """One program per group of rows_per_program rows. Writes dx (and, with DSUM, the same into DRES, whose row
    stride is dx's), and the group's sums of dy * xhat and dy into
    its own row of PARTIAL (n_programs, 2 * n_cols) float32. Grid: (n_programs,)."""
    first_row = tl.program_id(0) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    PARTIAL += tl.program_id(0).to(tl.int64) * 2 * n_cols
    cols = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        mask = cols < n_cols
        dw_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        for start in range(0, n_cols, BLOCK_N):  # the sums live in PARTIAL: start them at zero
            mask = start + cols < n_cols
            tl.store(PARTIAL + start + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=mask)
            tl.store(PARTIAL + n_cols + start + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=mask)
    # Row pointers start at the group's first row and move one row on per pass.
    first = first_row.to(tl.int64)
    x_row, dy_row, dsum_row = X + first * stride_x, DY + first * stride_dy, DSUM + first * stride_dsum
    dx_row, dres_row = DX + first * stride_dx, DRES + first * stride_dx
    MEAN += first
    RSTD += first
    for _ in range(first_row, last_row):
        mean = tl.load(MEAN)
        rstd = tl.load(RSTD)
        if ROW_FITS:
            xhat, dy, wdy = _backward_chunk(x_row, dy_row, W, cols, mask, mean, rstd, HAS_WEIGHT=HAS_WEIGHT)
            c1 = tl.sum(xhat * wdy, 0) / n_cols
            c2 = tl.sum(wdy, 0) / n_cols
            # RMS subtracts no mean, so has no mean term. Zeroed rather than skipped: skipping it, ptxas allocated
            # the 16-warp, 8192-wide row so that it spilled 24 bytes on sm_90 (`gptfast inspect`).
            if RMS:
                c2 = c2 * 0.0
            _store_grad_x(dx_row, dres_row, dsum_row, cols, mask, xhat, wdy, c1, c2, rstd, HAS_DSUM=HAS_DSUM)
            dw_sum += dy * xhat
            db_sum += dy
        else:
            c1 = 0.0
            c2 = 0.0
            for start in range(0, n_cols, BLOCK_N):
                mask = start + cols < n_cols
                xhat, dy, wdy = _backward_chunk(x_row, dy_row, W, start + cols, mask, mean, rstd,
                                                HAS_WEIGHT=HAS_WEIGHT)
                c1 += tl.sum(xhat * wdy, 0)
                if not RMS:
                    c2 += tl.sum(wdy, 0)
            c1 = c1 / n_cols
            c2 = c2 / n_cols
            for start in range(0, n_cols, BLOCK_N):
                mask = start + cols < n_cols
                xhat, dy, wdy = _backward_chunk(x_row, dy_row, W, start + cols, mask, mean, rstd,
                                                HAS_WEIGHT=HAS_WEIGHT)
                _store_grad_x(dx_row, dres_row, dsum_row, start + cols, mask, xhat, wdy, c1, c2, rstd,
                              HAS_DSUM=HAS_DSUM)
                dw_ptrs = PARTIAL + start + cols
                tl.store(dw_ptrs, tl.load(dw_ptrs, mask=mask) + dy * xhat, mask=mask)
                tl.store(dw_ptrs + n_cols, tl.load(dw_ptrs + n_cols, mask=mask) + dy, mask=mask)
        x_row += stride_x
        dy_row += stride_dy
        dx_row += stride_dx
        dres_row += stride_dx
        dsum_row += stride_dsum
        MEAN += 1
        RSTD += 1
    if ROW_FITS:
        tl.store(PARTIAL + cols, dw_sum, mask=mask)
        tl.store(PARTIAL + n_cols + cols, db_sum, mask=mask)


@triton.jit
def weight_grad_kernel(PARTIAL, DW, DB, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """DW[c] and DB[c]: the sums over p of PARTIAL[p, c] and PARTIAL[p, n_cols + c], added in a fixed order.
    PARTIAL: (n_partials, 2 * n_cols) float32. Grid: (cdiv(n_cols, BLOCK_N),)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < n_partials) & (cols[None, :] < n_cols)
        ptrs = PARTIAL + rows[:, None].to(tl.int64) * 2 * n_cols + cols[None, :]
        dw += tl.load(ptrs, mask=mask, other=0.0)
        db += tl.load(ptrs + n_cols, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, 0), mask=cols < n_cols)
    tl.store(DB + cols, tl.sum(db, 0), mask=cols < n_cols)


# ----------------------------------------------------------------------------------------------------------------
# Launchers. They trust their caller (gptfast.layernorm checks every argument once, at the edge).

@functools.cache
def autotuned(kernel, kernel_name, arch, block_n):
    # Keyed on the row length alone: the row count only changes the grid, and the block size (the other thing a
    # config's fit depends on) is fixed per cached autotuner by block_n.
    return autotune(kernel, configs_for(kernel_name, arch, block_n), key=["n_cols"])


def _row_block(n_cols):
    """(BLOCK_N, ROW_FITS): the whole padded row when it fits, else CHUNK_N."""
    block = next_power_of_2(n_cols)
    return (block, True) if block <= MAX_FUSED_N else (CHUNK_N, False)


def layer_norm_forward(x, residual, weight, bias, eps, rms=False):
    """Returns (y, sum_out, mean, rstd): sum_out = x + residual in their promoted dtype (an empty tensor without a
    residual); y (M, N) in sum_out's dtype, or x's without a residual; mean (zeros with rms) and rstd (M,)
    float32. rms: RMSNorm instead of LayerNorm (bias must be None)."""
    n_rows, n_cols = x.shape
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((n_rows, n_cols), dtype=dtype, device=x.device)
    sum_out = torch.empty_like(y) if residual is not None else x.new_empty(0)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_n, row_fits = _row_block(n_cols)
    kernel = autotuned(layer_norm_forward_kernel, "forward", device_arch(x.device), block_n)
    # Absent tensors are passed as x: the constexpr flags keep the kernel from touching them.
    kernel[(n_rows,)](
        x, x if residual is None else residual, x if weight is None else weight, x if bias is None else bias,
        y, y if residual is None else sum_out, mean, rstd,
        x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), y.stride(0), n_cols, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RMS=rms,
        BLOCK_N=block_n, ROW_FITS=row_fits)
    return y, sum_out, mean, rstd


def backward_programs(device, n_rows):
    """How many programs share the rows in the backward: a few per multiprocessor, so the partial sums stay
    small; on the interpreter a few, so tests still cross program boundaries."""
    if device.type != "cuda":
        return max(1, min(n_rows, 3))
    return max(1, min(n_rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count))


def layer_norm_backward(grad_y, grad_sum, x, weight, mean, rstd, dx_dtype, dresidual_dtype, rms=False):
    """x is what the forward normalised (the residual sum, with one). Returns (dx, dresidual, dweight, dbias):
    dx (M, N) in dx_dtype; dresidual, equal to dx but in its own memory and dresidual_dtype, when grad_sum (the
    gradient reaching x + residual) is given, else an empty tensor; dweight and dbias (N,) float32 (dweight is the
    gradient of a weight of ones when weight is None)."""
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=dx_dtype, device=x.device)
    dresidual = torch.empty_like(dx, dtype=dresidual_dtype) if grad_sum is not None else x.new_empty(0)
    n_programs = backward_programs(x.device, n_rows)
    partial = torch.empty((n_programs, 2 * n_cols), dtype=torch.float32, device=x.device)
    block_n, row_fits = _row_block(n_cols)
    kernel = autotuned(layer_norm_backward_kernel, "backward", device_arch(x.device), block_n)
    kernel[(n_programs,)](
        grad_y, grad_y if grad_sum is None else grad_sum, x, x if weight is None else weight, mean, rstd, dx,
        dx if grad_sum is None else dresidual, partial,
        grad_y.stride(0), 0 if grad_sum is None else grad_sum.stride(0), x.stride(0), dx.stride(0),
        n_rows, n_cols, cdiv(n_rows, n_programs),
        HAS_WEIGHT=weight is not None, HAS_DSUM=grad_sum is not None, RMS=rms, BLOCK_N=block_n, ROW_FITS=row_fits)
    dweight = torch.empty(n_cols, dtype=torch.float32, device=x.device)
    dbias = torch.empty_like(dweight)
    block = 128 if x.device.type == "cuda" else 64
    weight_grad_kernel[(cdiv(n_cols, block),)](partial, dweight, dbias, n_programs, n_cols,
                                                      BLOCK_P=32, BLOCK_N=block)
    return dx, dresidual, dweight, dbias
