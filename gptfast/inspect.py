"""``gptfast inspect``: compile every kernel and tuning config ahead of time for a GPU that need not be here, and
report what the hardware would see: registers, spills, shared memory and tensor-core instructions.

Triton compiles for a named target without a device (``triton.compile(ASTSource(...), target=GPUTarget(...))``);
the ``cuobjdump`` shipped in Triton's wheel reads the resulting cubin. The argument types mirror what Triton's JIT
derives at a real launch: tensor pointers of the inspected dtype (the statistics buffers are float32; the FP8
forward's inputs float8 e4m3 and its output bfloat16), 16-byte aligned; strides divisible by 16; the unit
last-dim strides of attention specialised to 1; other ints i32.
A config fails when it does not compile, spills registers to local memory, needs more registers than one
multiprocessor holds for its block (16 warps at over 128 registers: it would not launch) or more shared memory than
the chip has; the command then exits 1.
"""
import concurrent.futures
import contextlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from gptfast.progress import Progress, duration

ARCHS = {"sm_75": 75, "sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_100": 100, "sm_120": 120}
# Largest dynamic shared memory one block may use (the opt-in limit of CUDA's programming guide, per compute
# capability): T4 64 KiB; A100 163 KiB; RTX 30xx/A10, RTX 40xx/L4/L40 and RTX 50xx 99 KiB; H100/H200 and B200
# 227 KiB.
SHARED_LIMIT = {"sm_75": 65536, "sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448,
                "sm_100": 232448, "sm_120": 101376}
# Tensor-core instructions in SASS: Blackwell's tcgen05 (UTC*MMA), Hopper's wgmma (HGMMA), mma.sync (HMMA).
TENSOR_CORE_OPS = re.compile(r"\b(UTC[A-Z]*MMA|[HQ]GMMA|[HQ]MMA)\b")
TMA_OPS = re.compile(r"\b(UTMALDG|UTMASTG|UBLKCP)\b")
FLOAT32_POINTERS = {"LSE", "DELTA", "GRAD_LSE", "SINKS", "DESCALE", "MEAN", "RSTD", "PARTIAL", "DW", "DB", "ALIBI",
                    "DBIAS", "LOSS", "ROW_SCALE", "DQ_ACC", "O_PART", "LSE_PART"}
INT32_POINTERS = {"CU_SEQLENS_Q", "CU_SEQLENS_K", "SEQUSED_K", "BLOCK_TABLE", "SEQLENS", "LEFTPAD"}
FLOAT_SCALARS = {"qk_scale", "softmax_scale", "eps", "softcap", "dropout_p", "keep_scale", "label_smoothing"}
INSPECTED_DTYPES = ("bf16", "fp32", "fp8")
FP8_ARCHS = ("sm_89", "sm_90", "sm_100", "sm_120")  # FP8 tensor cores: the FP8 attention forward (gptfast.fp8)
TRITON_TYPES = {"fp8": "fp8e4nv"}  # an inspected dtype's pointer type where Triton's name differs
# The tensors an "fp8" job's kernel takes in float8 e4m3 (its other data tensors are bfloat16): the FP8 forward's
# inputs (gptfast.fp8), the decoding kernel's caches (gptfast.kvcache's float8 caches).
FP8_TENSORS = {"attention_forward_kernel": ("Q", "K", "V"), "attention_decode_kernel": ("K", "V"),
               "cache_append_kernel": ("K_CACHE", "V_CACHE")}
KERNEL_MODULES = ("attention", "flex", "decode", "layernorm", "cross_entropy")
# The attention kernels' tuple arguments (attention_spec.describe) other than strides, which hold 4 ints (the last,
# a unit head-dim stride, specialised to 1) except the slopes' 2. A split's steps are multiples of 16 at the head
# dims inspected (16-byte aligned partial outputs, which the stores vectorise).
TUPLE_ARGS = {"alibi_strides": ("i32", "i32"), "dims": ("i32",) * 5, "bounds": ("i32",) * 4, "scales": ("fp32",) * 5,
              # the decoding kernel's (gptfast.kernels.decode.decode_attention)
              "lse_steps": ("i32",) * 3, "split_steps": ("i32:16",) * 2, "sizes": ("i32",) * 4,
              "window_sides": ("i32",) * 3, "score_scales": ("fp32",) * 2}


@dataclass(frozen=True)
class Job:
    """One compilation: a kernel of gptfast.kernels.<module> with its constexprs and launch options."""
    module: str
    kernel: str
    arch: str
    dtype: str
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # the config's register cap, where it sets one
    flex: str = ""  # a flex_variants() name: its mods join the SPEC in the worker (jit functions do not pickle)

    def block_d(self):
        """The padded head dim compiled for (None for kernels without one)."""
        flags = dict(self.constexprs)
        return flags["SPEC"].BLOCK_D if "SPEC" in flags else flags.get("BLOCK_D")

    def label(self):
        shown = {k: v for k, v in self.constexprs
                 if k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "ROW_FITS", "RMS", "BLOCK_V", "WRITE_GRAD")}
        if "SPEC" in dict(self.constexprs):
            spec = dict(self.constexprs)["SPEC"]
            same = (spec.HEAD_DIM, spec.BLOCK_D) == (spec.HEAD_DIM_V, spec.BLOCK_DV)
            dims = {} if same else {"HEAD_DIM": spec.HEAD_DIM, "HEAD_DIM_V": spec.HEAD_DIM_V}
            shown = {"BLOCK_D": self.block_d(), **dims, **shown}
        config = " ".join(f"{k}={v}" for k, v in shown.items())
        flags = dict(self.constexprs)
        features = flags["SPEC"].has_features if "SPEC" in flags else flags.get("LEFTPAD_KEYS")
        marks = "".join(mark for mark, on in (("+features ", features),
                                              ("+chunk ", "SPEC" in flags and flags["SPEC"].CHUNK),
                                              ("+tma ", flags.get("TMA")),
                                              ("+persistent ", flags.get("PERSISTENT")),
                                              ("+single-pass ", flags.get("ATOMIC_DQ")),
                                              (f"+flex:{self.flex} ", self.flex)) if on)
        return f"{self.kernel} [{marks}{self.dtype} {config} warps={self.num_warps} stages={self.num_stages}]"


ATTENTION_KERNELS = {"forward": "attention_forward_kernel", "backward_dkdv": "attention_backward_dkdv_kernel",
                     "backward_dq": "attention_backward_dq_kernel",
                     "backward_single_pass": "attention_backward_dkdv_kernel"}


def arch_dtypes(arch, dtypes, fp8=False):
    """The dtypes inspected on an arch: "bf16" stands for the 16-bit type, float16 on Turing (no bfloat16); "fp8"
    (float8 e4m3) only for a kernel that takes it (fp8: the attention forward, the decoding kernel's float8 caches)
    on an arch with FP8_ARCHS."""
    return ["fp16" if dtype == "bf16" and arch == "sm_75" else dtype for dtype in dtypes
            if dtype != "fp8" or fp8 and arch in FP8_ARCHS]


def _variant_constexprs(name, arch, dtype, spec):
    """The constexpr sets that select each variant of one tuning list's kernel (attention_tuning's docstring), with
    the tensors that variant does not read as None."""
    tma = arch in tuning().TMA_ARCHS and dtype == "bf16" and not spec.has_features
    absent = absent_tensors(spec, ATTENTION_KERNELS[name])
    if name == "forward":
        variants = tuning().FORWARD_VARIANTS if tma else ("pointers",)
        return [(*absent, *tuning().FORWARD_SWITCHES[variant].items()) for variant in variants]
    if name == "backward_dq":  # an additive mask's gradient where the spec has one
        flag, tensor, on = "BIAS_GRAD", "DBIAS", spec.MASK_KIND == 2
    else:
        flag, tensor, on = "ATOMIC_DQ", "DQ_ACC", name == "backward_single_pass"
    absent += () if on else ((tensor, None),)
    return [(*absent, (flag, on), *tuning().LOAD_SWITCHES[loads].items())
            for loads in (("pointers", "tma") if tma else ("pointers",))]


def absent_tensors(spec, kernel):
    """(name, None) for each optional tensor of the attention kernel that the spec never reads (Spec.absent)."""
    from gptfast.kernels import attention
    taken = getattr(attention, kernel).arg_names
    return tuple((tensor, None) for tensor in spec.absent() if tensor in taken)


def tuning():
    from gptfast.kernels import attention_tuning
    return attention_tuning


def block_mask():
    from gptfast.kernels import block_mask
    return block_mask


def spec_class():
    from gptfast.kernels.attention_spec import Spec
    return Spec


def attention_specs(every, block_d, dtype):
    """The specs compiled on a tile that serves a padded head dim: plain (or every feature on, and a chunked call's
    features: Spec.chunked; at 512, every feature but dropout and chunks, which run PyTorch there), and at 256
    in 16-bit also DeepSeek's MLA shape (queries and keys 192 wide, values 128), which takes the tiles of the wider
    head dim.
    (In float32, sm_90's 16-warp dk/dv tile holds 137 registers there: a block past the register file, which
    Triton's autotuner skips at launch as out of resources.) In fp8 (the forward only): FP8 plain, and every
    feature of an FP8 call with and without chunks, to head dims of 256."""
    precision = "ieee" if dtype == "fp32" else "tf32"  # fp32 runs ieee unless tf32 is allowed
    makes = (spec_class().every_feature, spec_class().chunked) if every else (spec_class().plain,)
    if dtype == "fp8":  # the forward of flash_attn_func's features (no mask or dropout), head dims 32 to 256
        return [make(block_d, "ieee")._replace(FP8=True, DROPOUT=False, MASK_KIND=0) for make in makes
                if tuning().FP8_MIN_K <= block_d <= 256]
    if block_d > 256:  # calls with dropout or chunks run PyTorch there (attention_core.kernel_gap)
        return [make(block_d, precision)._replace(DROPOUT=False) for make in makes[:1]]
    specs = [make(block_d, precision) for make in makes]
    if block_d == 256 and dtype != "fp32":
        specs += [make(256, precision, 128)._replace(HEAD_DIM=192) for make in makes]
    return specs


def attention_jobs(arch, dtypes=INSPECTED_DTYPES):
    """Every tuning config of every attention kernel variant (attention_specs); none on an arch without a table
    (Turing: see attention_tuning's docstring)."""
    if arch not in tuning().CONFIGS["forward"]:
        return []
    jobs = []
    for name, kernel in ATTENTION_KERNELS.items():
        for dtype in arch_dtypes(arch, dtypes, fp8=name == "forward"):
            table = "fp32" if dtype == "fp32" else arch
            for every, tables in ((False, tuning().CONFIGS), (True, tuning().FEATURE_CONFIGS)):
                for tile in tables[name][table]:
                    if dtype == "fp8" and tile.block_n < tuning().FP8_MIN_K:  # attention_tuning.configs_for: why
                        continue
                    for spec in (spec for block_d in tile.dims for spec in attention_specs(every, block_d, dtype)):
                        for variant in _variant_constexprs(name, arch, dtype, spec):
                            constexprs = (("SPEC", spec), *variant, ("BLOCK_M", tile.block_m),
                                          ("BLOCK_N", tile.block_n))
                            jobs.append(Job("attention", kernel, arch, dtype, constexprs, tile.warps, tile.stages,
                                            tuning().MAX_REGISTERS))
    for dtype in arch_dtypes(arch, dtypes):
        for block_d in (() if dtype == "fp8" else tuning().UP_TO_512):  # the merge's inputs are float32 alone
            constexprs = (("HEAD_DIM", block_d), ("BLOCK_D", block_d), ("BLOCK_M", tuning().delta_block(block_d)))
            jobs.append(Job("attention", "attention_backward_delta_kernel", arch, dtype, constexprs, 4, 1,
                            tuning().MAX_REGISTERS))
    jobs.append(Job("attention", "dropout_keep_kernel", arch, "fp32", (("BLOCK_M", 16), ("BLOCK_N", 16)), 4, 1))
    return jobs


def flex_variants():
    """gptfast.flex's built-in mods as the flex jobs compile them, by name: (score_mod, mask_mod), with example
    arguments of the types a real call passes."""
    import torch

    from gptfast import flex_mods as mods
    from gptfast.flex import MaskMod, and_masks, or_masks
    from gptfast.kernels.mods import block_bits
    ids, table = torch.zeros(64, dtype=torch.int32), torch.zeros(2, 127)
    bits = (torch.zeros((4, 128, 128), dtype=torch.uint8), torch.zeros((1, 1, 2, 2), dtype=torch.int32), 0, 0, 2, 7, 7)
    return {"document": (None, and_masks(mods.causal_mask, mods.document_mask(ids))),
            "torch_block_mask": (None, MaskMod.of(block_bits, bits)),
            "bias+prefix_lm": (mods.relative_bias_score(table), or_masks(mods.causal_mask, mods.prefix_lm_mask(8))),
            "softcap+window": (mods.softcap_score(30.0), and_masks(mods.causal_mask, mods.sliding_window_mask(64)))}


# Per tuning list, the switches of a flex call's kernel: pointer loads only (a flex call has features), and the
# single pass's dq buffer or the dq kernel's mask gradient where the variant has them.
FLEX_SWITCHES = {"forward": dict(TMA=False, PERSISTENT=False),
                 "backward_dkdv": dict(DQ_ACC=None, ATOMIC_DQ=False, TMA=False),
                 "backward_dq": dict(DBIAS=None, BIAS_GRAD=False, TMA=False),
                 "backward_single_pass": dict(ATOMIC_DQ=True, TMA=False)}


def flex_jobs(arch, dtypes=INSPECTED_DTYPES):
    """The attention kernels with each of flex_variants' mods and a block mask, on every feature tile that serves
    mods, and create_block_mask's kernel."""
    if arch not in tuning().CONFIGS["forward"]:
        return []
    jobs = []
    for name, switches in FLEX_SWITCHES.items():
        absent = tuple((tensor, None) for tensor, _ in absent_tensors(spec_class().dims(16, "ieee"),
                                                                      ATTENTION_KERNELS[name])
                       if tensor not in ("mods", "blocks"))
        for dtype in arch_dtypes(arch, dtypes):
            precision = "ieee" if dtype == "fp32" else "tf32"
            for tile in tuning().FEATURE_CONFIGS[name]["fp32" if dtype == "fp32" else arch]:
                for block_d in tile.dims if tile.mod_dims is None else tile.mod_dims:
                    constexprs = (("SPEC", spec_class().dims(block_d, precision)), *absent, *switches.items(),
                                  ("BLOCK_M", tile.block_m), ("BLOCK_N", tile.block_n))
                    # float32 calls with a torch BlockMask run PyTorch (gptfast.kernels.mods.block_bits)
                    jobs += [Job("attention", ATTENTION_KERNELS[name], arch, dtype, constexprs, tile.warps, tile.stages,
                                 tuning().MAX_REGISTERS, flex=variant) for variant in flex_variants()
                             if not (dtype == "fp32" and variant == "torch_block_mask")]
    # create_block_mask's kernel, at the default 128 x 128 blocks (a torch BlockMask comes with its block lists)
    chunk = ("CHUNK", block_mask().CHUNK_ELEMENTS // 128)
    jobs += [Job("block_mask", "block_states_kernel", arch, "fp32", (("BLOCK_Q", 128), ("BLOCK_KV", 128), chunk), 4,
                 1, flex=variant) for variant in flex_variants() if variant != "torch_block_mask"]
    return jobs


def _flex_job(job):
    """(constexprs, types) of a flex job: its SPEC with the variant's mods and a 128 x 128 block mask, and the
    Triton types of its `mods` and `blocks` arguments, from example arguments (triton's mangle_type); for the
    block-state kernel, its MASK_MOD and the types of its mask_args."""
    import torch
    from triton.runtime.jit import mangle_type

    from gptfast.flex import BlockMask, kernel_flex
    from gptfast.kernels.attention_spec import with_flex
    score_mod, mask_mod = flex_variants()[job.flex]
    if job.kernel == "block_states_kernel":
        terms = tuple(tuple(mod.fn for mod in term) for term in mask_mod.terms)
        args = tuple(tuple(mod.args for mod in term) for term in mask_mod.terms)
        return {**dict(job.constexprs), "MASK_MOD": terms}, {"STATES": "*u8", "mask_args": mangle_type(args)}
    states = torch.ones((1, 1, 2, 2), dtype=torch.uint8)
    flex = kernel_flex(score_mod, BlockMask(states, (128, 128), (256, 256), mask_mod), torch.device("cpu"),
                        torch.bfloat16)
    if job.kernel == "attention_backward_dkdv_kernel" and score_mod is not None:
        flex = flex._replace(score_arg_grad=score_mod.arg_grad)
    spec, kwargs = with_flex(dict(job.constexprs)["SPEC"], {}, flex)
    return {**dict(job.constexprs), "SPEC": spec}, {name: mangle_type(kwargs[name]) for name in ("mods", "blocks")}


def decode_jobs(arch, dtypes=INSPECTED_DTYPES):
    """The split-KV decoding kernel's tiles at their largest query block, plain (writing float32 partials) and
    with every feature (packed queries of paged prefill included; writing the result), and the merge (with sinks);
    none where attention has no table. In fp8: the 16-bit tiles reading float8 caches."""
    import torch

    from gptfast.kernels import decode
    if arch not in tuning().CONFIGS["forward"]:
        return []
    plain = (dict(CAUSAL=True), (("LEFTPAD", None), ("CU_SEQLENS_Q", None), ("ALIBI", None), ("SINKS", None),
                                 ("LEFTPAD_KEYS", False), ("FINAL", False)))
    every = (dict(CAUSAL=True, WINDOW=True, ALIBI=True, SOFTCAP=True, SINKS=True, CHUNK=True, VARLEN=True),
             (("LEFTPAD_KEYS", True), ("FINAL", True)))
    jobs = []
    for dtype in arch_dtypes(arch, dtypes, fp8=True):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for block_n, warps, stages, dims in decode.tiles("fp32" if dtype == "fp32" else "16-bit", dtype == "fp8"):
            for block_d in dims:
                for switches, constexprs in (plain, every):
                    block_m = decode.query_block(64, block_d, torch.float32 if dtype == "fp32" else torch.bfloat16)
                    jobs += [Job("decode", "attention_decode_kernel", arch, dtype,
                                 (("SPEC", spec), *constexprs, ("BLOCK_M", block_m), ("BLOCK_N", block_n)), warps,
                                 stages, tuning().MAX_REGISTERS) for spec in decode_specs(block_d, precision, switches,
                                                                                         dtype)]
        for block_d in (() if dtype == "fp8" else tuning().UP_TO_512):  # the merge's inputs are float32 alone
            constexprs = (("HEAD_DIM", block_d), ("BLOCK_D", block_d), ("BLOCK_S", decode.MAX_SPLITS),
                          ("WITH_SINK", True))
            jobs.append(Job("decode", "attention_combine_kernel", arch, dtype, constexprs, 4, 1))
        jobs += append_jobs(arch, dtype)
    return jobs


def append_jobs(arch, dtype):
    """The cache writes' kernel (kernels.decode.cache_append_kernel), a row copy whose registers grow with its columns
    only (23 registers at 16 columns to 32 at 1024 on every arch, all inspected once): at a common head dim and at
    the widest, DeepSeek's 576-wide keys with 512-wide values; in fp8, writing float8 caches."""
    from gptfast.kernels import next_power_of_2
    jobs = []
    for head_dim, head_dim_v in ((128, 128), (576, 512)):
        constexprs = (("HEAD_DIM", head_dim), ("HEAD_DIM_V", head_dim_v), ("BLOCK_D", next_power_of_2(head_dim)),
                      ("BLOCK_DV", next_power_of_2(head_dim_v)), ("FP8", dtype == "fp8"),
                      *(() if dtype == "fp8" else (("DESCALE", None),)))
        jobs.append(Job("decode", "cache_append_kernel", arch, dtype, constexprs, 4, 1))
    return jobs


def decode_specs(block_d, precision, switches, dtype):
    """The decoding kernel's specs on a tile of a padded head dim: its own, and at 512 in 16-bit also DeepSeek's
    absorbed MLA decoding (queries and keys 576: a 512 block and a 64-wide tail; values 512)."""
    spec = spec_class().dims(block_d, precision, **switches, FP8=dtype == "fp8")
    if block_d == 512 and dtype != "fp32":
        return [spec, spec._replace(HEAD_DIM=576, BLOCK_D_TAIL=64)]
    return [spec]


def layernorm_jobs(arch, dtypes=INSPECTED_DTYPES):
    from gptfast.kernels import layernorm as ln
    jobs = []
    # A short row, the longest row held whole, and the chunk of longer rows.
    for n_cols in (1024, ln.MAX_FUSED_N, 4 * ln.MAX_FUSED_N):
        block_n, row_fits = ln._row_block(n_cols)
        # LayerNorm, then RMSNorm
        for dtype, rms in ((dtype, rms) for dtype in arch_dtypes(arch, dtypes) for rms in (False, True)):
            for config in ln.configs_for("forward", arch, block_n):
                constexprs = (("HAS_RESIDUAL", True), ("HAS_WEIGHT", True), ("HAS_BIAS", not rms), ("RMS", rms),
                              ("BLOCK_N", block_n), ("ROW_FITS", row_fits))
                jobs.append(Job("layernorm", "layer_norm_forward_kernel", arch, dtype, constexprs,
                                config.num_warps, 1))
            for config in ln.configs_for("backward", arch, block_n):
                constexprs = (("HAS_WEIGHT", True), ("HAS_DSUM", True), ("RMS", rms), ("BLOCK_N", block_n),
                              ("ROW_FITS", row_fits))
                jobs.append(Job("layernorm", "layer_norm_backward_kernel", arch, dtype, constexprs,
                                config.num_warps, 1))
    jobs.append(Job("layernorm", "weight_grad_kernel", arch, "fp32", (("BLOCK_P", 32), ("BLOCK_N", 128)), 4, 1))
    return jobs


def cross_entropy_jobs(arch, dtypes=INSPECTED_DTYPES):
    from gptfast.kernels import cross_entropy as ce
    # The plain loss pass, and the gradient pass with smoothing and softcapping (the most it holds).
    return [Job("cross_entropy", "cross_entropy_kernel", arch, dtype,
                (("SOFTCAP", extra), ("SMOOTHING", extra), ("WRITE_GRAD", extra), ("BLOCK_V", ce.BLOCK_V)), 8, 1,
                ce.MAX_REGISTERS)
            for dtype in arch_dtypes(arch, dtypes) for extra in (False, True)]


def signature(fn, dtype, constexprs, types=None):
    """Triton's signature and attributes for fn's parameters, as the JIT would derive them (module docstring);
    types: those of some parameters, given."""
    sig, attrs, consts, types = {}, {}, dict(constexprs), types or {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in consts:  # a constexpr, or an absent tensor (None)
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in TUPLE_ARGS:  # "i32:16": an int the JIT sees divisible by 16
            sig[name] = tuple(kind.split(":")[0] for kind in TUPLE_ARGS[name])
            attrs.update({(index, i): [["tt.divisibility", 16]] for i, kind in enumerate(TUPLE_ARGS[name])
                          if kind.endswith(":16")})
        elif name.endswith("_strides"):  # (batch, head, row, head dim) strides: 16-divisible, the last 1
            sig[name] = ("i32", "i32", "i32", "constexpr")
            consts[(index, 3)] = 1
            attrs.update({(index, i): [["tt.divisibility", 16]] for i in range(3)})
        elif name.startswith("stride_") and name[-1] == "d" and fn.__name__.startswith("attention"):
            sig[name], consts[name] = "constexpr", 1
        elif name.isupper():
            partial = name == "O" and consts.get("FINAL") is False  # a split's partial output: float32
            sig[name] = ("*fp32" if name in FLOAT32_POINTERS or partial else "*i64" if name in ("SEED", "TARGET") else
                         "*i32" if name in INT32_POINTERS else
                         "*i1" if name == "KEEP" or name == "MASK" and consts["SPEC"].MASK_KIND == 1 else
                         "*bf16" if dtype == "fp8" and name not in FP8_TENSORS[fn.__name__] else
                         f"*{TRITON_TYPES.get(dtype, dtype)}")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name[:9] in ("stride_m", "stride_a", "stride_g") and len(name) == 9 or name == "stride_scale":
            sig[name] = "i32"  # a mask's, the slopes' or the loss scale's strides: 0 along broadcast dims, often 1
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def cuobjdump(*args):
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def compile_job(job):
    """Compiles one job; returns a dict of its resources, or of its error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"gptfast.kernels.{job.module}"), job.kernel)
    row = {"job": job}
    try:
        constexprs, types = _flex_job(job) if job.flex else (job.constexprs, {})
        sig, consts, attrs = signature(fn, job.dtype, constexprs, types)
        compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", ARCHS[job.arch], 32),
                                  options={"num_warps": job.num_warps, "num_stages": job.num_stages,
                                           **({"maxnreg": job.maxnreg} if job.maxnreg else {})})
    except Exception as error:  # a compile failure is a finding to report, not a crash
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return row
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = cuobjdump("--dump-resource-usage", path)
        sass = cuobjdump("-sass", path)
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    tensor_ops = TENSOR_CORE_OPS.findall(sass)
    row.update(registers=int(fields.get("REG", 0)),
               spill_bytes=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)), shared=compiled.metadata.shared,
               tensor_cores=max(set(tensor_ops), key=tensor_ops.count) if tensor_ops else "none",
               tensor_ops=len(tensor_ops), tma="+".join(sorted(set(TMA_OPS.findall(sass)))) or "-",
               # setmaxnreg moves registers between warp groups: the mark of warp specialisation in SASS
               warp_specialized=bool(re.search(r"SETMAXN?REG", sass)))
    return row


def problems(row):
    if "error" in row:
        return "does not compile"
    if row["spill_bytes"]:
        return "spills"
    if row["registers"] * row["job"].num_warps * 32 > tuning().REGISTER_FILE:
        # ptxas honours the maxnreg cap, not the block's size: such a block fails to launch (out of resources)
        return "registers past the register file"
    if row["shared"] > SHARED_LIMIT[row["job"].arch]:
        return "shared memory overflow"
    return None


@contextlib.contextmanager
def _compiling_children():
    """TRITON_INTERPRET=0 for the processes started inside: workers compile, not interpret (Triton reads it when a
    kernel module is imported). This process gets its own value back after: the test suite interprets in it, and
    a Triton module imported later (gluon's) asserts the setting matches its kernels."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def compile_jobs(jobs, workers):
    """Compiles the jobs in spawned worker processes, new ones for each architecture; yields their rows in order.

    Triton 3.6 carries state from one target's compilation to the next in a process, as a real run (one GPU, one
    target) never does: the decoding kernel's float8 caches compiled for sm_90 and then for sm_89 failed in ptxas
    (a bf16-from-f16 conversion only sm_90 has), and sm_90's after sm_89's took 146 registers instead of 168."""
    by_arch = {}
    for index, job in enumerate(jobs):
        by_arch.setdefault(job.arch, []).append(index)
    done, first_pending = {}, 0
    for indices in by_arch.values():
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            with _compiling_children():  # map submits every job: the workers start inside
                rows = pool.map(compile_job, [jobs[i] for i in indices])
            for index, row in zip(indices, rows):
                done[index] = row
                while first_pending in done:
                    yield done.pop(first_pending)
                    first_pending += 1


def run(archs, kernels, dtypes, workers, out=sys.stdout, head_dims=()):
    jobs = []
    for arch in archs:
        if "attention" in kernels:
            jobs += attention_jobs(arch, dtypes)
        if "flex" in kernels:
            jobs += flex_jobs(arch, dtypes)
        if "decode" in kernels:
            jobs += decode_jobs(arch, dtypes)
        if "layernorm" in kernels:
            jobs += layernorm_jobs(arch, dtypes)
        if "cross_entropy" in kernels:
            jobs += cross_entropy_jobs(arch, dtypes)
    if head_dims:  # kernels without a head dim (layernorm, the loss) stay
        jobs = [job for job in jobs if job.block_d() in (None, *head_dims)]
    print(f"compiling {len(jobs)} kernel configs for {', '.join(archs)} with {workers} workers", file=out, flush=True)
    header = (f"{'arch':6} {'kernel and config':100} {'regs':>4} {'spill':>5} {'smem KiB':>8} {'tensor cores':>13} "
              f"{'TMA':>7} {'ws':>2}  verdict")
    print(header, file=out)
    failures = 0
    progress = Progress(len(jobs))  # on stderr: elapsed and ETA (all seven archs take about half an hour on 2 cores)
    for done, row in enumerate(compile_jobs(jobs, workers), 1):
        problem = problems(row)
        failures += problem is not None
        progress.clear()
        _print_row(row, problem, out)
        progress.report(done, "gptfast inspect")
    print(f"{len(jobs) - failures} of {len(jobs)} configs ok, in {duration(progress.elapsed())}", file=out)
    return 1 if failures else 0


def _print_row(row, problem, out):
    job = row["job"]
    if "error" in row:
        print(f"{job.arch:6} {job.label():100} {row['error']}  FAIL: {problem}", file=out, flush=True)
        return
    tensor = f"{row['tensor_cores']} x{row['tensor_ops']}" if row["tensor_ops"] else "none"
    print(f"{job.arch:6} {job.label():100} {row['registers']:4} {row['spill_bytes']:5} "
          f"{row['shared'] / 1024:8.1f} {tensor:>13} {row['tma']:>7} {'ws' if row['warp_specialized'] else '-':>2}"
          f"  {'FAIL: ' + problem if problem else 'ok'}", file=out, flush=True)


def add_arguments(parser):
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append",
                        help="GPU architecture to compile for (repeatable; default: all)")
    parser.add_argument("--kernel", choices=KERNEL_MODULES, action="append",
                        help="which kernels (repeatable; default: all)")
    parser.add_argument("--dtype", choices=INSPECTED_DTYPES, action="append",
                        help="input dtype to compile for (repeatable; default: all; bf16 stands for 16-bit inputs: "
                             "fp16 compiles as bf16 would, and on sm_75 fp16 is compiled instead; fp8: the FP8 "
                             "attention forward and the decoding kernel's float8 caches, on sm_89 and newer)")
    parser.add_argument("--head-dim", type=int, choices=(16, 32, 64, 128, 256, 512), action="append",
                        help="padded head dim of the attention kernels to compile (repeatable; default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")


def main(args):
    if args.workers < 1:
        raise SystemExit("gptfast inspect: --workers must be at least 1")
    return run(args.arch or sorted(ARCHS), args.kernel or KERNEL_MODULES, args.dtype or INSPECTED_DTYPES,
               args.workers, head_dims=args.head_dim or ())

