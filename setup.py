"""gptfast: fused Triton kernels for GPT models.

The kernels live in the top-level folder kernels/ and install as the subpackage gptfast.kernels (PyPI already
has a top-level package named `kernels`, so none is installed)."""
from setuptools import setup

setup(
    name="gptfast",
    version="0.1.0",
    description="Fused Triton kernels (flash-attention, LayerNorm) and a GPT-2 model built on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["gptfast", "gptfast.distributed", "gptfast.kernels"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels"},
    # A range, not a pin: a CUDA box keeps the torch it has; requirements.txt pins the CPU build for CI.
    install_requires=[
        "torch>=2.5",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "hf": ["transformers>=4.48", "safetensors", "tokenizers"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"],
    },
    entry_points={"console_scripts": ["gptfast = gptfast.cli:main"]},
)
