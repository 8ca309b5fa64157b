"""``gptfast plot RUN``: a training run's train and val loss curves, from RUN/log.jsonl, to a PNG. Resumes are
marked with a dotted line."""
import json
import os


def add_arguments(parser):
    parser.add_argument("run", help="a run folder written by `gptfast train`")
    parser.add_argument("--output", help="PNG to write (default: RUN/loss.png)")


def read_log(path):
    """The log's records, leaving out a line a killed run left half-written (said on stdout)."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if len(records) < len(lines):
        print(f"left out {len(lines) - len(records)} unreadable line(s) of {path}")
    return records


def main(args):
    path = os.path.join(args.run, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; give a run folder of `gptfast train`")
    records = read_log(path)
    steps = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if not steps and not evals:
        raise ValueError(f"{path} holds no logged step yet; plot again once the run has logged one")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iter"] for r in steps], [r["train_loss"] for r in steps], label="train (step)", alpha=0.6)
    if evals:
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    for resume in (r for r in records if r.get("resumed")):
        ax.axvline(resume["iter"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(os.path.basename(os.path.abspath(args.run)))
    ax.legend()
    ax.grid(alpha=0.3)
    output = args.output or os.path.join(args.run, "loss.png")
    fig.savefig(output, dpi=120, bbox_inches="tight")
    print(f"wrote {output}")
    return 0
