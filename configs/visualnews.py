"""EntityCLIP on VisualNews, the release recipe (lr 1e-5). ViT-B/16: --config configs/visualnews.py:b16"""
from entityclip_jax.config import release_config


def get_config(arg=None):
    return release_config(data_dir="data/records/visualnews", learning_rate=1e-5, arch=arg)
