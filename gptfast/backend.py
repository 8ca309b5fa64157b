"""Which implementation an op runs: gptfast's Triton kernels or plain PyTorch.

The choice is explicit and read in one place: the environment variable ``GPTFAST_BACKEND`` (``auto``, the
default; ``triton``; ``torch``) sets it at import, and ``use_backend(name)`` overrides it inside a ``with`` block.

- ``auto``: CUDA tensors run the Triton kernels; CPU tensors run PyTorch, or the Triton kernels through Triton's
  interpreter when ``TRITON_INTERPRET=1``. A case the kernels do not cover falls back to PyTorch, with a warning
  the first time each reason comes up.
- ``triton``: the kernels or a clear error, never a fallback.
- ``torch``: always PyTorch (the reference path, for comparisons).
"""
import contextlib
import os
import warnings

BACKENDS = ("auto", "triton", "torch")


def _checked(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


_backend = _checked(os.environ.get("GPTFAST_BACKEND", "auto"), "GPTFAST_BACKEND")
# Triton decides at import whether its kernels are interpreted; this must agree with it.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRETER:
    from gptfast import interpreter_fix

    interpreter_fix.apply()


def get_backend():
    return _backend


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside the block with backend ``name`` (``auto``, ``triton`` or ``torch``)."""
    global _backend
    previous, _backend = _backend, _checked(name, "use_backend")
    try:
        yield
    finally:
        _backend = previous


def use_triton(op, device, unsupported=None):
    """Whether ``op`` runs its Triton kernel on ``device`` for this call.

    unsupported: None when the kernel covers the call, else what it does not cover (for the error message).
    Raises NotImplementedError when the backend is forced to ``triton`` and the kernel cannot run."""
    if _backend == "torch":
        return False
    runnable = device.type == "cuda" or (device.type == "cpu" and INTERPRETER)
    if _backend == "triton":
        if unsupported is not None:
            raise NotImplementedError(
                f"gptfast.{op}: the Triton kernel does not support {unsupported}; "
                "set GPTFAST_BACKEND=auto (or use_backend('auto')) to fall back to PyTorch")
        if not runnable:
            raise NotImplementedError(
                f"gptfast.{op}: tensors on {device} cannot run the Triton kernel, which needs a CUDA device "
                "(or TRITON_INTERPRET=1 on the CPU); set GPTFAST_BACKEND=auto to use PyTorch")
        return True
    if runnable and unsupported is not None and (op, unsupported) not in _warned:
        _warned.add((op, unsupported))
        warnings.warn(f"gptfast.{op}: the Triton kernel does not support {unsupported}, so this call runs "
                      "PyTorch (warned once per reason; GPTFAST_BACKEND=triton makes it an error)", stacklevel=3)
    return runnable and unsupported is None


_warned = set()  # (op, reason) pairs already warned about
