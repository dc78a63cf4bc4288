"""A resumed run keeps the config it was trained with, or says what changed.

    WORKDIR/train_config.json                 the config in force (kept current)
    WORKDIR/configs/train_config.<step>.json  the config used from <step> on (history)

On resume the whole config is compared with train_config.json. A difference
that changes what the run computes (learning rate, schedule, steps, batch, data,
model, heads, seed ...) is refused unless the user passes --allow-config-change;
one that changes only how it is run or reported (log, eval and checkpoint
frequency, mesh, sharding, remat ...) is accepted. Every accepted difference is
logged, and a changed config starts a new history entry.
"""
import json
import logging

import jax

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

TRAIN_CONFIG = "train_config.json"
HISTORY = "configs"
# Dotted-name prefixes of the knobs that leave the run's meaning as it was.
HARMLESS = ("log.", "eval.", "checkpoint.", "distributed.", "mesh", "sharding.", "model.remat", "profile.",
            "data.normalize_on_host", "data.val_split", "compilation_cache_dir")
log = logging.getLogger(__name__)


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(saved, current):
    """[(dotted name, saved value, current value)] of two configs as JSON dicts; absent is None."""
    saved, current = _flatten(saved), _flatten(current)
    return [(name, saved.get(name), current.get(name)) for name in sorted(set(saved) | set(current))
            if saved.get(name) != current.get(name)]


def is_harmless(name):
    return name.startswith(HARMLESS)


def history_path(workdir, step):
    return storage.join(workdir, HISTORY, f"train_config.{int(step)}.json")


def write_config(workdir, config, step):
    """train_config.json and its history entry for `step`, by process 0."""
    if jax.process_index() != 0:
        return
    text = config.to_json(indent=2)
    for path in (history_path(workdir, step), storage.join(workdir, TRAIN_CONFIG)):
        storage.write_text_atomic(path, text)


def _read_saved(workdir, path):
    """The config a run was trained with; one line naming what to do when it is missing or damaged."""
    history = storage.join(workdir, HISTORY)
    if not storage.path(path).is_file():
        raise EntityClipError(f"{path} is missing, but {workdir} holds checkpoints: copy the latest "
                              f"{history}/train_config.<step>.json there, or start a new --workdir")
    try:
        return dict(json.loads(storage.path(path).read_text()))
    except (ValueError, TypeError) as err:
        raise EntityClipError(f"{path} is damaged ({err}); copy the latest {history}/train_config.<step>.json over "
                              "it, or start a new --workdir") from None


def accept_resume_config(workdir, config, step, allow_change=False):
    """Compares `config` with the run's train_config.json when resuming at `step`.

    Refuses meaningful differences unless allow_change; logs each accepted one
    and records the new config (history + train_config.json)."""
    path = storage.join(workdir, TRAIN_CONFIG)
    saved = _read_saved(workdir, path)
    changes = differences(saved, json.loads(config.to_json()))
    meaningful = [change for change in changes if not is_harmless(change[0])]
    if meaningful and not allow_change:
        listed = "; ".join(f"{name} {old!r} -> {new!r}" for name, old, new in meaningful[:8])
        more = f" and {len(meaningful) - 8} more" if len(meaningful) > 8 else ""
        raise EntityClipError(
            f"the config differs from the one the run in {workdir} was trained with: {listed}{more}. "
            f"Resume with its config ({path}), start a new --workdir, or pass --allow-config-change "
            "to continue with the new values")
    for name, old, new in changes:
        why = "--allow-config-change" if (name, old, new) in meaningful else "it does not change the run's meaning"
        log.warning("resuming with a changed config: %s %r -> %r (accepted: %s)", name, old, new, why)
    if changes:
        if jax.process_index() == 0 and not storage.path(workdir).joinpath(HISTORY).is_dir():
            storage.write_json_atomic(history_path(workdir, 0), saved)  # a run from before the history: keep its first config
        write_config(workdir, config, step)
    if jax.process_index() == 0:
        print(f"resumed from step {step}", flush=True)
