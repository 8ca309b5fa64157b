"""`gptfast train`, `generate` and `plot` as a user runs them: the loss falls, a resumed run equals an
uninterrupted one, two data-parallel ranks on CPU, the kernels train like the PyTorch reference, signals save a
checkpoint, and bad checkpoints, flags and data are refused clearly."""
import json
import os
import signal
import subprocess
import sys

import pytest

from gptfast.cli import main as cli

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--device", "cpu", "--warmup-iters", "2"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFAST_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def corpus(tmp_path):
    """A small text corpus made by the test: a few Python-like files."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (folder / f"module_{i}.py").write_text(body)
    return str(folder)


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gptfast", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0"})


def test_loss_falls_on_the_default_corpus(home):
    out = str(home / "run")
    assert cli(["train", "--out", out, "--max-iters", "40", "--eval-interval", "40", "--eval-iters", "2",
                "--log-interval", "5", "--kernels", "torch", "--lr", "3e-3", *TINY]) == 0
    log = read_log(out)
    assert [r["iter"] for r in log] == list(range(5, 41, 5))
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 1.0 and "val_loss" in log[-1]
    assert {"lr", "tokens_per_s"} <= log[0].keys()
    assert open(os.path.join(out, "latest")).read() == "checkpoint-40"


def test_resume_continues_exactly(home, corpus):
    common = ["--data", corpus, "--lr-decay-iters", "12", "--eval-interval", "6", "--eval-iters", "1",
              "--log-interval", "1", "--kernels", "torch", "--dropout", "0.1", *TINY]
    straight, split = str(home / "straight"), str(home / "split")
    assert cli(["train", "--out", straight, "--max-iters", "12", *common]) == 0
    assert cli(["train", "--out", split, "--max-iters", "6", *common]) == 0
    assert cli(["train", "--out", split, "--max-iters", "12", "--resume", *common]) == 0
    losses = lambda folder: [r["train_loss"] for r in read_log(folder)]
    assert len(losses(split)) == 12 and losses(split) == losses(straight)


def test_bf16_autocast_training(home, corpus):
    """--dtype bfloat16 (the CUDA default) on the CPU: the autocast path runs and the loss falls."""
    out = str(home / "bf16")
    assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "12", "--eval-interval", "12",
                "--eval-iters", "1", "--log-interval", "4", "--kernels", "torch", "--dtype", "bfloat16",
                "--lr", "3e-3", *TINY]) == 0
    log = read_log(out)
    assert log[-1]["train_loss"] < log[0]["train_loss"] and "val_loss" in log[-1]


def test_kernels_train_like_the_pytorch_reference(home, corpus):
    """Under the interpreter, float32: the fused kernels' losses stay within 1e-4 relative of PyTorch's over a
    few steps (both round differently at 1e-7; training amplifies that only slowly)."""
    losses = {}
    for kernels in ("triton", "torch"):
        out = str(home / kernels)
        assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "3", "--eval-interval", "3",
                    "--eval-iters", "1", "--log-interval", "1", "--kernels", kernels, *TINY]) == 0
        losses[kernels] = [r["train_loss"] for r in read_log(out)]
    for fused, reference in zip(losses["triton"], losses["torch"]):
        assert abs(fused - reference) <= 1e-4 * abs(reference)


def test_two_ranks_with_torchrun_on_cpu(home, corpus):
    out = str(home / "ddp")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptfast",
         "train", "--out", out, "--data", corpus, "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1",
         "--log-interval", "1", "--kernels", "torch", *TINY],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "2 ranks" in result.stdout and result.stdout.count("step 4/4") == 1  # only rank 0 prints
    assert [r["iter"] for r in read_log(out)] == [1, 2, 3, 4]
    state_rngs = os.path.join(out, "checkpoint-4", "train_state.pt")
    import torch
    assert len(torch.load(state_rngs, weights_only=True)["batches_rng"]) == 2


def test_sigterm_saves_and_exits_cleanly(home, corpus):
    out = str(home / "signal")
    process = subprocess.Popen(
        [sys.executable, "-m", "gptfast", "train", "--out", out, "--data", corpus, "--max-iters", "100000",
         "--log-interval", "1", "--kernels", "torch", *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    for line in process.stdout:
        if line.startswith("step 3/"):
            break
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "checkpoint saved" in stdout
    saved = int(open(os.path.join(out, "latest")).read().split("-")[1])
    assert saved >= 3
    assert cli(["train", "--out", out, "--data", corpus, "--max-iters", str(saved + 2), "--resume",
                "--log-interval", "1", "--eval-iters", "1", "--kernels", "torch", *TINY]) == 0
    assert read_log(out)[-1]["iter"] == saved + 2


def test_bad_checkpoints_flags_and_data_are_refused(home, corpus):
    out = str(home / "run")
    assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "2", "--eval-interval", "2",
                "--eval-iters", "1", "--kernels", "torch", *TINY]) == 0
    with pytest.raises(SystemExit, match="n_embd=32"):
        cli(["train", "--out", out, "--data", corpus, "--max-iters", "4", "--resume", "--kernels", "torch",
             *TINY[:4], "--n-embd", "64"])
    with open(os.path.join(out, "checkpoint-2", "train_state.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match="corrupt"):
        cli(["train", "--out", out, "--data", corpus, "--max-iters", "4", "--resume", "--kernels", "torch", *TINY])
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli(["train", "--out", str(home / "empty"), "--resume", *TINY])
    empty = home / "empty.txt"
    empty.write_text("")
    assert cli(["train", "--out", str(home / "x"), "--data", str(empty), *TINY]) == 2
    assert cli(["train", "--out", str(home / "x"), "--data", str(home / "missing"), *TINY]) == 2
    unreadable = home / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.txt").symlink_to(home / "nowhere.txt")  # listed, but cannot be opened
    assert cli(["train", "--out", str(home / "x"), "--data", str(unreadable), *TINY]) == 2


def test_generate_uses_the_newest_run_and_plot_draws_it(home, corpus):
    assert cli(["train", "--data", corpus, "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
                "--log-interval", "1", "--kernels", "torch", *TINY]) == 0
    result = run_cli("generate", "--prompt", "def ", "--max-new-tokens", "12", "--seed", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and "tokens/s" in result.stderr
    assert os.path.join(str(home), "home", "runs") in result.stderr
    run = os.path.dirname(result.stderr.split("[model ")[1].split(" on ")[0])
    assert cli(["plot", run]) == 0 and os.path.getsize(os.path.join(run, "loss.png")) > 1000
    assert "top-p" in run_cli("generate", "--help").stdout
    assert cli(["generate", "--model", str(home / "nothing-here"), "--device", "cpu"]) == 2
    with pytest.raises(SystemExit, match="--greedy takes no"):
        cli(["generate", "--greedy", "--top-k", "5"])
