"""EntityCLIP on N24News, the release recipe (lr 1e-5). ViT-B/16: --config configs/n24news.py:b16"""
from entityclip_jax.config import release_config


def get_config(arg=None):
    return release_config(data_dir="data/records/n24news", learning_rate=1e-5, arch=arg)
