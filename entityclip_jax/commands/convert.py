"""CLI: `entityclip import-hf`, `export-hf`, `import-openai`."""
import os
import tempfile
import time

import jax
import numpy as np

from entityclip_jax import storage
from entityclip_jax.checkpoints.towers import load_towers_and_heads, save_towers
from entityclip_jax.weights.heads_file import save_heads
from entityclip_jax.weights.hf import check_export_destination, load_hf_checkpoint, save_hf_checkpoint, upload_export
from entityclip_jax.weights.openai import openai_to_flax, read_openai_checkpoint
from entityclip_jax.weights.verify import compare_with_transformers
from entityclip_jax.hub import resolve_checkpoint
from entityclip_jax.checkpoints.run_tokenizer import copy_run_tokenizer


def _progress(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def configure_import_hf(parser):
    parser.add_argument("source", help="Hugging Face CLIPModel directory (config.json + weights) or hub id "
                                       "(org/name[@revision], e.g. openai/clip-vit-base-patch32)")
    parser.add_argument("out", help="new towers directory (towers_config.json + Orbax params)")


def run_import_hf(args):
    _progress(f"reading {args.source}")
    config, params = load_hf_checkpoint(resolve_checkpoint(args.source))
    _progress(f"converted {_count(params):,} parameters; writing {args.out}")
    save_towers(params, config, args.out)
    _progress(f"done: {args.out}")


def configure_export_hf(parser):
    parser.add_argument("checkpoint", help="towers directory, training workdir, HF directory or OpenAI file")
    parser.add_argument("out", help="new Hugging Face CLIPModel directory")
    parser.add_argument("--tokenizer-from", help="directory whose tokenizer/preprocessor files to copy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip loading the export with transformers and comparing embeddings")


def run_export_hf(args):
    export(args.checkpoint, args.out, tokenizer_from=args.tokenizer_from, overwrite=args.overwrite,
           verify=not args.no_verify)


def export(checkpoint, out, tokenizer_from=None, overwrite=False, verify=True):
    """Any checkpoint -> a Hugging Face CLIPModel directory; a training run's experts
    go beside it. Returns the max |embedding difference| to transformers (None unverified)."""
    out = storage.absolute(out)
    check_export_destination(out, overwrite, (checkpoint, tokenizer_from))  # before a long read
    storage.check_writable(storage.parent(out), "choose a destination you can write to, or fix its permissions")
    if storage.is_remote(out):  # built and verified on the local disk, then uploaded, its marker last
        with tempfile.TemporaryDirectory() as local:
            local_export = os.path.join(local, "export")  # not a user path: our own TemporaryDirectory
            diff = export(checkpoint, local_export, tokenizer_from, verify=verify)
            _progress(f"uploading to {out}")
            upload_export(local_export, out)
        _progress(f"done: {out}")
        return diff
    _progress(f"reading {checkpoint}")
    source = resolve_checkpoint(checkpoint)  # a hub id is looked up once
    config, params, heads = load_towers_and_heads(source)  # a training run is read once, heads included
    _progress(f"writing {_count(params):,} parameters to {out}")

    def extra(directory):  # inside the export before it appears, so the marker lists them
        if heads is not None:
            save_heads(heads, directory)
        copy_run_tokenizer(source, directory)  # the tokenizer a training run's records were written with
    save_hf_checkpoint(params, config, out, source_dir=tokenizer_from, overwrite=overwrite,
                       protect=(checkpoint,), extra=extra)
    if heads is not None:
        _progress("saved the experts beside it for resuming")
    diff = None
    if verify:
        diff = compare_with_transformers(params, config, out)
        _progress(f"verified with transformers: max |embedding difference| = {diff:.2e}")
    _progress(f"done: {out}")
    return diff


def configure_import_openai(parser):
    parser.add_argument("source", help="OpenAI-layout state dict (.pt/.pth/.safetensors)")
    parser.add_argument("out", help="new towers directory")
    parser.add_argument("--ignore-extra", action="store_true",
                        help="drop keys outside the CLIP towers (e.g. EntityCLIP experts)")
    parser.add_argument("--trust-torchscript", action="store_true",
                        help="let torch.jit.load run a TorchScript archive whose tensors cannot be read "
                             "without running it (its code runs: only for files you trust)")


def run_import_openai(args):
    _progress(f"reading {args.source}")
    config, params = openai_to_flax(read_openai_checkpoint(args.source, args.trust_torchscript), source=args.source,
                                    allow_extra=args.ignore_extra)
    _progress(f"converted {_count(params):,} parameters; writing {args.out}")
    save_towers(params, config, args.out)
    _progress(f"done: {args.out}")


def _count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
