"""Test setup: kernels run compiled on a CUDA machine, and through Triton's interpreter everywhere else; the
fixtures the command tests share.

TRITON_INTERPRET must be set before Triton wraps the kernels, so before anything imports gptfast."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GPTFAST_BACKEND", "auto")

pytest_plugins = ("support",)  # its fixtures (kernels_only) for every test module


@pytest.fixture(autouse=True)
def no_plans_of_earlier_tests():
    """Each test starts without the attention plans earlier tests left (gptfast.attention_plan), as a new process
    would: tests change what a plan depends on (stand-in GPU architectures, patched launchers and choices)."""
    from gptfast.kernels import forget_choices
    forget_choices()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """GPTFAST_HOME in the test's own folder: runs and the token cache."""
    monkeypatch.setenv("GPTFAST_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def corpus(tmp_path):
    """A small text corpus made by the test: twelve Python-like files."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (folder / f"module_{i}.py").write_text(body)
    return str(folder)
