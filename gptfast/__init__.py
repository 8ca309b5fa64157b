"""gptfast: fused Triton kernels for GPT models, and the modules, model and tools built on them."""
# Importing the backend reads GPTFAST_BACKEND, and mends Triton's interpreter when TRITON_INTERPRET=1.
from gptfast.backend import use_backend
from gptfast.model import GPT, GPTConfig

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "use_backend"]
