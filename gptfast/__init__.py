"""gptfast: fused Triton kernels for GPT models, and the modules, model and tools built on them."""
__version__ = "0.1.0"
