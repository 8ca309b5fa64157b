"""Autotuning paid once per machine: every gptfast autotuner keeps its timings on disk, and so does the choice
between the backward's variants (attention_tuning.fastest).

Triton's own `cache_results` stores an autotuner's timings in Triton's cache directory (TRITON_CACHE_DIR), keyed
by Triton's version, the GPU target (architecture and ptxas version), the kernel's source hash (its callees'
included), the tuning key (the key arguments' values, SPEC among them, and the argument dtypes) and the configs.
gptfast makes one autotuner per length bucket and table (attention_tuning._autotuner, decode._autotuner), whose
tuning keys and configs can agree across buckets, and an H100 and an H200 share a target: Scoped adds the
autotuner's scope (its buckets) and the GPU's name to the key on disk, so that none of them reads another's
timings. Triton keeps the disk cache off in the interpreter, which times nothing.

Staged tuning: where an autotuner's configs come in variants (the same tiles under other switches: the attention
forward's pointer, TMA and persistent loads, the backward kernels' pointer and TMA loads), it times each variant's
first tile (its tuning table's lead) and then every tile of the fastest variant only, rather than every tile of
every variant: the first step's compilations fall from the sum of the variants' tiles to their count plus one
variant's tiles (GPT-2's training step on sm_90: tests/test_compilations.py). The variant's choice is kept on disk
too (stored_choice). The cost is that a variant whose lead is slower is never tried with its other tiles: a
coordinate search, as Triton's `prune_configs_by` lets a model prune before timing. GPTFAST_AUTOTUNE=all times
every config.
"""
import hashlib
import json

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from triton.runtime.cache import get_cache_manager

from gptfast.kernels import AUTOTUNE, EXHAUSTIVE


class Scoped(Autotuner):
    """triton's Autotuner whose timings on disk are keyed also by scope and the GPU's name, tuning in stages
    (module docstring)."""

    def __init__(self, kernel, configs, key, scope, **options):
        super().__init__(kernel, kernel.arg_names, configs, key, options.pop("reset_to_zero", None), None,
                         cache_results=True, **options)
        self.scope = scope

    def prune_configs(self, kwargs):
        """The configs to time for a new tuning key: the fastest variant's (its lead timed against the others'
        leads, or that choice read from disk), or all of them with one variant or GPTFAST_AUTOTUNE=all. Runs
        inside Autotuner.run, with the launch's arguments in self.nargs and kwargs."""
        configs = super().prune_configs(kwargs)
        groups = variants(configs)
        if len(groups) == 1 or EXHAUSTIVE:
            return configs
        arguments = tuple(self.nargs.values())

        def fastest_lead():
            timings = {name: self._bench(*arguments, config=group[0], **kwargs) for name, group in groups.items()}
            self.pre_hook({**self.nargs, **kwargs}, reset_only=True)  # what the timing runs wrote, zeroed again
            return min(timings, key=timings.get)
        key = ("variant", *self._tuning_key(kwargs), *self.scope, *groups)
        return groups[stored_choice(key, fastest_lead, kernels=(_jit_function(self.fn),))]

    def _tuning_key(self, kwargs):
        """The tuning key Autotuner.run makes of a launch's arguments: the key arguments' values, then every
        tensor argument's dtype."""
        arguments = {name: value for name, value in {**self.nargs, **kwargs}.items() if name in self.arg_names}
        return ([arguments[name] for name in self.keys if name in arguments]
                + [str(value.dtype) for value in arguments.values() if hasattr(value, "dtype")])

    def compilations(self):
        """How many configs tuning one key compiles at most: each variant's lead and the other tiles of the
        largest (all of them with one variant or GPTFAST_AUTOTUNE=all)."""
        groups = variants(self.configs)
        if len(groups) == 1 or EXHAUSTIVE:
            return len(self.configs)
        return len(groups) + max(len(group) for group in groups.values()) - 1

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


def variants(configs):
    """configs grouped by variant, in order: a config's variant is its switches but its tile sizes (BLOCK*),
    named by their repr."""
    groups = {}
    for config in configs:
        switches = sorted((name, value) for name, value in config.kwargs.items() if not name.startswith("BLOCK"))
        groups.setdefault(repr(switches), []).append(config)
    return groups


def _jit_function(kernel):
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


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
