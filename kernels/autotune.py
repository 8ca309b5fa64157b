"""Autotuning paid once per machine: every gptfast autotuner keeps its timings on disk, and so does the choice
between the backward's variants (attention_tuning.fastest).

Triton's own `cache_results` stores an autotuner's timings in Triton's cache directory (TRITON_CACHE_DIR), keyed
by Triton's version, the GPU target (architecture and ptxas version), the kernel's source hash (its callees'
included), the tuning key (the key arguments' values, SPEC among them, and the argument dtypes) and the configs.
gptfast makes one autotuner per length bucket and table (attention_tuning._autotuner, decode._autotuner), whose
tuning keys and configs can agree across buckets, and an H100 and an H200 share a target: Scoped adds the
autotuner's scope (its buckets) and the GPU's name to the key on disk, so that none of them reads another's
timings. Triton keeps the disk cache off in the interpreter, which times nothing.
"""
import hashlib
import json

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.cache import get_cache_manager

from gptfast.kernels import AUTOTUNE


class Scoped(Autotuner):
    """triton's Autotuner whose timings on disk are keyed also by scope and the GPU's name (module docstring)."""

    def __init__(self, kernel, configs, key, scope, **options):
        super().__init__(kernel, kernel.arg_names, configs, key, options.pop("reset_to_zero", None), None,
                         cache_results=True, **options)
        self.scope = scope

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        scoped = (*tuning_key, *self.scope, gpu_name())
        hit = super().check_disk_cache(scoped, configs, bench_fn)
        if hit:  # Triton files the timings read from disk under the key it was given; the caller looks up its own
            self.cache[tuning_key] = self.cache.pop(scoped)
        return hit


def autotune(kernel, configs, key, scope=(), **options):
    """kernel under a Scoped autotuner over configs (only the first when GPTFAST_AUTOTUNE=0), keyed by the kernel
    arguments named in key; scope: what else the autotuner was made for (its length buckets). options: triton's
    (reset_to_zero)."""
    return Scoped(kernel, configs if AUTOTUNE else configs[:1], key, scope, **options)


def gpu_name():
    """The current CUDA device's name ("cpu" without one)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def stored_choice(key, choose, kernels=()):
    """choose()'s answer for key (a value whose str() describes it), measured once per GPU and kept in Triton's
    cache directory beside the autotuners' timings (keyed by Triton's version, the GPU's name, str(key) and the
    source hashes of kernels, the JIT functions choose runs)."""
    sources = "-".join(kernel.cache_key for kernel in kernels)
    digest = hashlib.sha256(f"{triton.__version__}-{gpu_name()}-{key}-{sources}".encode()).hexdigest()
    cache = get_cache_manager(digest)
    path = cache.get_file("choice.json")
    if path:
        with open(path) as stored:
            return json.load(stored)["choice"]
    choice = choose()
    cache.put(json.dumps({"key": str(key), "choice": choice}), "choice.json", binary=False)
    return choice
