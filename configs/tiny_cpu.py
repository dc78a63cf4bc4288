"""A tiny EntityCLIP that trains on a laptop CPU in minutes: the demo and the tests.

Tiny random towers (2 layers, width 64, 64 px images), 2/2/2 experts, a small
batch and a learning rate a from-scratch tiny model learns with. The text tower
follows the records' tokenizer: set model.vocab_size and model.eos_token_id to
it (the demo's synthetic data writes a small BPE).
"""
from entityclip_jax.config import default_config


def get_config(arg=None):
    c = default_config()
    c.seed = 0
    c.model.init = "random:tiny"  # trained from scratch: no pretrained tiny CLIP exists
    c.heads.num_image_experts = c.heads.num_explanation_experts = c.heads.num_text_experts = 2
    c.data.dir = "demo/records"
    c.data.shuffle_buffer = 256
    c.batch_size = 32
    c.num_epochs = 10
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 5
    c.optimizer.grad_clip_norm = 1.0
    c.sharding.fsdp_min_size = 1024
    c.checkpoint.every_steps = 20
    c.checkpoint.async_save = False
    c.eval.every_steps = 20
    c.eval.batch_size = 64
    c.log.every_steps = 5
    return c
