"""`entityclip train --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]`"""
ACCEPTS_OVERRIDES = True  # --config.a.b=value pass through as args.overrides


def configure(parser):
    parser.add_argument("--config", required=True,
                        help="config file with get_config(), e.g. configs/n24news.py or configs/n24news.py:b16")
    parser.add_argument("--workdir", required=True,
                        help="run directory: checkpoints, metrics, TensorBoard; an existing one is resumed")


def run(args):
    import json
    import logging

    from entityclip_jax.config import load_config, validate_config
    from entityclip_jax.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = train(validate_config(load_config(args.config, args.overrides)), args.workdir)
    print(json.dumps({"done": summary}, default=float))
    return 0
