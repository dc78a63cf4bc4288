"""The jitted, sharded train step.

jax.jit with explicit in/out NamedShardings over the mesh: the batch split over
every mesh axis, parameters and optimizer state as the sharding rules say, the
state donated. The loss sees the GLOBAL batch (XLA inserts the collectives), so
contrastive logits and hard negatives span all B x B pairs.

The hard-negative rng is fold_in(key(seed), step): a resumed run draws the
same negatives as an uninterrupted one.

Gradient accumulation (accumulation_steps = k > 1) scans over k micro-batches
of B/k rows and averages their gradients. Each micro-batch's contrastive loss
only sees its own B/k rows (and negatives among them), so this is a different
objective from the full batch: a memory saver, not an equivalence.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from entityclip_jax.errors import EntityClipError
from entityclip_jax.objective.batch_loss import compute_loss
from entityclip_jax.parallel import sharding
from entityclip_jax.train.state import TrainState


def step_rng(seed, step):
    return jax.random.fold_in(jax.random.key(seed), step)


def _micro_batches(batch, k, mesh):
    """[B, ...] -> [k, B/k, ...]; micro-batch m takes rows m, m+k, ... so each
    one stays spread over every device."""
    def split(x):
        if x.shape[0] % k:
            raise EntityClipError(f"batch of {x.shape[0]} does not split into accumulation_steps={k} micro-batches")
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, *sharding.batch_spec(mesh, x.ndim - 1))
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(split, batch)


def loss_and_grads(model, params, batch, rng, accumulation_steps, mesh):
    """(metrics, grads) averaged over the micro-batches (one when accumulation_steps == 1)."""
    grad_fn = jax.value_and_grad(functools.partial(compute_loss, model), has_aux=True)
    if accumulation_steps == 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
        return metrics, grads

    def accumulate(carry, inputs):
        index, micro = inputs
        (_, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (metrics, grads)), None

    micro = _micro_batches(batch, accumulation_steps, mesh)
    zero_metrics = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
    zeros = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics),
             jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accumulation_steps), micro))
    return jax.tree.map(lambda x: x / accumulation_steps, total)


def train_step(state, batch, *, model, tx, seed, accumulation_steps, mesh, schedule):
    metrics, grads = loss_and_grads(model, state.params, batch, step_rng(seed, state.step),
                                    accumulation_steps, mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model, tx, schedule, mesh, state_shardings, batch_shardings, *, seed, accumulation_steps=1):
    """jitted (state, batch) -> (state, metrics); state donated, metrics replicated fp32 scalars."""
    step = functools.partial(train_step, model=model, tx=tx, seed=seed,
                             accumulation_steps=int(accumulation_steps), mesh=mesh, schedule=schedule)
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
