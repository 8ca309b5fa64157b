"""The eager fast path of flash_attn_func, scaled_dot_product_attention and the transformers integration's
attention: a plan per call signature, so that a repeated call does only its launch.

A call's checks, backend choice, feature description, autotuner and grid depend only on its tensors' dtypes, shapes,
strides and devices, its flags and a few global switches; its first call works them out through the full path
(gptfast.attention, attention_core, the custom op, the launcher), and where the kernels ran it a Plan keeps what the
launch needs (kernels.attention.ForwardLaunch). Later calls with the same key allocate the outputs and launch on the
tensors as given (flash_attn_func's (B, T, H, D) ones with their strides reordered for the kernels: no transposes),
through a small autograd.Function when a gradient is needed, whose backward keeps the launches its first run worked
out (kernels.attention.BackwardLaunch) in the plan too (benchmarks/bench_host.py measures what this saves; #25).

Planned: float16, bfloat16 and float32 calls on plain 4-dim tensors, outside torch.compile and functorch, without
dropout (a fresh seed a call), a mask, ALiBi, sinks, FP8 or attention probabilities; any causal mode, window,
softcap, chunk, scale, GQA and head dims. Everything else takes the full path every time. The key holds the global
switches a plan depends on: the backend, the interpreter flag, grad mode, and for float32 torch's tf32 setting;
forced variants (attention_tuning.forced_variants) empty the plans when they change.
"""
from typing import NamedTuple

import torch

from gptfast import backend
from gptfast.attention_core import kernel_features, kernel_gap, op_flags, output_grads
from gptfast.kernels import CHOICE_MEMOS, remember

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
PLAIN_SCALARS = frozenset((type(None), bool, int, float, str))
PLANNED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NO_TENSORS = (None,) * 7  # the custom op's optional tensors, mask to seqused_k
_plans = {}
CHOICE_MEMOS.append(_plans)  # forced variants change what a plan launches


class Plan(NamedTuple):
    """One signature's forward launch (kernels.attention.ForwardLaunch), its features (attention_spec.Features)
    and softmax scale, whether its tensors are (B, T, H, D) (flash-attn's layout) or (B, H, T, D) (torch's),
    whether it returns the lse, the alignment of q's, k's and v's addresses it was worked out
    for (TMA needs 16 bytes: kernels.attention._tma_ready), and its backward launches (BackwardLaunch) by what
    they depend on beyond the forward's signature (see backward_launch)."""
    launch: object
    features: object
    softmax_scale: float
    bthd: bool
    return_lse: bool
    aligned: bool
    backward: dict


def plan_key(q, k, v, window_size, scalars):
    """The key of a call (scalars: its API's name, then its other options), or None for a call that is never
    planned (module docstring). A key holds each option's class too, so that a window of (3.0, 0), which the
    checks refuse, never finds the plan of (3, 0)."""
    if (q.__class__ not in PLAIN_TENSORS or k.__class__ not in PLAIN_TENSORS or v.__class__ not in PLAIN_TENSORS
            or window_size.__class__ is not tuple or len(window_size) != 2 or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return None
    classes = tuple(map(type, scalars))
    if not PLAIN_SCALARS.issuperset(classes):  # a tensor, a dtype: the call is not planned
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    tf32 = q.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, window_size, tuple(map(type, window_size)), scalars, classes, tf32,
            backend.get_backend(), backend.INTERPRETER, grad)


def planned(key, q, k, v):
    """Runs the plan of key on q, k, v: out in their layout, or (out, lse) with return_lse; None when there is none
    (or the tensors' alignment differs from the plan's)."""
    plan = _plans.get(key)
    if plan is None or plan.aligned != _aligned(q, k, v):
        return None
    if key[-1]:  # a gradient is needed
        out, lse = _PlannedAttention.apply(q, k, v, plan)
    else:
        out, lse = plan.launch.run(q, k, v, plan.bthd)
    return (out, lse) if plan.return_lse else out


def make_plan(key, op, q, k, v, softmax_scale, causal, window=(-1, -1), softcap=0.0, chunk=0, deterministic=False,
              return_lse=False, bthd=False):
    """Keeps the plan of an op's call without dropout, a mask, ALiBi, sinks or FP8 just run through the full path,
    when the kernels ran it: q, k, v (B, H, T, D) as the kernels take them (bthd: the call's tensors were their
    (B, T, H, D) transposes), the options as checked (causal the mode, window a pair of ints, chunk an int,
    softmax_scale a float)."""
    from gptfast.kernels.attention import forward_launch
    if q.dim() != 4 or q.dtype not in PLANNED_DTYPES or not backend.use_triton(op, q.device, kernel_gap(
            q, v, softmax_scale, chunk)):
        return
    flags = op_flags(causal, window, chunk, softcap, 0.0, softmax_scale, deterministic)
    features = kernel_features(*NO_TENSORS, *flags[:8], flags[9])
    plan = Plan(forward_launch(q, k, v, softmax_scale, features), features, softmax_scale, bthd, bool(return_lse),
                _aligned(q, k, v), {})
    remember(_plans, key, plan)


def _aligned(*tensors):
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def backward_launch(plan, grad_out, grad_lse, q, k, v, out, lse):
    """The BackwardLaunch of plan for these tensors (kernels.attention.backward_launch, worked out the first time,
    from (B, H, T, D) views) by what it depends on beyond the plan's signature: grad_out's dtype, strides and
    alignment, and torch's deterministic setting."""
    key = (grad_out.dtype, grad_out.stride(), _aligned(grad_out), torch.are_deterministic_algorithms_enabled())
    launch = plan.backward.get(key)
    if launch is None:
        from gptfast.kernels import attention
        views = [t.transpose(1, 2) if plan.bthd else t for t in (grad_out, q, k, v, out)]
        launch = attention.backward_launch(views[0], grad_lse, *views[1:], lse, plan.softmax_scale, plan.features)
        plan.backward[key] = launch
    return launch


class _PlannedAttention(torch.autograd.Function):
    """A plan's forward with the custom op's autograd formula: q's, k's and v's gradients from the gradients of out
    and lse (attention_core's _backward)."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = plan.launch.run(q, k, v, plan.bthd)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out, grad_lse = output_grads(grad_out, grad_lse, out, lse)
        launch = backward_launch(ctx.plan, grad_out, grad_lse, q, k, v, out, lse)
        dq, dk, dv = launch.run(grad_out, grad_lse, q, k, v, out, lse, bthd=ctx.plan.bthd)[:3]
        return dq, dk, dv, None
