"""gptfast's custom ops, callable from eager code without torch's dispatch.

torch.compile captures a Triton kernel only inside a ``torch.library.custom_op`` (with a fake implementation and
an autograd formula), but calling through one costs about 12 us on this repository's CPU, 20 us with its autograd
wrapper (benchmarks/bench_host.py): as much as a small call's whole host work should be. A ``CustomOp`` registers
the op as torch would and, when called outside torch.compile on plain tensors, runs the op's own implementation
directly: through an autograd.Function built from the op's own setup_context and backward when a gradient will be
needed, as it is when not. Fake tensors, functional tensors, DTensors and other subclasses take the op.
"""
import torch

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


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
        self.function = type(f"Eager_{self.impl.__name__}", (torch.autograd.Function,),
                             {"forward": staticmethod(self.impl), "setup_context": staticmethod(setup_context),
                              "backward": staticmethod(backward)})

    def __call__(self, *inputs):
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        if torch.compiler.is_compiling() or any(type(t) not in PLAIN_TENSORS for t in tensors):
            return self.op(*inputs)
        if self.function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.function.apply(*inputs)
        return self.impl(*inputs)


def custom_op(name):
    """A decorator making a CustomOp of name from its implementation."""
    return lambda impl: CustomOp(name, impl)
