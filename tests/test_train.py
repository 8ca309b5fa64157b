"""`gptfast train` and `plot` as a user runs them: the loss falls, a resumed run equals an uninterrupted one and
logs each step once, resumes refuse changed settings, one trainer per run folder, saves interrupted anywhere never
leave `latest` dangling, two data-parallel ranks on CPU, the kernels train like the PyTorch reference, signals
save a checkpoint, progress with elapsed time and ETA, checkpoints that transformers reads cleanly."""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from support import QUICK, TINY, read_log, step_records

import gptfast
from gptfast.cli import main as cli
from gptfast.model import GPT, GPTConfig
from gptfast.runs import RunFolder, load_train_state
from gptfast.tokenizer import ByteTokenizer, load_tokenizer


def train_process(*args):
    return subprocess.Popen([sys.executable, "-m", "gptfast", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def wait_for_line(process, prefix):
    for line in process.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"the trainer ended before printing {prefix!r}: {process.stderr.read()[-2000:]}")


def test_loss_falls_on_the_default_corpus(home):
    """The default corpus; a val point at step 0, so even a run stopped early has a val curve."""
    out = str(home / "run")
    assert cli(["train", "--out", out, "--max-iters", "40", "--eval-interval", "40", "--eval-iters", "2",
                "--log-interval", "5", "--kernels", "torch", "--lr", "3e-3", *TINY]) == 0
    log = read_log(out)
    assert [r["iter"] for r in log] == [0, *range(5, 41, 5)] and "val_loss" in log[0]
    assert log[-1]["train_loss"] < log[1]["train_loss"] - 1.0 and log[-1]["val_loss"] < log[0]["val_loss"]
    assert {"lr", "tokens_per_s", "elapsed_s"} <= log[1].keys()
    assert open(os.path.join(out, "latest")).read() == "checkpoint-40"


def test_progress_shows_elapsed_time_and_eta(home, corpus, capsys):
    assert cli(["train", "--out", str(home / "run"), "--data", corpus, "--max-iters", "4", "--eval-interval", "4",
                "--log-interval", "2", *QUICK]) == 0
    lines = capsys.readouterr().out.splitlines()
    step_2 = next(line for line in lines if line.startswith("step 2/4"))
    assert "2/4 (50%)" in step_2 and "elapsed" in step_2 and "ETA" in step_2


def test_resume_continues_exactly(home, corpus):
    common = ["--data", corpus, "--lr-decay-iters", "12", "--eval-interval", "6", "--log-interval", "1",
              "--dropout", "0.1", *QUICK]
    straight, split = str(home / "straight"), str(home / "split")
    assert cli(["train", "--out", straight, "--max-iters", "12", *common]) == 0
    assert cli(["train", "--out", split, "--max-iters", "6", *common]) == 0
    assert cli(["train", "--out", split, "--max-iters", "12", "--resume", *common]) == 0
    losses = lambda folder: [r["train_loss"] for r in step_records(folder)]
    assert len(losses(split)) == 12 and losses(split) == losses(straight)


def test_a_killed_run_resumes_with_each_step_logged_once(home, corpus):
    """kill -9 after steps the last checkpoint does not hold were logged (and maybe a line half-written): the
    resume cuts the log back to its step and records itself, so each step appears once."""
    out = str(home / "killed")
    common = ["--out", out, "--data", corpus, "--eval-interval", "4", "--log-interval", "1", *QUICK]
    process = train_process("--max-iters", "100000", *common)
    wait_for_line(process, "step 6/")
    process.kill()
    process.communicate(timeout=60)
    saved = int(open(os.path.join(out, "latest")).read().split("-")[1])
    assert saved in (4, 8) and max(r["iter"] for r in step_records(out)) > saved
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"iter": 99, "train_lo')  # what a kill in the middle of a write leaves
    assert cli(["train", "--max-iters", "10", "--resume", *common]) == 0
    log = read_log(out)
    assert [r["iter"] for r in step_records(out)] == list(range(1, 11))
    assert [r for r in log if r.get("resumed")] == [{"iter": saved, "resumed": True, "changes": {}}]


def test_resume_refuses_flags_that_change_the_run(home, corpus, tmp_path, capsys):
    out = str(home / "run")
    common = ["--out", out, "--data", corpus, "--eval-interval", "2", *QUICK]
    assert cli(["train", "--max-iters", "2", *common]) == 0
    other = tmp_path / "other.txt"
    other.write_text("x = 1\n" * 500)
    refused = [(["--batch-size", "2"], r"--batch-size is 2, the run's is 4; drop those flags, or add --allow-changes"),
               (["--lr", "1e-3", "--grad-accum", "2"], r"--grad-accum is 2, the run's is 1; --lr is 0.001, the "
                                                       r"run's is 0.002;"),
               (["--data", str(other)], r"--data is '.*other.txt', the run's is '.*corpus'"),
               (["--allow-changes", "--n-embd", "64"], r"--n-embd is 64, the run's is 32; drop those flags, or "
                                                       r"start a new run"),
               (["--allow-changes", "--tokenizer", str(tmp_path)], r"--tokenizer is '.*', the run's is 'bytes'"),
               (["--tokenizer", str(tmp_path / "nowhere")], r"--tokenizer .*nowhere: no such folder")]
    for flags, message in refused:
        capsys.readouterr()
        assert cli(["train", "--max-iters", "4", "--resume", *common, *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert cli(["train", "--max-iters", "4", "--resume", "--allow-changes", "--lr", "1e-3", *common]) == 0
    assert "--lr 0.001 (was 0.002)" in capsys.readouterr().out
    resumed = [r for r in read_log(out) if r.get("resumed")]
    assert resumed == [{"iter": 2, "resumed": True, "changes": {"lr": [0.002, 0.001]}}]
    assert load_train_state(os.path.join(out, "checkpoint-4"))["settings"]["lr"] == 1e-3


def test_one_trainer_per_run_folder(home, corpus, capsys):
    """A second trainer on a folder in use exits at once, naming the holder, and writes nothing there."""
    out = home / "busy"
    with RunFolder(str(out)):
        assert cli(["train", "--out", str(out), "--data", corpus, "--max-iters", "2", *QUICK]) == 2
        assert f"in use by another `gptfast train` (pid {os.getpid()})" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == [".lock"]
    assert cli(["train", "--out", str(out), "--data", corpus, "--max-iters", "2", *QUICK]) == 0  # released


@contextlib.contextmanager
def interrupt_at_line(count):
    """Raises KeyboardInterrupt (what a signal does) before the count-th line gptfast's own code runs."""
    package = os.path.dirname(gptfast.__file__)
    seen = [0]

    def trace(frame, event, arg):
        if not frame.f_code.co_filename.startswith(package):
            return None
        if event == "line":
            seen[0] += 1
            if seen[0] == count:
                raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        yield seen
    finally:
        sys.settrace(None)


@pytest.mark.parametrize("second_save", [2, 1], ids=["next-step", "same-step"])
def test_a_save_interrupted_at_any_line_leaves_latest_complete(tmp_path, second_save):
    """Interrupt a save before each line it runs in turn: afterwards `latest` names a checkpoint that loads
    whole, the old one or the new, and the next save cleans up what the stopped one left. A save at the step
    `latest` already names (a signal right after a resume, or during an evaluation's save) is one of them."""
    model = GPT(GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=1, n_embd=8))
    tokenizer, folder = ByteTokenizer(), tmp_path / "run"
    for line in range(1, 1000):
        shutil.rmtree(folder, ignore_errors=True)
        with RunFolder(str(folder)) as run:
            run.save(model, tokenizer, {"iter": 1})
            try:
                with interrupt_at_line(line):
                    run.save(model, tokenizer, {"iter": second_save})
                finished = True
            except KeyboardInterrupt:
                finished = False
            latest = run.latest()
            assert os.path.basename(latest) in ("checkpoint-1", "checkpoint-2")
            assert load_train_state(latest)["iter"] == int(latest[-1])
            GPT.from_pretrained(latest)
            assert isinstance(load_tokenizer(latest), ByteTokenizer)
            run.save(model, tokenizer, {"iter": 3})
            assert sorted(os.listdir(folder)) == [".lock", "checkpoint-3", "latest"]
        if finished:
            break
    assert line > 3, "the save ran too few lines for this test to mean anything"


def test_checkpoints_name_their_own_special_tokens(home, corpus, recwarn):
    """A byte-level checkpoint has no end-of-text token: its config says so, and transformers loads it without
    complaining that GPT-2's 50256 lies outside a 256-token vocabulary."""
    out = str(home / "run")
    assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "1", "--eval-interval", "1", *QUICK]) == 0
    config = transformers.GPT2Config.from_pretrained(os.path.join(out, "checkpoint-1"))
    assert config.bos_token_id is None and config.eos_token_id is None
    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(out, "checkpoint-1"))
    assert model.generation_config.eos_token_id is None


def test_bf16_autocast_training(home, corpus):
    """--dtype bfloat16 (the CUDA default) on the CPU: the autocast path runs and the loss falls."""
    out = str(home / "bf16")
    assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "12", "--eval-interval", "12",
                "--log-interval", "4", "--dtype", "bfloat16", "--lr", "3e-3", *QUICK]) == 0
    log = step_records(out)
    assert log[-1]["train_loss"] < log[0]["train_loss"] and "val_loss" in log[-1]


def test_kernels_train_like_the_pytorch_reference(home, corpus):
    """Under the interpreter, float32: the fused kernels' losses stay within 1e-4 relative of PyTorch's over two
    steps, the second after an optimizer step on the kernels' gradients (both round differently at 1e-7; training
    amplifies that only slowly)."""
    losses = {}
    for kernels in ("triton", "torch"):
        out = str(home / kernels)
        assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "2", "--eval-interval", "2",
                    "--eval-iters", "1", "--log-interval", "1", "--kernels", kernels, *TINY]) == 0
        losses[kernels] = [r["train_loss"] for r in step_records(out)]
    for fused, reference in zip(losses["triton"], losses["torch"]):
        assert abs(fused - reference) <= 1e-4 * abs(reference)


def test_two_ranks_with_torchrun_on_cpu(home, corpus):
    out = str(home / "ddp")
    result = torchrun("--out", out, "--data", corpus, "--max-iters", "4", "--eval-interval", "4", "--log-interval", "1",
                      *QUICK)
    assert "2 ranks" in result.stdout and result.stdout.count("step 4/4") == 1  # only rank 0 prints
    assert [r["iter"] for r in step_records(out)] == [1, 2, 3, 4]
    state = load_train_state(os.path.join(out, "checkpoint-4"))
    assert state["world"] == 2 and len(state["torch_rng"]) == 2


def torchrun(*args, ranks=2):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "gptfast",
         "train", *args], capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_fsdp_trains_like_one_process_and_resumes_exactly(home, corpus):
    """Two gloo ranks sharding the model with FSDP2 train on the global batch one process with twice the batch
    size trains on: the same losses (up to the order of float32 sums); a resumed FSDP run equals an uninterrupted
    one; its checkpoint is a whole Hugging Face GPT-2 folder."""
    common = ["--data", corpus, "--eval-interval", "3", "--log-interval", "1", "--lr-decay-iters", "6", *QUICK]
    single, straight, split = (str(home / name) for name in ("single", "fsdp", "fsdp-split"))
    assert cli(["train", "--out", single, "--max-iters", "6", *common, "--batch-size", "8"]) == 0
    torchrun("--out", straight, "--max-iters", "6", "--fsdp", *common)
    torchrun("--out", split, "--max-iters", "3", "--fsdp", *common)
    torchrun("--out", split, "--max-iters", "6", "--fsdp", "--resume", *common)
    losses = {name: [r["train_loss"] for r in step_records(name)] for name in (single, straight, split)}
    assert len(losses[single]) == 6 and losses[split] == losses[straight]
    for sharded, one in zip(losses[straight], losses[single]):
        assert abs(sharded - one) <= 1e-5 * abs(one)
    model = GPT.from_pretrained(os.path.join(straight, "checkpoint-6"))
    reference = GPT.from_pretrained(os.path.join(single, "checkpoint-6"))
    for (name, weight), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_context_parallel_trains_like_one_process_and_resumes_exactly(home, corpus):
    """Two gloo ranks sharing each sequence (--context-parallel 2, zigzag shards) train on the batches one process
    trains on: the same losses to 1e-5, with ring attention and with all-to-all; a resumed ring run equals an
    uninterrupted one."""
    common = ["--data", corpus, "--eval-interval", "2", "--log-interval", "1", "--lr-decay-iters", "4", *QUICK]
    single, ring, split, all_to_all = (str(home / name) for name in ("single", "ring", "ring-split", "all-to-all"))
    assert cli(["train", "--out", single, "--max-iters", "4", *common]) == 0
    torchrun("--out", ring, "--max-iters", "4", "--context-parallel", "2", *common)
    torchrun("--out", split, "--max-iters", "2", "--context-parallel", "2", *common)
    torchrun("--out", split, "--max-iters", "4", "--context-parallel", "2", "--resume", *common)
    torchrun("--out", all_to_all, "--max-iters", "4", "--context-parallel", "2", "--cp-method", "all-to-all",
             *common)
    losses = {name: [r["train_loss"] for r in step_records(name)] for name in (single, ring, split, all_to_all)}
    assert len(losses[single]) == 4 and losses[split] == losses[ring]
    for one, *sharded in zip(losses[single], losses[ring], losses[all_to_all]):
        assert all(abs(loss - one) <= 1e-5 * abs(one) for loss in sharded)


def test_sigterm_saves_and_exits_cleanly(home, corpus):
    out = str(home / "signal")
    common = ["--out", out, "--data", corpus, "--log-interval", "1", *QUICK]
    process = train_process("--max-iters", "100000", *common)
    wait_for_line(process, "step 3/")
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "checkpoint saved" in stdout
    saved = int(open(os.path.join(out, "latest")).read().split("-")[1])
    assert saved >= 3
    assert cli(["train", "--max-iters", str(saved + 2), "--resume", *common]) == 0
    assert step_records(out)[-1]["iter"] == saved + 2


def test_plot_draws_a_run(home, corpus):
    out = str(home / "run")
    assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "4", "--eval-interval", "2",
                "--log-interval", "1", *QUICK]) == 0
    assert cli(["train", "--out", out, "--data", corpus, "--max-iters", "6", "--eval-interval", "2",
                "--log-interval", "1", "--resume", *QUICK]) == 0
    assert cli(["plot", out]) == 0 and os.path.getsize(os.path.join(out, "loss.png")) > 1000
