"""The ``gptfast`` command (also ``python -m gptfast``): one subcommand per job, each with its own --help."""
import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "train": ("gptfast.train", "train a GPT on gptfast's kernels (single device, or data-parallel under torchrun)"),
    "generate": ("gptfast.generate", "continue a prompt with a GPT-2 checkpoint, streaming the text"),
    "plot": ("gptfast.plot", "draw a training run's loss curves (RUN/log.jsonl) to a PNG"),
    "inspect": ("gptfast.inspect", "compile every kernel config for sm_80/sm_90 without a GPU and report "
                                   "registers, spills, shared memory and tensor-core use"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="gptfast", description="Fused Triton kernels for GPT models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args.module).main(args) or 0
    except (OSError, ValueError) as error:  # bad input or unreadable files: say what is wrong, without a traceback
        print(f"gptfast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
