"""What the attention kernels' autotuner may choose from, per GPU architecture, and how a call picks.

Each (kernel, architecture) has its own list of tiles: shared memory per block (64 KiB on Turing, 99 KiB on
sm_86, sm_89 and sm_120, 163 KiB on sm_80, 227 KiB on sm_90 and sm_100) and register files decide what fits, and
every tile here compiles for its head dims without spills or shared-memory overflow on its architecture
(`gptfast inspect --arch ...`; every (kernel, padded head dim, dtype) has at least two, but the feature tiles of
the dk/dv and dq kernels at 512, where one fits per architecture). float32 inputs run their full-precision dots on
FMA units and take far smaller tiles (one list for every architecture, to head dim 256: past it the kernels run
16-bit inputs only, without dropout, chunks or gptfast.flex's mods; attention_core.kernel_gap). Turing (sm_75) has
no attention table: Triton 3.6 compiles tl.dot there to FMA instructions (a 64 x 64 float16 dot: 2048 FFMA, no
HMMA), its head-dim-128 backward tiles spill hundreds of bytes even at 16 x 16, and torch's SDPA runs the chip's
tensor cores, so gptfast.attention hands such GPUs to PyTorch.

Variants, chosen per shape by timing on the device (each can be forced, for tests and benchmarks; an
autotuner over several times their lead tiles first, then the fastest one's tiles: kernels/autotune.py):
- forward: "pointers" (loads through pointer tiles, every architecture), "tma" (K and V through tensor
  descriptors, sm_90 and newer, plain 16-bit attention whose K and V rows are 16-byte aligned; float32 tiles
  spill with it) or "tma_persistent" (the same on a persistent grid, longest causal tiles first). Warp
  specialisation is not among them: Triton 3.6's pass aborts on this kernel's key loop, causal or not, at
  num_warps=4 (an MLIR dominance assertion, and `processProducerCommitOp` in WSLowerToken.cpp). The backward
  kernels load their streamed operands (q and dO, or k and v) through pointers or, where the forward may use
  TMA, through tensor descriptors: a tuning choice of their autotuners too.
- backward: "two_kernel" (a dk/dv kernel and a dq kernel, 7 matrix products per block pair, no atomics:
  bit-reproducible) or "single_pass" (one kernel adds dq with float32 atomics, 5 products; head dims up to 128:
  at 256 its tiles spill on every architecture). Deterministic calls and calls that need an additive mask's
  gradient always take "two_kernel".
"""
import contextlib
import functools
from typing import NamedTuple

import torch
import triton

from gptfast.kernels import AUTOTUNE, FP8_MIN_K, forget_choices, next_power_of_2
from gptfast.kernels.autotune import autotune, stored_choice


class Tile(NamedTuple):
    """One tuning entry. block_m counts query rows and block_n key rows, in every kernel. dims: the padded head
    dims it serves; mod_dims: those at which it serves gptfast.flex's calls, when they differ (a mod that gathers
    from a tensor, a bias table or a bitmask, takes registers that some tiles do not have)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    dims: tuple
    mod_dims: tuple | None = None

    def serves(self, block_d, modded):
        return block_d in (self.mod_dims if modded and self.mod_dims is not None else self.dims)


UP_TO_64, UP_TO_128, UP_TO_256 = (16, 32, 64), (16, 32, 64, 128), (16, 32, 64, 128, 256)
UP_TO_512 = (*UP_TO_256, 512)
ONLY_256, ONLY_512 = (256,), (512,)
# ptxas otherwise sometimes holds a config far below the register file (72 registers where 255 are free) and
# spills a word; the cap lets it use what the config's warps leave. (A cap of 65536 / threads at 16 warps made
# ptxas spill 8 bytes where it used 114 registers under this one: `gptfast inspect` checks the block fits instead.)
MAX_REGISTERS = 255
REGISTER_FILE = 65536  # 32-bit registers per multiprocessor on every listed arch: one block must fit in it
TMA_ARCHS = ("sm_90", "sm_100")
SINGLE_PASS_MAX_HEAD_DIM = 128
KERNELS = ("forward", "backward_dkdv", "backward_dq", "backward_single_pass")

# The interpreter runs small blocks, so that the CPU tests cross many block edges.
INTERPRETER = [Tile(16, 16, 1, 1, UP_TO_512)]

# Head dim 512 (Gemma 4's global layers): a 512-wide accumulator and q tile leave room for 16 or 32 rows only.
FORWARD_512 = [Tile(32, 64, 8, 1, ONLY_512), Tile(32, 32, 8, 2, ONLY_512), Tile(16, 32, 4, 1, ONLY_512)]
SM_90 = {
    "forward": [Tile(128, 64, 8, 3, UP_TO_128), Tile(128, 128, 8, 3, UP_TO_128), Tile(64, 64, 4, 3, UP_TO_128),
                Tile(64, 64, 8, 2, UP_TO_256), Tile(128, 32, 8, 2, UP_TO_256), *FORWARD_512],
    "backward_dkdv": [Tile(32, 128, 8, 2, UP_TO_64), Tile(64, 128, 8, 1, UP_TO_64), Tile(32, 64, 8, 1, UP_TO_128),
                      Tile(16, 128, 8, 2, UP_TO_128),
                      # A 256-wide dk, dv pair fits in registers only with these; they run HMMA, not wgmma.
                      Tile(32, 32, 8, 2, ONLY_256), Tile(16, 32, 4, 1, ONLY_256),
                      Tile(16, 16, 8, 1, ONLY_512), Tile(32, 16, 8, 1, ONLY_512)],
    "backward_dq": [Tile(128, 64, 8, 2, UP_TO_128), Tile(128, 32, 8, 1, UP_TO_128), Tile(64, 64, 4, 2, UP_TO_128),
                    Tile(64, 32, 8, 2, UP_TO_256),
                    # the second at 256: HMMA; 64- and 128-row tiles spill there (gptfast inspect)
                    Tile(32, 32, 4, 1, ONLY_256),
                    Tile(32, 32, 8, 1, ONLY_512), Tile(32, 16, 8, 1, ONLY_512), Tile(16, 32, 8, 1, ONLY_512)],
    "backward_single_pass": [Tile(32, 64, 8, 1, UP_TO_64), Tile(16, 32, 4, 1, UP_TO_128),
                             Tile(32, 32, 8, 1, UP_TO_128)],
}
SM_100 = {  # the tcgen05 instructions hold fewer operands in registers: the largest sm_90 tiles spill here
    **SM_90,
    "forward": [Tile(128, 64, 8, 3, UP_TO_128), Tile(128, 128, 8, 3, (16, 32)), Tile(64, 64, 4, 3, UP_TO_128),
                Tile(64, 64, 8, 2, UP_TO_256), Tile(128, 32, 8, 2, UP_TO_128), Tile(32, 32, 4, 2, ONLY_256),
                *FORWARD_512],
    "backward_dkdv": [Tile(64, 128, 8, 1, UP_TO_64), Tile(32, 64, 8, 1, UP_TO_128), Tile(16, 128, 8, 2, UP_TO_64),
                      Tile(32, 32, 8, 2, (128, 256)), Tile(16, 32, 4, 1, ONLY_256),
                      Tile(16, 16, 8, 1, ONLY_512), Tile(32, 16, 8, 1, ONLY_512)],
}
SM_80 = {
    "forward": [Tile(128, 64, 8, 3, UP_TO_64), Tile(64, 64, 4, 3, UP_TO_128), Tile(128, 32, 8, 2, UP_TO_128),
                Tile(64, 32, 4, 2, UP_TO_128), Tile(64, 64, 8, 2, UP_TO_256), Tile(32, 32, 4, 2, ONLY_256),
                *FORWARD_512],
    "backward_dkdv": [Tile(32, 64, 8, 1, UP_TO_128), Tile(32, 32, 8, 2, (64, 128)), Tile(32, 32, 4, 1, UP_TO_64),
                      Tile(16, 32, 4, 1, UP_TO_256), Tile(16, 16, 4, 1, ONLY_256),
                      Tile(16, 16, 8, 1, ONLY_512), Tile(32, 16, 8, 1, ONLY_512)],
    "backward_dq": [Tile(128, 64, 8, 2, (16, 64)), Tile(128, 32, 8, 1, UP_TO_128), Tile(64, 32, 8, 2, UP_TO_256),
                    Tile(32, 32, 4, 1, UP_TO_256),
                    Tile(32, 32, 8, 1, ONLY_512), Tile(32, 16, 8, 1, ONLY_512), Tile(16, 32, 8, 1, ONLY_512)],
    "backward_single_pass": [Tile(32, 64, 8, 1, (16, 32, 128)), Tile(16, 32, 4, 1, UP_TO_128),
                             Tile(16, 16, 4, 1, UP_TO_128)],
}
SM_86 = {  # also sm_89's and sm_120's: 99 KiB of shared memory
    "forward": [Tile(128, 64, 8, 2, UP_TO_64), Tile(64, 64, 4, 3, UP_TO_64), Tile(128, 32, 8, 2, UP_TO_128),
                Tile(64, 64, 8, 2, UP_TO_128), Tile(64, 32, 4, 2, UP_TO_128), Tile(32, 32, 4, 2, UP_TO_256),
                Tile(32, 16, 4, 1, ONLY_256),
                Tile(32, 32, 8, 2, ONLY_512), Tile(32, 32, 8, 1, ONLY_512), Tile(16, 32, 4, 1, ONLY_512)],
    "backward_dkdv": [Tile(32, 64, 8, 1, UP_TO_128), Tile(32, 32, 8, 2, (64, 128)), Tile(32, 32, 4, 1, UP_TO_64),
                      Tile(16, 32, 4, 1, UP_TO_256), Tile(16, 16, 4, 1, ONLY_256),
                      Tile(16, 16, 8, 1, ONLY_512), Tile(16, 16, 4, 1, ONLY_512)],
    "backward_dq": [Tile(128, 64, 8, 2, (16, 64)), Tile(128, 32, 8, 1, UP_TO_128), Tile(64, 32, 4, 1, UP_TO_128),
                    Tile(32, 32, 4, 1, UP_TO_256), Tile(32, 16, 4, 1, ONLY_256),
                    Tile(32, 16, 8, 1, ONLY_512), Tile(16, 32, 8, 1, ONLY_512), Tile(16, 16, 8, 1, ONLY_512)],
    "backward_single_pass": [Tile(32, 64, 8, 1, (16, 32, 128)), Tile(16, 32, 4, 1, UP_TO_128),
                             Tile(16, 16, 4, 1, UP_TO_128)],
}
FP32 = {  # full-precision dots on FMA units; at head dim 256 only 16-row tiles with 8 or 16 warps keep off spills
    "forward": [Tile(64, 16, 4, 1, (16, 32)), Tile(32, 16, 8, 1, UP_TO_128), Tile(16, 32, 8, 1, UP_TO_256),
                Tile(16, 16, 4, 1, UP_TO_128), Tile(16, 16, 8, 1, ONLY_256)],
    "backward_dkdv": [Tile(16, 32, 4, 1, (16, 32)), Tile(32, 16, 4, 1, (64,)), Tile(16, 16, 8, 1, UP_TO_256),
                      Tile(16, 16, 4, 1, UP_TO_128), Tile(16, 16, 16, 1, ONLY_256)],
    "backward_dq": [Tile(32, 32, 4, 1, UP_TO_64), Tile(32, 16, 8, 1, UP_TO_128), Tile(16, 16, 8, 1, UP_TO_256),
                    Tile(16, 16, 4, 1, UP_TO_128), Tile(16, 32, 8, 1, ONLY_256)],
    "backward_single_pass": [Tile(16, 16, 8, 1, UP_TO_128), Tile(16, 16, 4, 1, UP_TO_128),
                             Tile(16, 32, 8, 1, UP_TO_128)],
}
CONFIGS = {name: {"sm_90": SM_90[name], "sm_100": SM_100[name], "sm_80": SM_80[name], "sm_86": SM_86[name],
                  "sm_89": SM_86[name], "sm_120": SM_86[name], "fp32": FP32[name], "interpreter": INTERPRETER}
           for name in KERNELS}

# With a feature past the bounds (a mask, ALiBi, softcapping, dropout, packed sequences, sinks) a tile holds more per
# score: these compile without spills with all of them on at once (Spec.every_feature, `gptfast inspect`; at head
# dim 512 all but dropout and chunks, which run PyTorch there). The 512-wide ones serve no flex mods.
FEATURES_SM_90 = {  # also sm_100's
    # At head dim 256 a 128-row tile spills 8 bytes once the mask's key stride is 1 (a contiguous mask, what the
    # JIT specialises): 32-row tiles there.
    "forward": [Tile(128, 32, 8, 2, UP_TO_128), Tile(64, 16, 4, 2, UP_TO_128), Tile(64, 32, 4, 2, UP_TO_128),
                # the second spills 8 bytes with a torch BlockMask's bits (gptfast.flex): 8 warps serve those
                Tile(32, 32, 4, 2, ONLY_256), Tile(32, 16, 4, 2, ONLY_256, ()), Tile(32, 16, 8, 2, (), ONLY_256),
                Tile(32, 32, 8, 2, ONLY_512, ()), Tile(32, 32, 8, 1, ONLY_512, ()), Tile(16, 16, 4, 1, ONLY_512, ())],
    "backward_dkdv": [Tile(32, 16, 4, 1, UP_TO_128), Tile(16, 32, 4, 1, UP_TO_128), Tile(32, 32, 4, 1, UP_TO_64),
                      Tile(16, 16, 4, 1, UP_TO_256), Tile(16, 16, 8, 1, ONLY_256),
                      Tile(32, 16, 8, 1, ONLY_512, ())],
    # At head dim 256 the 32-row tiles spill 8 bytes with a gathering flex mod (a relative bias, a torch
    # BlockMask's bits) on sm_90 or sm_100: 16-row tiles serve those.
    "backward_dq": [Tile(32, 16, 4, 1, UP_TO_256, UP_TO_128), Tile(32, 32, 4, 1, UP_TO_256, UP_TO_128),
                    Tile(64, 16, 4, 1, UP_TO_128), Tile(16, 32, 8, 1, (), ONLY_256), Tile(16, 16, 4, 1, (), ONLY_256),
                    Tile(32, 16, 8, 1, ONLY_512, ()), Tile(16, 32, 8, 1, ONLY_512, ()),
                    Tile(16, 16, 8, 1, ONLY_512, ())],
    "backward_single_pass": [Tile(32, 16, 4, 1, UP_TO_128), Tile(16, 16, 4, 1, UP_TO_128)],
}
FEATURES_SM_80 = {  # also sm_86's, sm_89's and sm_120's
    "forward": [Tile(32, 32, 4, 2, UP_TO_256), Tile(128, 32, 8, 2, UP_TO_64), Tile(64, 16, 4, 2, UP_TO_64),
                Tile(32, 16, 4, 1, UP_TO_256),
                Tile(32, 32, 8, 1, ONLY_512, ()), Tile(16, 32, 4, 1, ONLY_512, ()), Tile(16, 16, 4, 1, ONLY_512, ())],
    "backward_dkdv": [Tile(32, 16, 4, 1, UP_TO_128), Tile(16, 32, 4, 1, UP_TO_64), Tile(16, 16, 8, 1, (128, 256)),
                      Tile(32, 16, 8, 1, ONLY_256), Tile(16, 16, 8, 1, ONLY_512, ())],
    # A 64-row tile spills 16 bytes on sm_86 at head dim 128 (sm_80 none); at 256 a gathering flex mod spills
    # the 4-warp 32-row tile on sm_86 and sm_89 (16 bytes): 8 warps serve it there.
    "backward_dq": [Tile(32, 16, 4, 1, UP_TO_256, UP_TO_128), Tile(32, 32, 4, 1, UP_TO_128),
                    Tile(64, 32, 8, 1, UP_TO_64), Tile(16, 16, 4, 1, UP_TO_256), Tile(32, 16, 8, 1, (), ONLY_256),
                    Tile(32, 16, 8, 1, ONLY_512, ())],
    "backward_single_pass": [Tile(32, 16, 4, 1, UP_TO_128), Tile(16, 16, 4, 1, UP_TO_128),
                             Tile(16, 16, 8, 1, UP_TO_128)],
}
FEATURES_FP32 = {
    "forward": [Tile(16, 16, 4, 1, UP_TO_128), Tile(32, 16, 4, 1, UP_TO_64), Tile(16, 32, 4, 1, UP_TO_64),
                Tile(16, 16, 8, 1, UP_TO_256), Tile(32, 16, 8, 1, (128,)), Tile(16, 16, 16, 1, ONLY_256)],
    "backward_dkdv": [Tile(16, 16, 4, 1, UP_TO_64), Tile(32, 16, 4, 1, (16, 32)), Tile(16, 16, 8, 1, UP_TO_256),
                      Tile(32, 16, 8, 1, (64,)), Tile(16, 16, 16, 1, (128, 256))],
    "backward_dq": [Tile(16, 16, 4, 1, UP_TO_128), Tile(32, 16, 4, 1, UP_TO_64), Tile(16, 16, 8, 1, UP_TO_256),
                    Tile(32, 16, 8, 1, (128,)), Tile(16, 16, 16, 1, ONLY_256)],
    "backward_single_pass": [Tile(16, 16, 4, 1, UP_TO_64), Tile(16, 16, 8, 1, UP_TO_128),
                             Tile(32, 16, 8, 1, UP_TO_64), Tile(16, 16, 16, 1, (128,))],
}
FEATURE_CONFIGS = {name: {"sm_90": FEATURES_SM_90[name], "sm_100": FEATURES_SM_90[name],
                          "sm_80": FEATURES_SM_80[name], "sm_86": FEATURES_SM_80[name],
                          "sm_89": FEATURES_SM_80[name], "sm_120": FEATURES_SM_80[name],
                          "fp32": FEATURES_FP32[name], "interpreter": INTERPRETER}
                   for name in KERNELS}


def delta_block(block_d):
    """Query rows per program of the delta kernel: 4096 elements of O and dO each, so float32 never spills."""
    return 4096 // block_d


def config_table(arch, dtype):
    """The table key for a device arch (see gptfast.kernels.device_arch) and an input dtype."""
    return "fp32" if dtype == torch.float32 and arch != "interpreter" else arch


def configs_for(kernel_name, table, block_d, features=False, variant="pointers", modded=False, fp8=False):
    """The triton.Config list of one kernel in one table that serves a padded head dim of block_d; with features
    (a mask, ALiBi, softcapping, dropout, or gptfast.flex's mods: modded), FEATURE_CONFIGS'. The configs carry the
    variant's switches (FORWARD_SWITCHES for the forward, LOAD_SWITCHES for the backward kernels). fp8 (the FP8
    forward) keeps the tiles of 32 keys or more: P @ V's K, which float8 dots need at 32 or more on the GPU."""
    tiles = [tile for tile in (FEATURE_CONFIGS if features else CONFIGS)[kernel_name][table]
             if not fp8 or tile.block_n >= FP8_MIN_K or table == "interpreter"]
    cap = {} if table == "interpreter" else {"maxnreg": MAX_REGISTERS}
    switches = (FORWARD_SWITCHES if kernel_name == "forward" else LOAD_SWITCHES)[variant]
    return [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, **switches}, num_warps=t.warps,
                          num_stages=t.stages, **cap) for t in tiles if t.serves(block_d, modded)]


FORWARD_VARIANTS = ("pointers", "tma", "tma_persistent")
FORWARD_SWITCHES = {"pointers": dict(TMA=False, PERSISTENT=False), "tma": dict(TMA=True, PERSISTENT=False),
                    "tma_persistent": dict(TMA=True, PERSISTENT=True)}
LOAD_SWITCHES = {"pointers": dict(TMA=False), "tma": dict(TMA=True)}  # the backward kernels' variants
BACKWARD_VARIANTS = ("two_kernel", "single_pass")
_forced = {"forward": None, "backward": None}


class VariantUnavailable(ValueError):
    """A forced variant that cannot run the call at hand (its documented limits), as distinct from a failure."""


@contextlib.contextmanager
def forced_variants(forward=None, backward=None):
    """Inside the block every attention call runs the named variants (None leaves that choice to the tuner): for
    tests, which must cover each variant, and benchmarks, which time each. A forced variant that cannot run a
    call raises VariantUnavailable."""
    for name, value, choices in (("forward", forward, FORWARD_VARIANTS), ("backward", backward, BACKWARD_VARIANTS)):
        if value not in (None, *choices):
            raise ValueError(f"{name} variant must be one of {', '.join(choices)} or None, got {value!r}")
    previous = dict(_forced)
    _forced.update(forward=forward, backward=backward)
    forget_choices()
    try:
        yield
    finally:
        _forced.update(previous)
        forget_choices()



def forward_variants(arch, features, tma_ready):
    """The forward variants the autotuner may time: all on sm_90 and newer for plain attention with TMA-ready K
    and V (16-bit, see attention._tma_ready), else pointers only; the interpreter times nothing, so it runs
    pointers unless forced."""
    forced = _forced["forward"]
    if forced not in (None, "pointers") and not (tma_ready and not features):
        raise VariantUnavailable(f"the forward variant {forced!r} needs plain attention (no mask, ALiBi, softcap "
                                 f"or dropout) on 16-bit K and V, 16-byte aligned, their last dim contiguous")
    if forced is not None:
        return (forced,)
    return FORWARD_VARIANTS if arch in TMA_ARCHS and tma_ready and not features else ("pointers",)


def backward_loads(arch, features, tma_ready):
    """The backward kernels' load variants: "tma" where the forward may use TMA (forcing a TMA forward forces
    them too), and "pointers" unless so forced."""
    return tuple(dict.fromkeys("tma" if name == "tma_persistent" else name
                               for name in forward_variants(arch, features, tma_ready)))


def backward_choices(arch, block_d, deterministic, mask_grad):
    """The backward variants a call may take: forced, else two_kernel alone when the call must be deterministic,
    needs the mask's gradient (only the dq kernel writes it), has a padded head dim past
    SINGLE_PASS_MAX_HEAD_DIM or runs in the interpreter (where nothing is timed), else both, for `fastest`."""
    forced = _forced["backward"]
    if forced == "single_pass" and (mask_grad or block_d > SINGLE_PASS_MAX_HEAD_DIM):
        raise VariantUnavailable(f"the backward variant 'single_pass' cannot give an additive mask its gradient "
                                 f"nor run head dims past {SINGLE_PASS_MAX_HEAD_DIM}")
    if forced is not None:
        return (forced,)
    if (deterministic or torch.are_deterministic_algorithms_enabled() or mask_grad or arch == "interpreter"
            or block_d > SINGLE_PASS_MAX_HEAD_DIM):
        return ("two_kernel",)
    return BACKWARD_VARIANTS


_fastest = {}  # (tuning key) -> name of the fastest backward variant


def fastest(key, runs, kernels=()):
    """The name of the fastest of runs ({name: function}), timed on the device once per key and GPU (triton's
    do_bench, which runs each function's own autotuning first; the answer kept on disk, keyed also by the source
    hashes of kernels, the JIT functions the runs launch: autotune.stored_choice); the first name when
    GPTFAST_AUTOTUNE=0. key: a value whose str() says what is timed."""
    if len(runs) == 1 or not AUTOTUNE:
        return next(iter(runs))
    if key not in _fastest:
        timed = lambda: min(runs, key=lambda name: triton.testing.do_bench(runs[name]))  # noqa: E731
        _fastest[key] = stored_choice(key, timed, kernels)
    return _fastest[key]


def length_bucket(length):
    """The power of two at or above a sequence length: autotuning is per bucket, so that decoding (Tq = 1) and a
    long prefill never share a config while lengths that differ by a few tokens do."""
    return next_power_of_2(max(length, 1))


def fitting(configs, bucket_q, bucket_k):
    """The configs whose query and key blocks do not exceed the lengths' buckets (a 128-row query block for a
    single query row is wasted work), or the smallest one if none does."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bucket_q and c.kwargs["BLOCK_N"] <= bucket_k]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]


@functools.cache
def _autotuner(kernel, kernel_name, table, block_d, features, modded, fp8, variants, bucket_q, bucket_k):
    configs = [config for variant in variants for config in configs_for(kernel_name, table, block_d, features,
                                                                         variant, modded, fp8)]
    # One autotuner per (length buckets, table, head dim) keyed on the call's spec, whose switches change the
    # work per program; the input dtype is in every autotuner's key. The single pass adds into DQ_ACC: zeroed
    # between timing runs.
    reset = ["DQ_ACC"] if kernel_name == "backward_single_pass" else None
    return autotune(kernel, fitting(configs, bucket_q, bucket_k), key=["SPEC"], scope=(bucket_q, bucket_k),
                    reset_to_zero=reset)


def autotuned(kernel, kernel_name, arch, dtype, seqlen_q, seqlen_k, spec, variants=("pointers",)):
    """The kernel wrapped in an autotuner over the configs that serve the arch, input dtype, padded head dim (the
    wider of the two, Spec.tile_dim),
    features (attention_spec.Spec.has_features, modded), FP8 and length buckets, for each of the variants
    (configs_for)."""
    return _autotuner(kernel, kernel_name, config_table(arch, dtype), spec.tile_dim, spec.has_features, spec.modded,
                      spec.FP8, variants, length_bucket(seqlen_q), length_bucket(seqlen_k))


def largest_tile(arch, dtype):
    """The most query or key rows any attention tile of an arch and input dtype spans. A block mask's blocks must be
    at least this (gptfast.flex coarsens smaller ones): the kernels walk a listed block in tiles that must lie
    inside it."""
    table = config_table(arch, dtype)
    return max(max(tile.block_m, tile.block_n) for configs in (CONFIGS, FEATURE_CONFIGS)
               for tiles in configs.values() for tile in tiles[table])
