"""Autotuning paid once per machine (gptfast.kernels.autotune): every autotuner keeps its timings on disk, per
scope (length buckets) and GPU, and so does the backward's variant choice; `gptfast warmup` leaves nothing to
tune for the shapes it ran. Triton keeps its disk cache off in the interpreter, so the disk tests drive Triton's
own disk path (Autotuner.check_disk_cache) with a stand-in GPU target."""
import types

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import autotuner as triton_autotuner
from triton.runtime.jit import JITFunction

from gptfast.cli import main as cli
from gptfast.config import GPTConfig
from gptfast.kernels import attention_tuning, autotune, decode, layernorm
from gptfast.model import GPT


def _copy(X, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(X + offsets, tl.load(X + offsets, mask=offsets < n), mask=offsets < n)


_copy_kernel = JITFunction(_copy)  # a compiled kernel's JITFunction, which the interpreter's triton.jit is not

CONFIGS = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
KEY = (100, "torch.float32")


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """An empty Triton cache directory and a stand-in GPU target (the interpreter has none)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_autotuner, "driver", types.SimpleNamespace(
        active=types.SimpleNamespace(get_current_target=lambda: "stand-in")))
    monkeypatch.setattr("triton.compiler.compiler.make_backend", lambda target: types.SimpleNamespace(
        hash=lambda: f"{target}-backend"))
    return tmp_path


def tune(tuner, timings):
    """What Autotuner.run does on a key it has not seen: check the disk, else time (here: take timings)."""
    timed = []

    def bench():
        timed.append(True)
        tuner.configs_timings = timings
        tuner.cache[KEY] = min(timings, key=timings.get)

    tuner.check_disk_cache(KEY, CONFIGS, bench)
    return tuner.cache[KEY], bool(timed)


def test_timings_are_read_back_from_disk_in_their_own_scope(disk, monkeypatch):
    first = autotune.autotune(_copy_kernel, CONFIGS, key=["n"], scope=(1024,))
    best, timed = tune(first, {CONFIGS[0]: 2.0, CONFIGS[1]: 1.0})
    assert timed and best.kwargs == {"BLOCK": 32}
    # a new process: the same autotuner finds the timings on disk and times nothing
    best, timed = tune(autotune.autotune(_copy_kernel, CONFIGS, key=["n"], scope=(1024,)), {})
    assert not timed and best.kwargs == {"BLOCK": 32}
    # another length bucket, or another GPU of the same architecture, times its own
    _, timed = tune(autotune.autotune(_copy_kernel, CONFIGS, key=["n"], scope=(16384,)), {CONFIGS[0]: 1.0})
    assert timed
    monkeypatch.setattr(autotune, "gpu_name", lambda: "another GPU")
    _, timed = tune(autotune.autotune(_copy_kernel, CONFIGS, key=["n"], scope=(1024,)), {CONFIGS[0]: 1.0})
    assert timed


STAGED = [triton.Config({"BLOCK": 16, "TMA": False}), triton.Config({"BLOCK": 32, "TMA": False}),
          triton.Config({"BLOCK": 16, "TMA": True}), triton.Config({"BLOCK": 32, "TMA": True}),
          triton.Config({"BLOCK": 64, "TMA": True})]


def staged_prune(timings):
    """A new process's staged tuner over STAGED pruning for a launch: (the configs it keeps, those it timed)."""
    tuner = autotune.autotune(_copy_kernel, STAGED, key=["n"], scope=(1024,))
    timed = []
    tuner._bench = lambda *args, config, **kwargs: timed.append(config) or [timings[config.kwargs["TMA"]]] * 3
    tuner.nargs = {}
    return tuner.prune_configs({"X": torch.zeros(4), "n": 100}), timed


def test_staged_tuning_times_each_variants_lead_then_one_variants_tiles(disk, monkeypatch):
    """Two variants (TMA off and on): their leads are timed, then only the faster variant's tiles are kept for
    Triton's own timing; a new process reads the variant's choice from disk; GPTFAST_AUTOTUNE=all keeps every
    config. The count the compilations test takes: each lead and the largest variant's other tiles."""
    kept, timed = staged_prune({False: 2.0, True: 1.0})
    assert timed == [STAGED[0], STAGED[2]] and kept == STAGED[2:]
    kept, timed = staged_prune({False: 1.0, True: 2.0})
    assert timed == [] and kept == STAGED[2:]
    monkeypatch.setattr(autotune, "gpu_name", lambda: "another GPU")
    kept, timed = staged_prune({False: 1.0, True: 2.0})
    assert timed == [STAGED[0], STAGED[2]] and kept == STAGED[:2]
    assert autotune.autotune(_copy_kernel, STAGED, key=["n"]).compilations() == 2 + 3 - 1
    monkeypatch.setattr(autotune, "EXHAUSTIVE", True)
    assert staged_prune({}) == (STAGED, []) and autotune.autotune(_copy_kernel, STAGED, key=["n"]).compilations() == 5


def test_every_autotuner_keeps_its_timings_on_a_gpu(monkeypatch):
    """Each launcher's autotuner is scoped and caches on disk (which Triton turns off in the interpreter)."""
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    made = [attention_tuning._autotuner.__wrapped__(_copy_kernel, "forward", "sm_90", 64, False, False, False,
                                                    ("pointers",), 1024, 1024),
            decode._autotuner.__wrapped__("16-bit", 64, 16, 1024, False),
            layernorm.autotuned.__wrapped__(_copy_kernel, "forward", "sm_90", 1024)]
    assert all(isinstance(tuner, autotune.Scoped) and tuner.cache_results for tuner in made)
    assert made[0].scope == (1024, 1024) and made[1].scope == (16, 1024)


def test_the_backward_variant_is_timed_once_per_gpu(disk, monkeypatch):
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda run: timed.append(run) or run())
    monkeypatch.setattr(attention_tuning, "AUTOTUNE", True)
    monkeypatch.setattr(attention_tuning, "_fastest", {})
    runs = {"two_kernel": lambda: 2.0, "single_pass": lambda: 1.0}
    assert attention_tuning.fastest(("sm_90", "a call"), runs) == "single_pass" and len(timed) == 2
    attention_tuning._fastest.clear()  # a new process reads the choice from disk
    assert attention_tuning.fastest(("sm_90", "a call"), runs) == "single_pass" and len(timed) == 2
    monkeypatch.setattr(autotune, "gpu_name", lambda: "another GPU")
    attention_tuning._fastest.clear()
    attention_tuning.fastest(("sm_90", "a call"), runs)
    assert len(timed) == 4


def autotuners_made():
    return sum(factory.cache_info().misses for factory in (attention_tuning._autotuner, decode._autotuner,
                                                           layernorm.autotuned))


def test_warmup_leaves_nothing_to_tune_for_its_shapes(tmp_path, capsys):
    """After `gptfast warmup` a training step of its shape and a generation from a prompt in its bucket make no
    new autotuner (on a GPU each would time every config of its tiles the first time)."""
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)).save_pretrained(tmp_path / "m")
    assert cli(["warmup", "--model", str(tmp_path / "m"), "--train", "2x16", "--prefill", "9",
                "--device", "cpu"]) == 0
    assert "warm: 2 steps" in capsys.readouterr().out
    for flags, message in ((["--train", "2x64"], "--train: a sequence length is past the model's block size (32)"),
                           (["--prefill", "31"], "--prefill: a prompt must be at most 30 tokens")):
        assert cli(["warmup", "--model", str(tmp_path / "m"), "--device", "cpu", *flags]) == 2
        assert message in capsys.readouterr().err
    model = GPT.from_pretrained(str(tmp_path / "m"))
    before = autotuners_made()
    ids = torch.randint(0, 64, (2, 16))
    model.loss(ids, ids).backward()
    with torch.no_grad():
        model.eval().generate(ids[:1, :12], 2, do_sample=False)
    assert autotuners_made() == before
    with torch.no_grad():
        model.generate(ids[:1, :3], 2, do_sample=False)  # a prompt in another bucket: a new one
    assert autotuners_made() > before
