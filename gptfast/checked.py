"""Checks paid once per signature: a public call's validation and the flags it derives depend only on its
arguments' dtypes, shapes, devices and flag values, so a repeated call looks its answer up instead of running the
checks again (a call's host work: benchmarks/bench_host.py)."""
import torch

from gptfast.kernels import remember

_answers = {}
_MISSING = object()
_PLAIN = frozenset((type(None), bool, int, float, str))


def signature(args):
    """A key of args: a tensor by its dtype, shape and device, a tuple by its items' keys, any other value by its
    type and value (so that 1, 1.0 and True differ)."""
    # The plain values first: isinstance(None, torch.Tensor) is slow (torch's metaclass decides it).
    return tuple([(a.__class__, a) if a.__class__ in _PLAIN else signature(a) if a.__class__ is tuple else
                  (a.dtype, a.shape, a.device) if isinstance(a, torch.Tensor) else (a.__class__, a) for a in args])


def checked_once(check, *args):
    """check(*args), run the first time a signature of args comes up and looked up after. check may read of its
    tensor arguments only their dtypes, shapes and devices (a tensor whose values it reads must be turned into a
    value first), and no global state. A check that raises stores nothing (the next call raises again); arguments
    that cannot be hashed (a list) are checked every time, and so is everything under torch.compile (which runs
    the checks once while tracing and guards on what they read)."""
    if torch.compiler.is_compiling():
        return check(*args)
    key = (check, *signature(args))
    try:
        answer = _answers.get(key, _MISSING)
    except TypeError:
        return check(*args)
    if answer is _MISSING:
        answer = remember(_answers, key, check(*args))
    return answer
