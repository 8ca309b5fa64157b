"""Charts from pytest-benchmark JSON files: throughput against sequence length (attention) or hidden size
(LayerNorm), one line per implementation, one panel per case; one PNG per op.

usage: python benchmarks/plot.py --output-dir DIR bench.json [more.json ...]
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from report import load_benchmarks  # noqa: E402

# op -> (x-axis key in extra_info, fields that make a panel, throughput key, unit)
CHARTS = {
    "attention": ("seqlen", ("mode", "dtype", "head_dim", "causal"), "tflops", "TFLOP/s"),
    "layer_norm": ("hidden", ("mode", "dtype"), "gb_per_s", "GB/s"),
    "add_layer_norm": ("hidden", ("mode", "dtype"), "gb_per_s", "GB/s"),
}


def plot(benchmarks, op, output_dir):
    x_key, panel_keys, y_key, unit = CHARTS[op]
    panels = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        if info.get("op") == op and y_key in info:
            panel = tuple(info[k] for k in panel_keys)
            panels.setdefault(panel, {}).setdefault(info["impl"], []).append((info[x_key], info[y_key]))
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, (panel, impls) in zip(axes.flat, sorted(panels.items(), key=str)):
        for impl, points in sorted(impls.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=impl,
                    linewidth=2.5 if impl == "gptfast" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel)), fontsize=9)
        ax.set_xlabel(x_key)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(output_dir, f"{op}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs")
    args = parser.parse_args()
    benchmarks = load_benchmarks(args.results)[0]
    os.makedirs(args.output_dir, exist_ok=True)
    for op in CHARTS:
        path = plot(benchmarks, op, args.output_dir)
        if path:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
