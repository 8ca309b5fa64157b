"""Device math the kernels share."""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): softmaxes here run on exp2


@triton.jit
def tanh_f32(x):
    """tanh in float32 to about an ulp: an odd Taylor polynomial below 0.25 (where 1 - e^(-2|x|) would cancel),
    the exponential form above. Triton has no tanh, and libdevice's does not run in the interpreter."""
    ax = tl.abs(x)
    e = tl.exp2(ax * (-2.0 * LOG2E))
    x2 = x * x
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                       + x2 * 0.021869488536155203))))
    # fdiv: a division without IEEE's slow-path subroutine, whose call needs a stack frame in an inner loop.
    t = tl.where(ax < 0.25, small, tl.math.fdiv(1.0 - e, 1.0 + e))
    return tl.where(x < 0, -t, t)
