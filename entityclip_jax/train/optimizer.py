"""The optax optimizer a config describes (config.optimizer, see config.py).

Release preset: Adam(0.9, 0.999), no weight decay, lr cosine-decayed to 0 over
all steps, no warmup. Options: AdamW, linear warmup, gradient clipping by
global norm, per-group learning-rate multipliers and frozen parameters by
regex on the "/"-joined parameter path (optax.multi_transform).
"""
import re

import jax
import optax

from entityclip_jax.errors import EntityClipError
from entityclip_jax.parallel.sharding import path_name

FROZEN = "frozen"


def learning_rate_schedule(opt, total_steps):
    """step -> learning rate: optional linear warmup, then cosine to 0 (or constant)."""
    warmup = int(opt.warmup_steps)
    if not 0 <= warmup < max(total_steps, 1):
        raise EntityClipError(f"optimizer.warmup_steps {warmup} must be in [0, total steps {total_steps})")
    lr = float(opt.learning_rate)
    if opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
    else:
        main = optax.constant_schedule(lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def param_labels(params, opt):
    """Per-parameter group label: "frozen", "group<i>" (i-th lr_multipliers rule) or "default"."""
    def label(path, _):
        name = path_name(path)
        if any(re.search(pattern, name) for pattern in opt.freeze):
            return FROZEN
        for i, (pattern, _multiplier) in enumerate(opt.lr_multipliers):
            if re.search(pattern, name):
                return f"group{i}"
        return "default"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt, total_steps, params):
    """optax.GradientTransformation for config.optimizer (checked by config.validate_config);
    `params` (abstract is fine) names the groups."""
    schedule = learning_rate_schedule(opt, total_steps)

    def adam(multiplier):
        lr = schedule if multiplier == 1.0 else (lambda step: multiplier * schedule(step))
        if opt.name == "adamw":
            return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
        return optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)

    labels = param_labels(params, opt)
    groups = {"default": adam(1.0), FROZEN: optax.set_to_zero()}
    groups.update({f"group{i}": adam(float(m)) for i, (_, m) in enumerate(opt.lr_multipliers)})
    frozen = jax.tree.map(lambda label: label == FROZEN, labels)
    chain = [optax.masked(optax.set_to_zero(), frozen)]  # frozen grads out of the clipping norm
    if opt.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    chain.append(optax.multi_transform(groups, labels))
    return optax.chain(*chain)
