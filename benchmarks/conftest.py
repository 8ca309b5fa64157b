"""What every suite here shares: harness.benchmark_marker() on every benchmark (see harness.py for how timing
works), a narrow results table, one side-by-side summary of throughput at the end (report.side_by_side), and a
run stopped by a time limit that still saves what it finished."""
import pytest

import report
from harness import benchmark_marker

# pytest-benchmark's own table has ten columns of times; throughput and the comparison come in our summary.
NARROW_COLUMNS = ["median", "iqr", "rounds"]


def pytest_configure(config):
    if config.getoption("benchmark_columns", None) is None:  # the user did not choose columns
        config.option.benchmark_columns = NARROW_COLUMNS


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


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's table: per case, gptfast's throughput beside each baseline's, and the ratio."""
    benchmark_session = getattr(config, "_benchmarksession", None)
    finished = [b.as_dict(include_data=False) for b in getattr(benchmark_session, "benchmarks", []) if b]
    lines = report.side_by_side([b for b in finished if report.throughput(b)[0] is not None])
    if lines:
        terminalreporter.write_sep("-", "gptfast side by side")
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line("Keep the results with --benchmark-json=FILE; then `python benchmarks/report.py "
                                    "FILE --output report.md` and `python benchmarks/plot.py --output-dir DIR FILE`.")
