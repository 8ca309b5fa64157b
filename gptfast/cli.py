"""The ``gptfast`` command (also ``python -m gptfast``): one subcommand per job, each with its own --help."""
import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
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
    return importlib.import_module(args.module).main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
