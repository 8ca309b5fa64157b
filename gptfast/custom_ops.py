"""gptfast's custom ops, callable from eager code without torch's dispatch.

torch.compile captures a Triton kernel only inside a ``torch.library.custom_op`` (with a fake implementation and
an autograd formula), but calling through one costs about 12 us on this repository's CPU, 20 us with its autograd
wrapper (benchmarks/bench_host.py): as much as a small call's whole host work should be. A ``CustomOp`` registers
the op as torch would and, when called outside torch.compile on plain tensors, runs the op's own implementation
directly: through an autograd.Function built from the op's own setup_context and backward when a gradient will be
needed, as it is when not. Fake tensors, functional tensors, DTensors and other subclasses, and functorch's
transforms (vmap, grad), take the op.
"""
import torch

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype)  # the ops' other arguments


class CustomOp:
    """``torch.library.custom_op(name, impl)`` (no argument mutated), with register_fake and register_autograd as
    torch's, called like the op (see the module docstring)."""

    def __init__(self, name, impl):
        self.op = torch.library.custom_op(name, impl, mutates_args=())
        self.impl = impl
        self.function = None

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        # forward(ctx, ...) rather than a separate setup_context: Function.apply binds a setup_context Function's
        # arguments through inspect.signature on every call, about 150 us on this repository's CPU.
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self.function = type(f"Eager_{impl.__name__}", (torch.autograd.Function,),
                             {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *inputs):
        needs_grad = False
        for value in inputs:
            kind = value.__class__
            if kind in PLAIN_TENSORS:
                needs_grad = needs_grad or value.requires_grad
            elif kind not in PLAIN_VALUES:
                return self.op(*inputs)  # a tensor subclass (or an unexpected value: the op's schema says)
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return self.op(*inputs)
        if needs_grad and self.function is not None and torch.is_grad_enabled():
            return self.function.apply(*inputs)
        return self.impl(*inputs)


def custom_op(name):
    """A decorator making a CustomOp of name from its implementation."""
    return lambda impl: CustomOp(name, impl)
