"""A markdown report from pytest-benchmark JSON files: per benchmark group, gptfast's median time and throughput,
the best baseline's, gptfast as a ratio of the best baseline (above 1 is faster), and as a fraction of the
machine's measured ceiling (TFLOP/s over the bf16 matmul rate; GB/s over the copy bandwidth).

usage: python benchmarks/report.py --ceilings ceilings.json --output report.md bench.json [more.json ...]
"""
import argparse
import json


def throughput(bench):
    """(value, unit) of a benchmark's extra_info."""
    info = bench["extra_info"]
    for key, unit in (("tflops", "TFLOP/s"), ("gb_per_s", "GB/s"), ("tokens_per_s", "tok/s")):
        if key in info:
            return info[key], unit
    return None, ""


def load_benchmarks(paths):
    """Every finished benchmark record of the files, and the first file's machine_info. A record without its
    throughput was cut off mid-measurement (the GPU check stops a suite at its time limit with SIGINT, and
    pytest-benchmark still saves what it has): it is left out, and counted."""
    benchmarks, machine, cut_off = [], {}, 0
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        finished = [b for b in data["benchmarks"] if throughput(b)[0] is not None]
        cut_off += len(data["benchmarks"]) - len(finished)
        benchmarks += finished
    return benchmarks, machine, cut_off


def rows(benchmarks, ceilings):
    groups = {}
    for bench in benchmarks:
        groups.setdefault(bench["group"], []).append(bench)
    for group, members in groups.items():
        ours = [b for b in members if b["extra_info"].get("impl", "").startswith("gptfast")]
        baselines = [b for b in members if not b["extra_info"].get("impl", "").startswith("gptfast")]
        for mine in ours:
            best = min(baselines, key=lambda b: b["stats"]["median"]) if baselines else None
            value, unit = throughput(mine)
            ceiling = {"TFLOP/s": ceilings.get("bf16_matmul_tflops"), "GB/s": ceilings.get("copy_gb_per_s")}.get(unit)
            yield {
                "group": group, "impl": mine["extra_info"]["impl"], "median_ms": 1000 * mine["stats"]["median"],
                "throughput": value, "unit": unit,
                "best_baseline": best["extra_info"]["impl"] if best else "-",
                "baseline_throughput": throughput(best)[0] if best else None,
                "vs_best": best["stats"]["median"] / mine["stats"]["median"] if best else None,
                "of_ceiling": value / ceiling if value is not None and ceiling else None,
            }


def side_by_side(benchmarks):
    """Text lines: per case (benchmark group), each gptfast variant's throughput, then each baseline's with
    gptfast's speed over it (above 1x gptfast is faster). Where gptfast ran the very code of a baseline (on a
    machine without the kernels, see harness.measure), the line says so instead of showing noise as a ratio."""
    groups = {}
    for bench in benchmarks:
        groups.setdefault(bench["group"], []).append(bench)
    lines = []
    for group, members in groups.items():
        ours = [b for b in members if b["extra_info"].get("impl", "").startswith("gptfast")]
        for mine in ours:
            value, unit = throughput(mine)
            cells = [f"{mine['extra_info']['impl']} {value:.3g} {unit}" + _peak(mine)]
            for other in (b for b in members if b not in ours):
                ratio = other["stats"]["median"] / mine["stats"]["median"]
                same = mine["extra_info"].get("same_code_as") == other["extra_info"]["impl"]
                cells.append(f"{other['extra_info']['impl']} {throughput(other)[0]:.3g}" + _peak(other)
                             + (" (the same code here)" if same else f" ({ratio:.2f}x)"))
            lines.append(f"{group}: " + ", ".join(cells))
    return lines


def _peak(bench):
    peak = bench["extra_info"].get("peak_mb")
    return "" if peak is None else f" [peak {peak:.0f} MB]"


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(benchmarks, machine, ceilings):
    lines = [f"Machine: {ceilings.get('device', machine.get('cpu', {}).get('brand_raw', '?'))}; ceilings measured "
             f"in the same run: copy {_fmt(ceilings.get('copy_gb_per_s'), 0)} GB/s, bf16 matmul "
             f"{_fmt(ceilings.get('bf16_matmul_tflops'), 1)} TFLOP/s.", "",
             "| case | gptfast ms | gptfast | best baseline | baseline | gptfast / best | of ceiling |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in rows(benchmarks, ceilings):
        of_ceiling = "-" if row["of_ceiling"] is None else f"{100 * row['of_ceiling']:.0f}%"
        lines.append(f"| {row['group']} ({row['impl']}) | {_fmt(row['median_ms'], 3)} | "
                     f"{_fmt(row['throughput'], 1)} {row['unit']} | {row['best_baseline']} | "
                     f"{_fmt(row['baseline_throughput'], 1)} | {_fmt(row['vs_best'])}x | {of_ceiling} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--ceilings", help="JSON from benchmarks/ceilings.py")
    parser.add_argument("--output", required=True, help="markdown file to write")
    parser.add_argument("--merged-json", help="also write all the results as one pytest-benchmark-style JSON")
    args = parser.parse_args()
    benchmarks, machine, cut_off = load_benchmarks(args.results)
    if cut_off:
        print(f"left out {cut_off} benchmark(s) cut off by a time limit before their measurement finished")
    if args.merged_json:
        with open(args.merged_json, "w") as f:
            json.dump({"machine_info": machine, "benchmarks": benchmarks}, f)
    ceilings = {}
    if args.ceilings:
        with open(args.ceilings) as f:
            ceilings = json.load(f)
    text = markdown(benchmarks, machine, ceilings)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
