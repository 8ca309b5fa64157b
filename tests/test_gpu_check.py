"""The GPU check must be right the first time it runs on the scarce GPU: dry-run every phase of it here on the
CPU (same code paths, tiny sizes) and check what it leaves in OUTDIR fits what the device tool brings back."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "PYTHON": sys.executable,
           "GPU_CHECK_TESTS": "tests/test_layernorm.py -k module_loads"}
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(out)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tests exit status: 0" in result.stdout
    for suite in ("attention", "layernorm", "gpt", "layernorm_compiled", "gpt_compiled"):
        assert re.search(rf"{suite}: exit status 0 ", result.stdout), result.stdout[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["add_layer_norm.png", "attention.png", "ceilings.json", "check.log", "layer_norm.png",
                     "report.md", "results.json"]
    report = (out / "report.md").read_text()
    assert "| attention fwd bfloat16 D=64 causal T=128 (gptfast) |" in report and "ceilings measured" in report


def test_gpu_check_explains_itself():
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "usage: benchmarks/gpu_check.sh OUTDIR" in result.stdout
