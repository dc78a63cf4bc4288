"""The `entityclip` command: one subcommand per pipeline stage.

Each subcommand lives in its own module, which defines
  configure(parser: argparse.ArgumentParser) -> None   (cheap: no heavy imports)
  run(args: argparse.Namespace) -> int | None
Modules import jax/tensorflow/torch inside run(), so `entityclip --help` is fast.
"""
import argparse
import importlib
import sys

from entityclip_jax.errors import EntityClipError

# name -> (module, one-line help). Add a stage by adding a row here.
COMMANDS = {
    "import-hf": ("entityclip_jax.convert.commands", "Hugging Face CLIPModel directory -> Flax params (msgpack)"),
    "export-hf": ("entityclip_jax.convert.commands", "Flax params -> Hugging Face CLIPModel directory"),
    "import-openai": ("entityclip_jax.convert.commands", "OpenAI/EntityCLIP-release state dict -> Flax params"),
}


def _command_module(name):
    return importlib.import_module(COMMANDS[name][0])


def build_parser():
    parser = argparse.ArgumentParser(prog="entityclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = _command_module(name)
        configure = getattr(module, f"configure_{name.replace('-', '_')}", None) or module.configure
        configure(sub_parser)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Unknown --config.a.b=v overrides are passed through to config-driven commands.
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra
    module = _command_module(args.command)
    run = getattr(module, f"run_{args.command.replace('-', '_')}", None) or module.run
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run(args) or 0
    except EntityClipError as err:
        print(f"entityclip {args.command}: error: {err}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
