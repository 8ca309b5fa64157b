"""Test setup: kernels run compiled on a CUDA machine, and through Triton's interpreter everywhere else.

TRITON_INTERPRET must be set before Triton wraps the kernels, so before anything imports gptfast."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GPTFAST_BACKEND", "auto")
