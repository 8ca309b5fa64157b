"""The GPU check must be right the first time it runs on the scarce GPU: dry-run every phase of it here on the
CPU (same code paths, tiny sizes) and check what it leaves in OUTDIR fits what the device tool brings back."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Each suite's closing pytest line on the CPU: its cases ran. The torch.compile baselines build only on CUDA: a
# dry run without a GPU leaves them out.
SUITES = {"attention": "passed", "layernorm": "passed", "gpt": "passed", "loss": "passed", "decode": "passed",
          "varlen": "passed", "flex": "passed", "models": "passed", "ring": "passed"}


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """Every phase runs and reports. The dry run keeps none of the GPU run's time limits (a suite's speed on a CPU
    shared with the other test worker says nothing); the timeout here only stops a hang."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "PYTHON": sys.executable,
           "GPU_CHECK_TESTS": "tests/test_layernorm.py -k module_loads"}
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(out)],
                            capture_output=True, text=True, timeout=1800, env=env, preexec_fn=ignoring_sigint)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tests exit status: 0" in result.stdout
    assert "building exit status: 0 " in result.stdout
    assert "compiled baselines: not run (a CPU dry run" in result.stdout
    for suite, closing in SUITES.items():
        assert re.search(rf"^{suite}: exit status 0 after \d+ s in all; \d+ {closing}", result.stdout,
                         re.MULTILINE), result.stdout[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["add_layer_norm.png", "attention.png", "ceilings.json", "check.log", "first_step.jsonl",
                     "layer_norm.png", "report.md", "results.json", "ring_ranks.jsonl"]
    report = (out / "report.md").read_text()
    assert "| attention fwd bfloat16 D=64 causal T=128 (gptfast) |" in report and "ceilings measured" in report
    first_steps = [json.loads(line) for line in (out / "first_step.jsonl").read_text().splitlines()]
    assert [record["label"] for record in first_steps] == ["empty cache", "warm cache", "after gptfast warmup"]
    assert all(record["first_step_s"] > 0 and record["second_step_s"] > 0 for record in first_steps)
    assert "[warm: 2 steps in" in result.stdout  # gptfast warmup's last line: a training step and a generation
    ring = json.loads((out / "ring_ranks.jsonl").read_text())  # two gloo ranks' ring against one process
    assert ring["world"] == 2 and ring["ring_s"] > 0 and ring["one_gpu_s"] > 0


def test_gpu_check_explains_itself():
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "usage: benchmarks/gpu_check.sh OUTDIR" in result.stdout


def _outside_xdist():
    """This environment without pytest-xdist's worker variables: a pytest started with them (from a test run
    with -n) switches pytest-benchmark off."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}


def ignoring_sigint():
    """What a shell does to a job it starts in the background (`cmd &`, `nohup cmd &`, a remote runner)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("stopped_in_round", [0, 1])
def test_a_suite_stopped_at_its_limit_keeps_what_it_finished(tmp_path, stopped_in_round):
    """The GPU check stops a suite at its time limit with SIGINT (benchmarks/limit.py) and trusts pytest-benchmark
    to still write the benchmarks that finished, even where the check itself was started with SIGINT ignored. A
    benchmark stopped in its first round has no data (benchmarks/conftest.py drops it, or the whole JSON is lost);
    one stopped later has no throughput, and the report leaves it out."""
    for name in ("conftest.py", "harness.py", "report.py"):
        shutil.copy(os.path.join(REPO, "benchmarks", name), tmp_path)
    (tmp_path / "bench_stopped.py").write_text(textwrap.dedent(f"""
        import time

        import pytest

        @pytest.mark.parametrize("case", range(4))
        def test_case(benchmark, case):
            benchmark.group = "stopped"
            benchmark.extra_info["impl"] = "gptfast" if case % 2 else "torch"
            rounds = []
            def work():
                if case == 2 and len(rounds) == {stopped_in_round}:
                    time.sleep(120)  # still measuring case 2 when the limit comes
                rounds.append(1)
            benchmark.pedantic(work, rounds=3)
            benchmark.extra_info["gb_per_s"] = 1.0 + case
    """))
    results = tmp_path / "part.json"
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "limit.py"), "8", sys.executable, "-m",
                          "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "bench_stopped.py",
                          f"--benchmark-json={results}"], preexec_fn=ignoring_sigint,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_outside_xdist())
    assert run.returncode == 124 and "KeyboardInterrupt" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    saved = [b["name"] for b in json.loads(results.read_text())["benchmarks"]]
    assert saved == ["test_case[0]", "test_case[1]"] + (["test_case[2]"] if stopped_in_round else [])
    report = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "report.py"), str(results),
                             "--output", str(tmp_path / "report.md")], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert ("left out 1 benchmark(s) cut off" in report.stdout) == bool(stopped_in_round)
    assert "| stopped (gptfast) |" in report.stdout and "| torch | 1.0 |" in report.stdout


def test_the_attention_benchmark_skips_only_a_variant_that_cannot_run(monkeypatch):
    """A case that a forced variant (or a forced SDPA backend) cannot take is skipped; a kernel that breaks fails
    its benchmark instead of passing as a skip."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import bench_attention
    from gptfast.kernels.attention_tuning import VariantUnavailable

    monkeypatch.setattr(bench_attention, "GPU_ONLY", set())

    def outcome(impl, error):
        def attend(q, k, v, causal):
            raise error
        monkeypatch.setitem(bench_attention.IMPLS, impl, attend)
        try:
            bench_attention.test_attention(None, bench_attention.CASES[0], impl)
        except pytest.skip.Exception:  # a BaseException: pytest.raises(Exception) would let it skip this test
            return "skipped"
        except RuntimeError:
            return "failed"
        return "ran"

    assert outcome("gptfast-tma-single-pass", VariantUnavailable("past 128")) == "skipped"
    assert outcome("torch-flash", RuntimeError("No available kernel.  Aborting execution.")) == "skipped"
    for impl in ("gptfast", "gptfast-tma-single-pass", "torch-flash", "torch-sdpa"):
        assert outcome(impl, RuntimeError("an illegal memory access was encountered")) == "failed", impl
