"""Records, model and run agree on the tokenizer, checked before any step or metric.

A run records what it trained on in WORKDIR/run_tokenizer.json (its exports carry
a copy): the records' tokenizer fingerprint and context length, the model's
vocabulary size and EOT id. Resume and eval compare a dataset's
entityclip_meta.json with it (fingerprints compared as opaque strings), and every
dataset is checked against the model: its context no longer than the model's
positions, and its first records' token ids inside the vocabulary and ending in
the model's EOT id (a few hundred records, not a scan of the data).
"""
import json

import jax
import numpy as np

from entityclip_jax import storage
from entityclip_jax.checkpoints.towers import run_directory
from entityclip_jax.config import random_preset
from entityclip_jax.data import pipeline, records
from entityclip_jax.errors import EntityClipError

RUN_TOKENIZER = "run_tokenizer.json"
PROBE_EXAMPLES = 256


def check_records_fit_model(data_dir, splits, text_config):
    """Refuses records whose context, token ids or EOT id do not fit the text tower."""
    meta = records.read_meta(data_dir)
    if meta["context_length"] > text_config.max_position_embeddings:
        raise EntityClipError(
            f"{data_dir} holds texts of {meta['context_length']} tokens, the model has "
            f"{text_config.max_position_embeddings} positions; rewrite the records with "
            f"--context-length {text_config.max_position_embeddings} or use a model with more positions")
    eot = text_config.end_of_text_id
    for split in splits:
        ids = pipeline.first_token_ids(data_dir, split, PROBE_EXAMPLES)
        if not ids.size:
            continue
        if ids.max() >= text_config.vocab_size:
            raise EntityClipError(
                f"the {split!r} split of {data_dir} holds token id {int(ids.max())}, outside the model's "
                f"vocabulary of {text_config.vocab_size}: it was written with another tokenizer. Rewrite the "
                "records with the model's tokenizer (write-records --tokenizer) or use the model they were made for")
        ends = {int(row[np.flatnonzero(row)[-1]]) for row in ids if row.any()}  # EOT, or EOT padding
        if ends - {eot}:
            raise EntityClipError(
                f"the {split!r} split of {data_dir} ends its texts with token id {sorted(ends - {eot})[0]}, the "
                f"model's end-of-text id is {eot}: it was written with another tokenizer. Rewrite the records "
                "with the model's tokenizer (write-records --tokenizer) or use the model they were made for")


def run_tokenizer(data_dir, text_config):
    """What a run trains on: the records' tokenizer and the model's view of it."""
    meta = records.read_meta(data_dir)
    return {"tokenizer_fingerprint": meta["tokenizer_fingerprint"], "context_length": meta["context_length"],
            "vocab_size": text_config.vocab_size, "eos_token_id": text_config.eos_token_id}


def _recorded(directory):
    path = storage.path(directory) / RUN_TOKENIZER
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise EntityClipError(f"{path} is damaged ({err}); it records the tokenizer the run trained on: restore "
                              "it from a copy of the run (or an export of it), or delete it to skip that check") from None


def check_same_tokenizer(recorded, data_dir, where):
    """Refuses records written with another tokenizer (or context) than `recorded` (a run's)."""
    meta = records.read_meta(data_dir)
    for key in ("tokenizer_fingerprint", "context_length"):
        if str(recorded.get(key)) != str(meta.get(key)):
            raise EntityClipError(
                f"{data_dir} was written with {key} {meta.get(key)!r}, the model in {where} was trained on "
                f"{recorded.get(key)!r}; use records written with the tokenizer it was trained with "
                "(write-records --tokenizer)")


def check_training_data(workdir, config, text_config):
    """Before anything is written: the records fit the model and, on resume, are those the run trained on;
    a new run from random towers also starts its texts with the towers' BOS id (which an export names)."""
    splits = [config.data.train_split] + ([config.data.val_split] if config.eval.every_steps != 0 else [])
    check_records_fit_model(config.data.dir, splits, text_config)
    recorded = _recorded(workdir)
    if recorded is not None:
        check_same_tokenizer(recorded, config.data.dir, workdir)
    elif random_preset(config.model.init) is not None:
        _check_bos(config.data.dir, config.data.train_split, text_config)


def _check_bos(data_dir, split, text_config):
    ids = pipeline.first_token_ids(data_dir, split, PROBE_EXAMPLES)
    starts = {int(row[0]) for row in ids if row.any()}
    if starts and starts != {text_config.bos_token_id}:
        found = sorted(starts)[0]
        raise EntityClipError(
            f"the {split!r} split of {data_dir} starts its texts with token id {found}, the random towers' BOS id "
            f"is {text_config.bos_token_id}: set --config.model.bos_token_id={found} (the tokenizer's "
            "<|startoftext|>) so that an export names it")


def record_run_tokenizer(workdir, config, text_config):
    """WORKDIR/run_tokenizer.json for a run without one (new, or from before this record), by process 0."""
    if jax.process_index() == 0 and _recorded(workdir) is None:
        storage.write_json_atomic(storage.join(workdir, RUN_TOKENIZER), run_tokenizer(config.data.dir, text_config))


def check_eval_data(checkpoint, data_dir, split, clip_config):
    """Before encoding: the split fits the towers and, when the checkpoint records the tokenizer
    it was trained on (a workdir, a step, an export), was written with that one."""
    check_records_fit_model(data_dir, [split], clip_config.text)
    directory = run_directory(checkpoint)
    recorded = _recorded(directory) if directory is not None else None
    if recorded is not None:
        check_same_tokenizer(recorded, data_dir, checkpoint)


def copy_run_tokenizer(checkpoint, out_dir):
    """Puts a training run's run_tokenizer.json into its export; returns the copy or None."""
    directory = run_directory(checkpoint)
    if directory is None or not storage.path(directory).joinpath(RUN_TOKENIZER).is_file():
        return None
    return storage.copy(storage.join(directory, RUN_TOKENIZER), storage.join(out_dir, RUN_TOKENIZER))
