"""Applies harness.benchmark_marker() to every benchmark (see harness.py for how timing works), and keeps a run
stopped by a time limit able to save what it finished."""
import pytest

from harness import benchmark_marker


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(benchmark_marker())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """The GPU check stops a suite at its time limit with SIGINT. A benchmark stopped before its first round
    leaves a record with no data, and pytest-benchmark then fails to write the JSON of the whole run
    (min() of an empty sequence); drop such records before it saves."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None:
        benchmark_session.benchmarks[:] = [b for b in benchmark_session.benchmarks if b]  # falsy: no rounds
    return (yield)
