"""gptfast: fused Triton kernels for GPT models, and the modules, model and tools built on them."""
__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "use_backend"]


def __getattr__(name):
    """GPT, GPTConfig and use_backend, imported on first use: importing torch takes seconds, and the `gptfast`
    command must answer --help without it."""
    if name in ("GPT", "GPTConfig"):
        from gptfast import model
        return getattr(model, name)
    if name == "use_backend":
        from gptfast.backend import use_backend
        return use_backend
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")
