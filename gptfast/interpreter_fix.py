"""A correction to Triton's CPU interpreter, applied only when TRITON_INTERPRET=1.

Triton 3.6's interpreter keeps bfloat16 as raw uint16 bits and its ``tl.dot`` multiplies those bits as integers
(triton-lang/triton#11584, closed unfixed: "we just don't support it yet"), so a bfloat16 attention kernel gives
values near 1e10 on the CPU. Without this, ``auto`` on the interpreter would return a silently wrong answer.
The fix widens bfloat16 operands to float32 (a bfloat16 is the top half of a float32) before the product, exactly
as the GPU's tensor cores treat them. Float operands that the interpreter already handles pass through unchanged,
so a Triton that fixes the bug upstream is unaffected."""
import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def _widen_bfloat16(handle):
    if handle.dtype == tl.bfloat16:
        widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(widened, tl.float32)
    return handle


def apply():
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "gptfast_widens_bfloat16", False):
        return
    create_dot = builder.create_dot

    def create_dot_widening_bfloat16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, _widen_bfloat16(a), _widen_bfloat16(b), d, input_precision, max_num_imprecise_acc)

    create_dot_widening_bfloat16.gptfast_widens_bfloat16 = True
    builder.create_dot = create_dot_widening_bfloat16
