"""EntityCLIP on GoodNews, the release recipe (lr 5e-6). ViT-B/16: --config configs/goodnews.py:b16"""
from entityclip_jax.config import release_config


def get_config(arg=None):
    return release_config(data_dir="data/records/goodnews", learning_rate=5e-6, arch=arg)
