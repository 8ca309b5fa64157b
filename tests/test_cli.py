"""The `gptfast` command as a user meets it: generate on a trained run, --help without waiting for torch, and
every failure as one line on stderr that names the file or flag and says what to do (exit status 2 for bad usage
or input, 1 for a run that failed; --traceback shows the traceback), found before any model or data is loaded."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from gptfast import train
from gptfast.cli import main as cli

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--device", "cpu", "--eval-iters", "1", "--kernels", "torch"]


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "gptfast", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0", **env})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder of `gptfast train` (2 steps, byte tokenizer) and the corpus it trained on."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(60)))
    run = root / "run"
    assert cli(["train", "--out", str(run), "--data", str(corpus), "--max-iters", "2", "--eval-interval", "2",
                *TINY]) == 0
    return run, corpus


def test_generate_continues_the_newest_run(home, trained):
    runs = home / "home" / "runs"
    runs.mkdir(parents=True)
    shutil.copytree(trained[0], runs / "latest-run")
    result = run_cli("generate", "--prompt", "def ", "--max-new-tokens", "12", "--seed", "0", "--device", "cpu",
                     GPTFAST_HOME=str(home / "home"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and "tokens/s" in result.stderr
    assert str(runs / "latest-run" / "checkpoint-2") in result.stderr
    assert "top-p" in run_cli("generate", "--help").stdout


def test_generate_with_an_fp8_cache(trained, capsys, monkeypatch):
    """--kv-cache-dtype fp8 reaches GPT.generate, which runs with it (tests/test_model.py checks the float8 cache's
    logits)."""
    from gptfast.model import GPT
    generate, asked = GPT.generate, []

    def recording(*args, **kwargs):
        asked.append(kwargs["kv_cache_dtype"])
        return generate(*args, **kwargs)
    monkeypatch.setattr(GPT, "generate", recording)
    assert cli(["generate", "--model", str(trained[0]), "--device", "cpu", "--max-new-tokens", "3", "--greedy",
                "--kv-cache-dtype", "fp8"]) == 0
    assert asked == ["fp8"] and "3 tokens in" in capsys.readouterr().err


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom gptfast.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'gptfast --help imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train" in result.stdout, result.stderr


def damaged_copy(trained, tmp_path, damage):
    """A copy of the trained run folder; damage(checkpoint folder) spoils it. Returns the run folder."""
    run = tmp_path / "damaged"
    shutil.copytree(trained[0], run)
    damage(run / "checkpoint-2")
    return run


def truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


GENERATE_FAILURES = {
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), r"model.safetensors is corrupt or incomplete"),
    "config a list": (lambda c: (c / "config.json").write_text("[1, 2]"), r"config.json holds a JSON list"),
    "config not json": (lambda c: (c / "config.json").write_text("{'n_layer': 1"), r"config.json is not valid JSON"),
    "tokenizer not json": (lambda c: (c / "gptfast_tokenizer.json").write_text("{"),
                           r"gptfast_tokenizer.json is not valid JSON"),
    "tokenizer of unknown kind": (lambda c: (c / "gptfast_tokenizer.json").write_text('{"kind": "sentencepiece"}'),
                                  r"names the tokenizer kind 'sentencepiece', which this gptfast does not know"),
    "latest names a missing checkpoint": (lambda c: (c.parent / "latest").write_text("checkpoint-9"),
                                          r"latest names 'checkpoint-9', which is not in"),
}


@pytest.mark.parametrize("case", list(GENERATE_FAILURES))
def test_generate_on_a_damaged_run_says_which_file(trained, tmp_path, capsys, case):
    damage, message = GENERATE_FAILURES[case]
    run = damaged_copy(trained, tmp_path, damage)
    assert cli(["generate", "--model", str(run), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    assert_one_line(capsys, message)


def assert_one_line(capsys, message):
    """The failure is stderr's last line and its only one about the error (progress lines may come before)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("gptfast ") and re.search(message, lines[-1]), lines
    assert sum("error" in line.lower() for line in lines) == 1 and not any("Traceback" in line for line in lines)


def usage_failures(trained, tmp_path):
    """(argv, message) of failures found before anything is loaded."""
    run, corpus = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.txt").symlink_to(tmp_path / "nowhere.txt")  # listed, but cannot be opened
    train_run = ["train", "--out", str(tmp_path / "new"), "--max-iters", "2", *TINY]
    return [
        (["generate", "--model", str(tmp_path / "nothing-here")], r"nothing-here is not a checkpoint folder"),
        (["generate", "--temperature", "0"], r"--temperature must be > 0, got 0.0; for the most likely tokens use"),
        (["generate", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
        (["generate", "--greedy", "--top-k", "5"], r"--greedy takes no"),
        (["generate", "--device", "gpu"], r"--device gpu: expected cpu, cuda, cuda:N or auto"),
        ([*train_run, "--tokenizer", str(tmp_path / "nowhere")], r"--tokenizer .*nowhere: no such folder"),
        ([*train_run, "--data", str(tmp_path / "missing")], r"--data .*missing: no such file or folder"),
        ([*train_run, "--data", str(empty)], r"too few for one window"),
        ([*train_run, "--data", str(unreadable)], r"cannot read .*a.txt"),
        ([*train_run, "--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
        ([*train_run, "--dropout", "1"], r"--dropout must be in \[0, 1\)"),
        ([*train_run, "--init-from", str(run / "checkpoint-2"), "--n-layer", "3"], r"--n-layer: with --init-from"),
        ([*train_run, "--allow-changes"], r"--allow-changes goes with --resume"),
        ([*train_run, "--fsdp"], r"--fsdp shards over the ranks torchrun starts: run `torchrun"),
        ([*train_run, "--context-parallel", "2"], r"--context-parallel 2 shards each sequence over that many of the"),
        ([*train_run, "--context-parallel", "0"], r"--context-parallel must be at least 1"),
        (["train", "--out", str(tmp_path / "empty-run"), "--resume", *TINY], r"holds no checkpoint"),
        (["warmup", "--model", str(tmp_path / "nothing-here"), "--train", "8by1024"], r"--train takes BATCHxLENGTH"),
        (["warmup", "--model", str(tmp_path / "nothing-here"), "--batch-size", "0"], r"--batch-size must be at least"),
    ]


def test_usage_failures_are_one_line(trained, tmp_path, home, capsys):
    for argv, message in usage_failures(trained, tmp_path):
        assert cli(argv) == 2, argv
        assert_one_line(capsys, message)


def test_context_parallel_refuses_packing_and_dropout(tmp_path, monkeypatch, capsys):
    """Under torchrun (its RANK and WORLD_SIZE), before any process group starts."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra in (["--pack"], ["--dropout", "0.1"]):
        argv = ["train", "--out", str(tmp_path / "cp"), "--max-iters", "2", *TINY, "--context-parallel", "2", *extra]
        assert cli(argv) == 2, argv
        assert_one_line(capsys, r"--context-parallel does not take --pack or --dropout yet: drop them")


def test_a_corrupt_train_state_is_refused_on_resume(trained, tmp_path, capsys):
    run = damaged_copy(trained, tmp_path, lambda c: truncate(c / "train_state.pt"))
    assert cli(["train", "--out", str(run), "--resume", "--max-iters", "4", *TINY]) == 2
    assert_one_line(capsys, r"train_state.pt is corrupt or incomplete.*start a new run with another --out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "generate"])
def test_device_cuda_without_cuda(trained, capsys, command):
    assert cli([command, "--device", "cuda", "--model" if command == "generate" else "--out",
                str(trained[0])]) == 2
    assert_one_line(capsys, r"--device cuda: this machine has no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_kernels_triton_on_a_cpu_fails_before_any_work(tmp_path):
    result = run_cli("train", "--out", str(tmp_path / "run"), "--kernels", "triton", "--device", "cpu",
                     GPTFAST_HOME=str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "gptfast train: error: --kernels triton: the Triton kernels need a CUDA device, and the device is cpu; use "
        "--kernels auto (PyTorch where the kernels cannot run) or --kernels torch"]


def test_a_hub_name_offline_is_one_line_saying_what_to_do(tmp_path):
    result = run_cli("generate", "--model", "gpt2", "--device", "cpu", HF_HUB_OFFLINE="1",
                     HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download gpt2 --local-dir gpt2" in lines[0], result.stderr


def test_a_failed_run_exits_1_and_traceback_shows_where(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
    monkeypatch.setattr(train, "main", broken)
    assert cli(["train"]) == 1
    assert_one_line(capsys, r"error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB \(rerun with "
                            r"--traceback to see where\)")
    with pytest.raises(RuntimeError, match="out of memory"):
        cli(["train", "--traceback"])
