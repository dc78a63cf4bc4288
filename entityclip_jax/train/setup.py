"""What one training step is: built once, for `entityclip train` and for `entityclip plan`.

From the model, its parameters' shapes, the mesh and the config: the optimizer, the
abstract train state and where each piece of it lives (the sharding rules), and the
jitted, state-donating step with the batch split over the mesh. `train` compiles it
for the real arrays of its first batch; `plan` compiles the same thing for
ShapeDtypeStructs on a TPU or GPU it does not have. One function, so the plan answers
for the step the training run executes.
"""
import dataclasses
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from entityclip_jax.models.entityclip import EntityCLIPConfig
from entityclip_jax.parallel import sharding
from entityclip_jax.train import optimizer
from entityclip_jax.train.state import TrainState, abstract_state, state_specs
from entityclip_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    model: EntityCLIPConfig
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    mesh: Mesh
    abstract_state: TrainState   # jax.ShapeDtypeStruct leaves
    state_shardings: TrainState  # NamedSharding leaves
    seed: int
    accumulation_steps: int

    def sharded_state(self):
        """The abstract state with each leaf's sharding: what a restore or a compile is given."""
        return with_shardings(self.abstract_state, self.state_shardings)

    def step(self, batch):
        """The jitted (state, batch) -> (state, metrics) for batches shaped like `batch`."""
        return make_train_step(self.model, self.tx, self.schedule, self.mesh, self.state_shardings,
                               sharding.batch_shardings(self.mesh, batch), seed=self.seed,
                               accumulation_steps=self.accumulation_steps)

    def compile(self, state, batch, compiler_options=None):
        """The step compiled for these arguments: arrays, or ShapeDtypeStructs with shardings.
        The result is called like the jitted step; its cost_analysis() counts the step's FLOPs."""
        return self.step(batch).lower(state, batch).compile(compiler_options)


def train_program(config, model, param_shapes, mesh, total_steps):
    """The TrainProgram for `config`; param_shapes: the parameters (abstract is fine)."""
    tx = optimizer.make_optimizer(config.optimizer, total_steps, param_shapes)
    schedule = optimizer.learning_rate_schedule(config.optimizer, total_steps)
    abstract = abstract_state(param_shapes, tx)
    shardings = sharding.to_shardings(
        state_specs(abstract, mesh, config.sharding.rules, config.sharding.fsdp_min_size), mesh)
    return TrainProgram(model=model, tx=tx, schedule=schedule, mesh=mesh, abstract_state=abstract,
                        state_shardings=shardings, seed=int(config.seed),
                        accumulation_steps=int(config.accumulation_steps))


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves, each with its sharding from `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def batch_with_shardings(mesh, batch):
    """ShapeDtypeStructs of a batch, split over the mesh as the step expects it."""
    return with_shardings(batch, sharding.batch_shardings(mesh, batch))


def flops_per_device(compiled):
    """FLOPs of one call of a compiled program on one device (its cost analysis), or None
    where the compiler gives none (XLA:GPU without a GPU)."""
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):  # older jax: one dict per program
        costs = costs[0] if costs else None
    flops = (costs or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None
