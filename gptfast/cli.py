"""The ``gptfast`` command (also ``python -m gptfast``): one subcommand per job, each with its own --help.

Only the chosen subcommand's module is imported (they import torch, which takes seconds), so ``gptfast --help``
answers at once. Every failure is one line on stderr saying what is wrong and what to do: exit status 2 for bad
usage (flags, missing or damaged input files), 1 for a run that failed. ``--traceback`` (or GPTFAST_DEBUG=1)
shows the whole traceback instead.
"""
import argparse
import importlib
import os
import sys

# subcommand -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "train": ("gptfast.train", "train a GPT on gptfast's kernels (single device, or data-parallel under torchrun)"),
    "generate": ("gptfast.generate", "continue a prompt with a GPT-2 checkpoint, streaming the text"),
    "warmup": ("gptfast.warmup", "compile and tune, once per machine, the kernels a model's training steps and "
                                 "generation will run (progress and ETA)"),
    "plot": ("gptfast.plot", "draw a training run's loss curves (RUN/log.jsonl) to a PNG"),
    "inspect": ("gptfast.inspect", "compile every kernel config for each GPU architecture (sm_75 to sm_120) "
                                   "without a GPU and report registers, spills, shared memory, tensor-core and "
                                   "TMA use"),
}


def build_parser(argv):
    parser = argparse.ArgumentParser(prog="gptfast", description="Fused Triton kernels for GPT models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        sub.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
        if name == chosen:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return importlib.import_module(args.module).main(args) or 0
    except (Exception, KeyboardInterrupt) as error:
        if args.traceback or os.environ.get("GPTFAST_DEBUG", "0") not in ("", "0"):
            raise
        print(f"gptfast {args.command}: error: {one_line(error)}", file=sys.stderr)
        if isinstance(error, KeyboardInterrupt):
            return 130
        return 2 if isinstance(error, (ValueError, OSError)) else 1


def one_line(error):
    """The error's message on one line; for an error no check anticipated, its type and where to see more."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError)):
        return message
    return f"{type(error).__name__}: {message} (rerun with --traceback to see where)"


if __name__ == "__main__":
    sys.exit(main())
