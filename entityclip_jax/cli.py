"""The `entityclip` command: one subcommand per pipeline stage.

Each subcommand lives in its own module, which defines
  configure(parser: argparse.ArgumentParser) -> None
  run(args: argparse.Namespace) -> int | None
Only the chosen command's module is imported, so `entityclip --help` imports
none of them; a module imports its stack at the top (jax, orbax), and only
TensorFlow, torch and LLM backends where they are used.
"""
import argparse
import importlib
import sys

from entityclip_jax.errors import EntityClipError

# name -> (module, one-line help). Add a stage by adding a row here.
COMMANDS = {
    "demo": ("entityclip_jax.demo", "the whole pipeline on an embedded dataset, on a CPU, in minutes"),
    "import-hf": ("entityclip_jax.commands.convert", "Hugging Face CLIPModel directory -> Flax towers directory"),
    "export-hf": ("entityclip_jax.commands.convert", "towers/checkpoint -> Hugging Face CLIPModel directory (verified)"),
    "import-openai": ("entityclip_jax.commands.convert", "OpenAI-layout state dict -> Flax towers directory"),
    "explain": ("entityclip_jax.commands.explain", "entity queries -> LLM explanation cache (JSONL, resumable)"),
    "explain-import": ("entityclip_jax.commands.explain", "EntityCLIP release CapDsc_*.json -> explanation cache"),
    "tokenizer": ("entityclip_jax.commands.records", "OpenAI bpe_simple_vocab_16e6.txt.gz -> Hugging Face tokenizer files"),
    "check-source": ("entityclip_jax.commands.records", "read a raw dataset split; print counts and skipped records"),
    "write-records": ("entityclip_jax.commands.records", "raw dataset split (+ explanations) -> TFRecord shards"),
    "eval": ("entityclip_jax.commands.evaluation", "Recall@K both ways with the plain CLIP towers (JSON, Markdown, PNG; --report: HTML)"),
    "compare": ("entityclip_jax.commands.evaluation", "two `eval --report` results of one split, query by query (HTML)"),
    "classify": ("entityclip_jax.commands.evaluation", "zero-shot news classification from image + headline (JSON, PNG)"),
    "search-index": ("entityclip_jax.commands.search", "embed a folder of images or a TFRecord split into a search index"),
    "search": ("entityclip_jax.commands.search", "text query -> top-k images from a search index (+ contact sheet)"),
    "serve": ("entityclip_jax.commands.search", "a local web page to search an index: type a query, see the images"),
    "train": ("entityclip_jax.commands.train", "train or resume EntityCLIP (or plain CLIP) from a config; Orbax checkpoints in --workdir"),
    "plan": ("entityclip_jax.commands.plan", "before renting: compile a config's train step for a TPU slice or GPUs; fit, FLOPs, speed ceiling"),
}


def _function(module, prefix, name):
    return getattr(module, f"{prefix}_{name.replace('-', '_')}", None) or getattr(module, prefix)


def build_parser(command=None):
    """The parser; only the chosen command's module is imported and configured."""
    parser = argparse.ArgumentParser(prog="entityclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _function(importlib.import_module(module_name), "configure", name)(sub_parser)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    # Unknown --config.a.b=v overrides pass through to config-driven commands.
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra
    module = importlib.import_module(COMMANDS[args.command][0])
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _function(module, "run", args.command)(args) or 0
    except EntityClipError as err:
        print(f"entityclip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
