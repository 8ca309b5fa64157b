"""gptfast's Triton kernels and their launchers, installed as ``gptfast.kernels``.

Launchers take tensors already checked by the public API in ``gptfast`` and trust them; each module documents
the layouts it expects."""
