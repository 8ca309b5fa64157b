"""The attention kernels' variants and how a call picks them: the TMA forward and the single-pass backward against
the float64 reference (each forced, and shown to have run by the launches it made), the deterministic backward
bit for bit, the per-architecture tables, length buckets and pruning, and calls the kernels decline."""
import warnings

import pytest
import torch
import triton

from gptfast import attention_core, backend
from gptfast.attention import flash_attn_func, scaled_dot_product_attention
from gptfast.kernels import arch_of, attention as kernels, attention_tuning as tuning
from gptfast.kernels.attention_spec import Spec
from support import (BOTTOM_RIGHT, NONE, TOP_LEFT, bthd, check_against_reference, kernel_keep_mask, mask_args,
                     random_qkv, seed_of, shape_id)
from tolerance import DEVICE, DTYPES


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, TMA, ATOMIC_DQ) of every attention kernel launch (the autotuners call JITFunction.run
    with the config's constexprs), and PERSISTENT's values in launches.persistent."""
    seen, persistent = Launches(), set()
    seen.persistent = persistent
    for name in ("attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"):
        jit = getattr(kernels, name)
        original = jit.run

        def run(*args, _name=name, _original=original, **kwargs):
            seen.append((_name, kwargs.get("TMA"), kwargs.get("ATOMIC_DQ")))
            persistent.add(kwargs.get("PERSISTENT"))
            return _original(*args, **kwargs)
        monkeypatch.setattr(jit, "run", run)
    return seen


class Launches(list):
    persistent: set


SHAPES = [  # (batch, heads, kv_heads, Tq, Tk, head_dim): lengths 1, 7, 100, 257, Tq != Tk, odd head dims, GQA
    (1, 1, 1, 1, 1, 16), (2, 3, 3, 7, 7, 24), (1, 4, 2, 100, 57, 40), (1, 2, 1, 257, 100, 80),
    (2, 2, 2, 7, 100, 96), (1, 1, 1, 33, 33, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [NONE, TOP_LEFT, BOTTOM_RIGHT])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_tma_forward_and_single_pass_backward_match_the_reference(shape, causal, dtype, launches):
    q, k, v = random_qkv(*shape, dtype, seed=seed_of(shape, causal, "variants"))
    kwargs = mask_args(causal, shape[3], shape[4])
    tma = dtype != torch.float32  # float32 runs pointers: its tiles spill with TMA
    single_pass = shape[-1] <= tuning.SINGLE_PASS_MAX_HEAD_DIM
    with backend.use_backend("triton"), tuning.forced_variants(forward="tma" if tma else None,
                                                               backward="single_pass" if single_pass else None):
        check_against_reference(
            q, k, v, causal, lambda q, k, v: scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs))
    backward = ({("attention_backward_dkdv_kernel", tma, True)} if single_pass else  # TMA loads there too
                {("attention_backward_dkdv_kernel", tma, False), ("attention_backward_dq_kernel", tma, None)})
    assert set(launches) == {("attention_forward_kernel", tma, None), *backward}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [NONE, BOTTOM_RIGHT])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 16), (2, 3, 3, 7, 7, 24), (1, 4, 2, 100, 57, 40),
                                   (1, 2, 1, 257, 100, 80)], ids=shape_id)
def test_persistent_forward_matches_the_reference(shape, causal, dtype, launches):
    """3 programs in the interpreter, looping over every (query block, head) tile: more tiles than programs, and
    fewer."""
    q, k, v = random_qkv(*shape, dtype, seed=seed_of(shape, causal, "persistent"))
    with backend.use_backend("triton"), tuning.forced_variants(forward="tma_persistent"):
        check_against_reference(
            q, k, v, causal, lambda q, k, v: flash_attn_func(*bthd(q, k, v), causal=causal != NONE).transpose(1, 2))
    assert ("attention_forward_kernel", True, None) in launches and True in launches.persistent


def test_single_pass_backward_with_every_feature_but_a_mask_gradient(launches):
    """Window, softcap, ALiBi, a boolean mask and dropout with GQA and odd lengths, through flash_attn_func."""
    q, k, v = random_qkv(2, 4, 2, 45, 70, 40, torch.float32, seed=23)
    slopes = torch.rand(4).to(DEVICE)
    keep = kernel_keep_mask(5, (2, 4, 45, 70), 0.2)

    def run(q, k, v):
        torch.manual_seed(5)
        return flash_attn_func(*bthd(q, k, v), dropout_p=0.2, window_size=(20, 6), softcap=3.0,
                               alibi_slopes=slopes).transpose(1, 2)

    with backend.use_backend("triton"), tuning.forced_variants(backward="single_pass"):
        check_against_reference(q, k, v, NONE, run, window=(20, 6), softcap=3.0, alibi=slopes.expand(2, 4),
                                keep=keep, dropout_p=0.2)
    assert ("attention_backward_dkdv_kernel", False, True) in launches
    assert not any(name == "attention_backward_dq_kernel" for name, _, _ in launches)


@pytest.fixture
def single_pass_preferred(monkeypatch):
    """The backward's choice as a GPU's tuner may make it: the variants offered as on sm_90 (the interpreter's own
    rule offers the two kernels alone), and the single pass winning whenever it is offered."""
    choices = kernels.backward_choices
    monkeypatch.setattr(kernels, "backward_choices", lambda arch, *args: choices("sm_90", *args))
    monkeypatch.setattr(kernels, "fastest", lambda key, runs, kernels=(): "single_pass" if "single_pass" in runs
                        else next(iter(runs)))


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_deterministic_backward_is_bit_reproducible(deterministic, single_pass_preferred, launches,
                                                        kernels_only):
    """deterministic=True takes the atomic-free kernels where the tuner would pick the single pass (which it does
    without the flag), and two runs agree bit for bit."""
    q, k, v = (t.requires_grad_() for t in bthd(*random_qkv(1, 4, 2, 70, 90, 32, torch.bfloat16, seed=3)))
    grads = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    atomic = {atomic for _, _, atomic in launches if atomic is not None}
    assert atomic == ({False} if deterministic else {True})
    assert (("attention_backward_dq_kernel", False, None) in launches) == deterministic


def test_backward_choices():
    """On a GPU both variants are timed unless the call must be deterministic or needs the mask's gradient."""
    assert tuning.backward_choices("sm_90", 128, deterministic=False, mask_grad=False) == tuning.BACKWARD_VARIANTS
    assert tuning.backward_choices("sm_90", 64, deterministic=True, mask_grad=False) == ("two_kernel",)
    assert tuning.backward_choices("sm_90", 64, deterministic=False, mask_grad=True) == ("two_kernel",)
    assert tuning.backward_choices("sm_90", 256, deterministic=False, mask_grad=False) == ("two_kernel",)
    assert tuning.backward_choices("interpreter", 64, deterministic=False, mask_grad=False) == ("two_kernel",)
    torch.use_deterministic_algorithms(True)
    try:
        assert tuning.backward_choices("sm_80", 64, deterministic=False, mask_grad=False) == ("two_kernel",)
    finally:
        torch.use_deterministic_algorithms(False)
    with tuning.forced_variants(backward="single_pass"), pytest.raises(tuning.VariantUnavailable,
                                                                       match="mask its gradient"):
        tuning.backward_choices("sm_90", 64, deterministic=False, mask_grad=True)
    with tuning.forced_variants(backward="single_pass"), pytest.raises(tuning.VariantUnavailable, match="past 128"):
        tuning.backward_choices("sm_90", 256, deterministic=False, mask_grad=False)


def test_the_fastest_variant_is_timed_once_per_key(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # where the choice is kept (tests/test_autotune.py)
    times = {"slow": 2.0, "fast": 1.0}
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: timed.append(fn()) or times[fn()])
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    runs = {"slow": lambda: "slow", "fast": lambda: "fast"}
    key = ("test key", object())
    assert tuning.fastest(key, runs) == "fast" and tuning.fastest(key, runs) == "fast"
    assert sorted(timed) == ["fast", "slow"]  # timed once
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    assert tuning.fastest(("another key",), runs) == "slow"  # GPTFAST_AUTOTUNE=0: the first, untimed


def test_tma_is_offered_only_where_it_can_run():
    assert tuning.forward_variants("sm_90", features=False, tma_ready=True) == tuning.FORWARD_VARIANTS
    assert tuning.forward_variants("sm_100", features=False, tma_ready=True) == tuning.FORWARD_VARIANTS
    assert tuning.forward_variants("sm_80", features=False, tma_ready=True) == ("pointers",)
    assert tuning.forward_variants("sm_90", features=True, tma_ready=True) == ("pointers",)
    assert tuning.forward_variants("sm_90", features=False, tma_ready=False) == ("pointers",)
    for variant in ("tma", "tma_persistent"):
        with tuning.forced_variants(forward=variant), pytest.raises(tuning.VariantUnavailable, match="16-byte aligned"):
            tuning.forward_variants("sm_90", features=False, tma_ready=False)
        with tuning.forced_variants(forward=variant):
            assert tuning.backward_loads("sm_80", features=False, tma_ready=True) == ("tma",)
    assert tuning.backward_loads("sm_90", features=False, tma_ready=True) == ("pointers", "tma")
    assert tuning.backward_loads("sm_90", features=True, tma_ready=True) == ("pointers",)
    with pytest.raises(ValueError, match="forward variant must be one of"):
        with tuning.forced_variants(forward="wgmma"):
            pass


def test_tma_needs_16_bit_16_byte_rows():
    q = torch.randn(2, 3, 10, 24, dtype=torch.bfloat16)
    assert kernels._tma_ready(q)
    assert not kernels._tma_ready(q.float())
    assert not kernels._tma_ready(torch.randn(2, 3, 10, 28, dtype=torch.float16)[..., :24])  # rows 56 bytes apart
    assert not kernels._tma_ready(q.transpose(2, 3))


def test_every_compute_capability_finds_a_table():
    """Each listed arch its own; one without a table the nearest older, with a warning once."""
    for capability, arch in {(7, 5): "sm_75", (8, 0): "sm_80", (8, 6): "sm_86", (8, 9): "sm_89", (9, 0): "sm_90",
                             (10, 0): "sm_100", (12, 0): "sm_120"}.items():
        assert arch_of(capability) == arch
        assert arch == "sm_75" or arch in tuning.CONFIGS["forward"] and arch in tuning.FEATURE_CONFIGS["backward_dq"]
    arch_of.cache_clear()
    with pytest.warns(UserWarning, match="no tuning table for compute capability 10.3; using sm_100"):
        assert arch_of((10, 3)) == "sm_100"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert arch_of((10, 3)) == "sm_100"
    with pytest.warns(UserWarning, match="8.7; using sm_86"):
        assert arch_of((8, 7)) == "sm_86"
    with pytest.warns(UserWarning, match="7.0; using sm_75"):
        assert arch_of((7, 0)) == "sm_75"


def test_decoding_and_prefill_are_tuned_apart():
    """Tq = 1 and Tq = 8192 get different autotuners; a single query row never gets a 128-row query block."""
    tuner = lambda seqlen_q: tuning.autotuned(kernels.attention_forward_kernel, "forward", "sm_90", torch.bfloat16,
                                              seqlen_q, 8192, Spec.plain(128, "ieee"))
    decode, prefill = tuner(1), tuner(8192)
    assert decode is not prefill
    assert {c.kwargs["BLOCK_M"] for c in decode.configs} == {64}  # the smallest the table has for D = 128
    assert {c.kwargs["BLOCK_M"] for c in prefill.configs} == {64, 128}
    assert tuning.length_bucket(1) == 1 and tuning.length_bucket(1000) == tuning.length_bucket(1024) == 1024
    configs = tuning.configs_for("forward", "sm_90", 64)
    assert tuning.fitting(configs, 16, 16) == [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    assert tuning.fitting(configs, 64, 4096) == [c for c in configs if c.kwargs["BLOCK_M"] <= 64]


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_turing_runs_pytorch_or_raises(monkeypatch, mode):
    monkeypatch.setattr(attention_core, "compute_capability", lambda device: (7, 5))
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16, torch.float16, seed=1)
    backend._warned.clear()
    with backend.use_backend(mode):
        if mode == "triton":
            with pytest.raises(NotImplementedError, match="before sm_80"):
                scaled_dot_product_attention(q, k, v)
        else:
            with pytest.warns(UserWarning, match="before sm_80"):
                out = scaled_dot_product_attention(q, k, v)
            torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
