"""`entityclip train --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]`"""
import json
import logging
import os
import sys

from entityclip_jax.config import load_config
from entityclip_jax.errors import EXIT_ABORTED, EXIT_DONE, EXIT_STOPPED_EARLY
from entityclip_jax.train.loop import train

ACCEPTS_OVERRIDES = True  # --config.a.b=value pass through as args.overrides


def configure(parser):
    parser.add_argument("--config", required=True,
                        help="config file with get_config(), e.g. configs/n24news.py or configs/n24news.py:b16")
    parser.add_argument("--workdir", required=True,
                        help="run directory: checkpoints, metrics, TensorBoard; an existing one is resumed")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the config changes the run's meaning (learning rate, steps, "
                             "data, model ...); every change is logged and kept in WORKDIR/configs/")


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    try:
        summary = train(config, args.workdir, allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves and stops), or one before the first step
        print("entityclip train: aborted (Ctrl-C) without saving the current step; rerun the same command to "
              "resume from the last checkpoint", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # At once: Orbax's background threads, cut off mid-save, would report it at interpreter exit.
        os._exit(EXIT_ABORTED)
    print(json.dumps({"done": summary}, default=float))
    return EXIT_STOPPED_EARLY if summary.get("preempted") else EXIT_DONE  # 75: saved, rerun to resume
