"""Corrections to Triton's CPU interpreter, applied only when TRITON_INTERPRET=1.

Triton 3.6's interpreter keeps bfloat16 as raw uint16 bits and its ``tl.dot`` multiplies those bits as integers
(triton-lang/triton#11584, closed unfixed: "we just don't support it yet"), so a bfloat16 attention kernel gives
values near 1e10 on the CPU. Without this, ``auto`` on the interpreter would return a silently wrong answer.
The fix widens bfloat16 operands to float32 (a bfloat16 is the top half of a float32) before the product, exactly
as the GPU's tensor cores treat them. Float operands that the interpreter already handles pass through unchanged,
so a Triton that fixes the bug upstream is unaffected.

Its rounding of float32 to float8 e4m3 (interpreter._convert_float) ORs a mantissa that rounds up past its top
into the exponent instead of adding it: 127.7 becomes 64, not 128 (and 500 wraps to 256 instead of saturating at
448, as the GPU's cvt.rn.satfinite does). FP8 attention rounds its weights to float8 in every key block, so such
results were off by whole percents. The fix converts to float8 e4m3 through torch, which rounds to nearest even
and saturates as the GPU does."""
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter


def _widen_bfloat16(handle):
    if handle.dtype == tl.bfloat16:
        widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(widened, tl.float32)
    return handle


def _to_float8(handle):
    """A float32 or float16 handle's values as float8 e4m3 bits (uint8, as the interpreter keeps them)."""
    values = torch.from_numpy(np.ascontiguousarray(handle.data, dtype=np.float32))
    bits = values.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return interpreter.TensorHandle(bits.reshape(handle.data.shape), tl.float8e4nv)


def apply():
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "gptfast_widens_bfloat16", False):
        return
    create_fp_to_fp = builder.create_fp_to_fp

    def create_fp_to_fp_rounding_float8(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar in (tl.float32, tl.float16):
            return _to_float8(src)
        return create_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = create_fp_to_fp_rounding_float8
    create_dot = builder.create_dot

    def create_dot_widening_bfloat16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, _widen_bfloat16(a), _widen_bfloat16(b), d, input_precision, max_num_imprecise_acc)

    create_dot_widening_bfloat16.gptfast_widens_bfloat16 = True
    builder.create_dot = create_dot_widening_bfloat16
