"""The dtypes gptfast's kernels take (float16, bfloat16, float32; float64 and the rest run PyTorch), and the reason
that a call with another one gives for its fallback."""
import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_gap(*named):
    """For (name, tensor or None) pairs: what the kernels do not cover about the first tensor whose dtype they do
    not take, for backend.use_triton; None when they take them all."""
    for name, t in named:
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return f"{name} of dtype {t.dtype} (only float16, bfloat16, float32)"
    return None
