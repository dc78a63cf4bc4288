"""The training loop: config + workdir in, checkpoints and metrics out.

Read top to bottom: set up devices and mesh, build or restore the state, then
step through the data; validate and checkpoint on schedule. Process 0 writes
the logs (stdout, TensorBoard, WORKDIR/metrics.jsonl with one line per step);
every process takes part in the steps and the (collective) checkpoint saves.

Stops on its own with a clear message when the loss turns NaN/Inf (the bad
state is never saved: the last good checkpoint stays the latest), and saves
before exiting on SIGTERM (TPU preemption).
"""
import logging
import os
import signal
import time

import jax
import numpy as np

from entityclip_jax import storage
from entityclip_jax.data.pipeline import to_global_arrays
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.entityclip import abstract_params, describe_init, init_entityclip, model_from_config
from entityclip_jax.train import checkpoint as ckpt
from entityclip_jax.train import data, optimizer, run_config, sharding, tokenizer_match
from entityclip_jax.train.state import abstract_state, create_train_state, state_specs
from entityclip_jax.train.step import make_train_step
from entityclip_jax.train.validation import Validator

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _multi_host_environment():
    """True when the environment describes several processes (TPU pod, SLURM, MPI, explicit)."""
    if any(os.environ.get(name) for name in MULTI_HOST_ENV):
        return True
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(mode):
    """jax.distributed.initialize when asked ("always") or when the environment says multi-host ("auto")."""
    if mode not in ("auto", "always", "never"):
        raise EntityClipError(f"distributed.initialize must be auto, always or never, got {mode!r}")
    if jax.distributed.is_initialized() or mode == "never" or (mode == "auto" and not _multi_host_environment()):
        return
    jax.distributed.initialize()


class _Preemption:
    """Remembers a SIGTERM; with several processes they agree on the step to stop at."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def should_stop(self, step):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


class _MetricsLog:
    """stdout progress, TensorBoard (clu) and metrics.jsonl, all by process 0."""

    def __init__(self, workdir, total_steps, global_batch, resumed_step):
        from clu import metric_writers
        self.primary = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.primary)
        self.total_steps, self.global_batch = total_steps, global_batch
        self.path = storage.join(workdir, METRICS_FILE)
        self.lines = storage.JsonLines(self.path)  # gs:// cannot append: rewritten whole, see storage
        if self.primary:
            self._truncate_after(resumed_step)
        self.mark = (time.time(), resumed_step)

    def _truncate_after(self, step):
        """A resumed run rewrites the steps after its checkpoint: drop the killed run's lines for them."""
        self.lines.keep(lambda record: record["step"] <= step)

    def record(self, step, metrics):
        if self.primary:
            self.lines.append({"step": int(step), **{k: float(v) for k, v in metrics.items()}})

    def write(self, step, metrics, progress=False):
        self.writer.write_scalars(int(step), metrics)
        if not (self.primary and progress):
            return
        now, (then, then_step) = time.time(), self.mark
        rate = (step - then_step) * self.global_batch / max(now - then, 1e-9)
        eta = (self.total_steps - step) * (now - then) / max(step - then_step, 1)
        terms = " ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "vtc", "itm", "vtc_experts") if k in metrics)
        print(f"step {step}/{self.total_steps} {terms} | {rate:.1f} examples/s | "
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
        self.mark = (now, step)

    def close(self):
        self.writer.flush()
        self.writer.close()
        if self.primary:
            self.lines.close()


def _start(config, workdir, mesh, checkpointer, steps_in_epoch, total_steps, allow_config_change=False):
    """(model, tx, schedule, state shardings, state, step): fresh from the config, or the latest checkpoint."""
    resume_step = checkpointer.latest_step()
    if resume_step is None:
        if jax.process_index() == 0:
            print(describe_init(config.model.init), flush=True)  # first line: random or pretrained towers
        model, params = init_entityclip(jax.random.key(config.seed), config)
        ckpt.write_run_files(workdir, model.clip, config)
        shapes = jax.eval_shape(lambda p: p, params)
    else:  # the architecture comes from the workdir; parameters from the checkpoint
        model, params = model_from_config(config, ckpt.read_clip_config(workdir)), None
        shapes = abstract_params(model)
    tokenizer_match.check_training_data(workdir, config, model.clip)
    tx = optimizer.make_optimizer(config.optimizer, total_steps, shapes)
    schedule = optimizer.learning_rate_schedule(config.optimizer, total_steps)
    abstract = abstract_state(shapes, tx)
    shardings = sharding.to_shardings(
        state_specs(abstract, mesh, config.sharding.rules, config.sharding.fsdp_min_size), mesh)
    if resume_step is None:
        return model, tx, schedule, shardings, create_train_state(params, tx, shardings), 0
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state, saved_position, resume_step = checkpointer.restore_latest_intact(target)
    data.check_position(saved_position, steps_in_epoch, config)
    run_config.accept_resume_config(workdir, config, resume_step, allow_config_change)
    log.info("resumed from %s at step %d", checkpointer.directory, resume_step)
    return model, tx, schedule, shardings, state, resume_step


def train(config, workdir, allow_config_change=False):
    """Trains (or resumes) the run in `workdir`; returns a summary dict of the last metrics.
    Resuming with a config that changes the run's meaning needs allow_config_change."""
    initialize_distributed(config.distributed.initialize)
    workdir = storage.absolute(workdir)
    mesh = sharding.make_mesh(config.mesh)
    steps_in_epoch = data.steps_per_epoch(config, jax.process_count())  # checks the data before anything is written
    total_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_in_epoch
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    model, tx, schedule, shardings, state, step = _start(config, workdir, mesh, checkpointer, steps_in_epoch,
                                                         total_steps, allow_config_change)

    validate = Validator(model, config, mesh)
    eval_every = steps_in_epoch if config.eval.every_steps < 0 else config.eval.every_steps
    metrics_log = _MetricsLog(workdir, total_steps, config.batch_size, step)
    summary = {"step": step}
    if step == 0 and config.eval.at_start and eval_every:
        summary["zero_shot"] = val_metrics = validate(state.params)  # so a user sees what fine-tuning adds
        metrics_log.write(0, val_metrics)
        metrics_log.record(0, val_metrics)

    batches = data.host_batches(config, model.clip.vision.image_size, step, steps_in_epoch,
                                jax.process_index(), jax.process_count())
    train_step = None
    preemption = _Preemption()
    try:
        while step < total_steps:
            batch = to_global_arrays(next(batches), mesh, mesh.axis_names)
            if train_step is None:  # compiled once, on the first batch's shapes
                batch_shardings = sharding.batch_shardings(mesh, batch)
                train_step = make_train_step(model, tx, schedule, mesh, shardings, batch_shardings,
                                             seed=config.seed, accumulation_steps=config.accumulation_steps)
            state, metrics = train_step(state, batch)
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not all(np.isfinite(v) for v in metrics.values()):
                checkpointer.wait()
                raise EntityClipError(
                    f"training diverged at step {step}: {metrics}; stopped without saving this state. "
                    f"The last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. "
                    "Lower optimizer.learning_rate, set optimizer.grad_clip_norm, or use model.dtype=float32")
            metrics_log.record(step, metrics)
            summary.update(step=step, train=metrics)
            if step % config.log.every_steps == 0 or step == total_steps:
                metrics_log.write(step, metrics, progress=True)

            val_metrics = None
            if eval_every and (step % eval_every == 0 or step == total_steps):
                summary["val"] = val_metrics = validate(state.params)
                metrics_log.write(step, val_metrics, progress=False)
                metrics_log.record(step, val_metrics)
                if metrics_log.primary:
                    print(f"step {step} validation: " + " ".join(f"{k[4:]} {v:.4f}" for k, v in val_metrics.items()),
                          flush=True)
            preempted = preemption.should_stop(step)
            if step % config.checkpoint.every_steps == 0 or step == total_steps or preempted:
                metrics_log.lines.flush()  # on gs:// the lines up to a checkpoint are stored with it
                checkpointer.save(step, state, data.position(step, steps_in_epoch, config), val_metrics)
            if preempted:
                log.warning("SIGTERM: saved step %d, exiting", step)
                summary["preempted"] = True
                break
        checkpointer.wait()
        summary["best_step"] = checkpointer.best_step()
    finally:
        preemption.restore()
        checkpointer.wait()
        checkpointer.close()
        metrics_log.close()
    return summary
