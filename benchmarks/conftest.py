"""Applies harness.benchmark_marker() to every benchmark (see harness.py for how timing works)."""
from harness import benchmark_marker


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(benchmark_marker())
