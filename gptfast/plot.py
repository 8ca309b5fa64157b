"""``gptfast plot RUN``: a training run's train and val loss curves, from RUN/log.jsonl, to a PNG."""
import json
import os


def add_arguments(parser):
    parser.add_argument("run", help="a run folder written by `gptfast train`")
    parser.add_argument("--output", help="PNG to write (default: RUN/loss.png)")


def main(args):
    path = os.path.join(args.run, "log.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"gptfast plot: {path} does not exist; give a run folder of `gptfast train`")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit(f"gptfast plot: {path} is empty; the run has not logged a step yet")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iter"] for r in records], [r["train_loss"] for r in records], label="train (step)", alpha=0.6)
    evals = [r for r in records if "val_loss" in r]
    if evals:
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(os.path.basename(os.path.abspath(args.run)))
    ax.legend()
    ax.grid(alpha=0.3)
    output = args.output or os.path.join(args.run, "loss.png")
    fig.savefig(output, dpi=120, bbox_inches="tight")
    print(f"wrote {output}")
    return 0
