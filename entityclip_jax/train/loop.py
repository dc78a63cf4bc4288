"""The training loop: config + workdir in, checkpoints and metrics out.

Read top to bottom: set up devices and mesh, build or restore the state, then
step through the data; validate and checkpoint on schedule. Process 0 writes
the logs (stdout, TensorBoard, WORKDIR/metrics.jsonl with one line per step);
every process takes part in the steps and the (collective) checkpoint saves.

Each progress line also reports the throughput since the last one: examples/s
and, from the compiled step's own FLOP count, TFLOP/s per chip and the MFU
against the chip's peak (train/chips.py; left out where the peak is unknown,
e.g. on CPU). config.profile traces a window of steps (train/profiling.py).

The host never waits for the devices between steps: the next batches are
already on the devices (data.prefetch_to_device) and each step's metrics stay
there until a log, validation or checkpoint step fetches all of them at once.
metrics.jsonl still gets every step's own values; stdout and TensorBoard show
the log step's.

Stops with a clear message when a loss turns NaN/Inf (caught at most
log.every_steps late, and always before a save, so the last good checkpoint
stays the latest), and saves before exiting on SIGTERM (TPU preemption) or
Ctrl-C (with several processes all stop at the same step: train/distributed.py).
One run owns a workdir at a time (train/lease.py).
"""
import logging
import os
import time

import jax
import numpy as np

from entityclip_jax import storage
from entityclip_jax.checkpoints import run as run_format
from entityclip_jax.checkpoints import run_config, run_tokenizer
from entityclip_jax.checkpoints.model_init import describe_init, init_entityclip, tower_architecture
from entityclip_jax.config import check_devices, model_from_config, validate_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.entityclip import abstract_params
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.train import chips, compilation_cache, distributed, input_stream, lease, optimizer, profiling, setup
from entityclip_jax.train.state import create_train_state
from entityclip_jax.train.validation import Validator

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"  # on gs://, the folder WORKDIR/metrics/ of pieces: see storage.JsonLines


def read_metrics(workdir):
    """Every line of the run's metrics log, in order: [{"step": int, name: float, ...}] (the one reader)."""
    return storage.JsonLines(storage.join(workdir, METRICS_FILE)).read()


def fetch_metrics(pending):
    """(rows, bad): [(step, {name: float})] of the steps run since the last fetch, up to the
    first one with a NaN/Inf value, which is `bad` (else None). The only place the loop
    waits for the devices: at log, validation and checkpoint steps, never in between."""
    rows = []
    for (step, _), metrics in zip(pending, jax.device_get([metrics for _, metrics in pending])):
        metrics = {k: float(v) for k, v in metrics.items()}
        if not all(np.isfinite(v) for v in metrics.values()):
            return rows, (step, metrics)
        rows.append((step, metrics))
    return rows, None


class _MetricsLog:
    """stdout progress, TensorBoard (clu) and metrics.jsonl, all by process 0."""

    def __init__(self, workdir, total_steps, global_batch, resumed_step):
        from clu import metric_writers  # lazy: imports TensorFlow (~10 s), needed only once training starts
        self.primary = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.primary)
        self.total_steps, self.global_batch = total_steps, global_batch
        self.path = storage.join(workdir, METRICS_FILE)
        self.lines = storage.JsonLines(self.path)  # gs:// cannot append: a new object per flush, see storage
        if self.primary:  # a resumed run rewrites the steps after its checkpoint: drop the killed run's lines
            self.lines.truncate_after(resumed_step)
        self.mark = (time.time(), resumed_step)
        self.flops_per_step = None  # per device, from the compiled step (set once it is compiled)
        self.chip = chips.chip(jax.devices()[0].device_kind)

    def record(self, rows):
        """[(step, metrics)], one line each."""
        if self.primary:
            for step, metrics in rows:
                self.lines.append({"step": int(step), **{k: float(v) for k, v in metrics.items()}})

    def write(self, step, metrics, progress=False):
        """To TensorBoard; with progress=True process 0 also prints the progress line."""
        self.writer.write_scalars(int(step), metrics)
        if not (self.primary and progress):
            return
        eta = (self.total_steps - step) * metrics["perf/seconds_per_step"]
        terms = " ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "vtc", "itm", "vtc_experts") if k in metrics)
        speed = f"{metrics['perf/examples_per_s']:.1f} examples/s"
        if "perf/tflops_per_chip" in metrics:
            speed += f", {metrics['perf/tflops_per_chip']:.3g} TFLOP/s per chip"
        if "perf/mfu" in metrics:
            speed += f", MFU {100 * metrics['perf/mfu']:.1f}% of {self.chip.name}"
        print(f"step {step}/{self.total_steps} {terms} | {speed} | "
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

    def throughput(self, step):
        """perf/* over the steps since the last call (the last progress line): examples/s, seconds
        per step and, from the compiled step's own FLOPs (XLA's count, rematerialised recompute
        included), TFLOP/s per chip and MFU against the chip's peak (chips.py; none without one)."""
        now, (then, then_step) = time.time(), self.mark
        self.mark = (now, step)
        seconds, steps = max(now - then, 1e-9), max(step - then_step, 1)
        perf = {"perf/examples_per_s": steps * self.global_batch / seconds, "perf/seconds_per_step": seconds / steps}
        if self.flops_per_step is not None:
            perf["perf/tflops_per_chip"] = self.flops_per_step * steps / seconds / 1e12
            if self.chip is not None:
                perf["perf/mfu"] = self.flops_per_step * steps / seconds / self.chip.peak_bf16_flops
        return perf

    def close(self):
        self.writer.flush()
        self.writer.close()
        if self.primary:
            self.lines.close()


def _names_a_run_writes():
    return {run_format.CHECKPOINTS, run_format.DAMAGED, run_format.TOWERS_CONFIG, run_config.TRAIN_CONFIG,
            run_config.HISTORY, run_tokenizer.RUN_TOKENIZER, lease.LEASE_FILE, METRICS_FILE,
            storage.JsonLines(METRICS_FILE).pieces.name, compilation_cache.WORKDIR_CACHE, profiling.PROFILE_DIR}


def _check_workdir_is_a_run(workdir):
    """A new run starts only in a workdir that is missing, empty or holds nothing but what a run
    writes (a run that stopped before its first checkpoint). Its files would otherwise land among
    someone else's (records, a Hugging Face export, a towers directory) and replace theirs
    (run_tokenizer.json, towers_config.json), and those would be read as the run's."""
    where = storage.path(workdir)
    if not where.is_dir() or (where / run_config.TRAIN_CONFIG).exists():
        return  # missing (a file is refused when the lease is taken), or a run of ours: resume
    ours = _names_a_run_writes()
    foreign = [name for name in storage.listdir(workdir) if not name.startswith(".")
               and name not in ours and not name.startswith("events.out.tfevents.")]
    if foreign:
        raise EntityClipError(f"--workdir {workdir} holds files no training run writes ({', '.join(foreign[:4])}"
                              f"{', ...' if len(foreign) > 4 else ''}) and no {run_config.TRAIN_CONFIG}: it is not "
                              "a run to resume; give a new or empty --workdir (records, exports and towers "
                              "directories are read with --config.data.dir and --config.model.init)")


def _check_data_fits(config, workdir):
    """True once the records are known to fit the towers (and, on resume, to be the run's), before
    anything is written: the architecture comes from the workdir, else from model.init's config
    files; False for a .pt file, checked once its weights are read."""
    architecture = (run_format.read_towers_config(workdir) if run_format.towers_config_path(workdir)
                    else tower_architecture(config))
    if architecture is not None:
        run_tokenizer.check_training_data(workdir, config, architecture.text)
    return architecture is not None


def _start(config, workdir, mesh, checkpointer, steps_in_epoch, total_steps, data_checked,
           allow_config_change=False):
    """(TrainProgram, state, step): fresh from the config, or the latest checkpoint."""
    resume_step = checkpointer.latest_step()
    if resume_step is None:
        model, params = init_entityclip(jax.random.key(config.seed), config)
        if jax.process_index() == 0:
            print(describe_init(config.model.init), flush=True)  # random or pretrained towers, once they are read
        if not data_checked:  # a .pt file: its architecture is known now that its weights are read
            run_tokenizer.check_training_data(workdir, config, model.clip.text)
        run_format.write_run_files(workdir, model.clip, config)
        shapes = jax.eval_shape(lambda p: p, params)
    else:  # the architecture comes from the workdir; parameters from the checkpoint
        model, params = model_from_config(config, run_format.read_towers_config(workdir)), None
        shapes = abstract_params(model)
    run_tokenizer.record_run_tokenizer(workdir, config, model.clip.text)
    program = setup.train_program(config, model, shapes, mesh, total_steps)
    if resume_step is None:
        return program, create_train_state(params, program.tx, program.state_shardings), 0
    state, saved_position, resume_step = checkpointer.restore_latest_intact(program.sharded_state())
    input_stream.check_position(saved_position, steps_in_epoch, config)
    run_config.accept_resume_config(workdir, config, resume_step, allow_config_change)
    log.info("resumed from %s at step %d", checkpointer.directory, resume_step)
    return program, state, resume_step


def train(config, workdir, allow_config_change=False):
    """Trains (or resumes) the run in `workdir`; returns a summary dict of the last metrics.
    Resuming with a config that changes the run's meaning needs allow_config_change.
    Every check that can fail runs before anything is written. A second trainer on a live
    workdir is refused (train/lease.py); summary["stopped"] names a signal that stopped the run."""
    validate_config(config)
    distributed.initialize(config.distributed, os.environ)  # before JAX's backend starts (device count)
    check_devices(config, jax.device_count())
    workdir = storage.absolute(workdir)
    _check_workdir_is_a_run(workdir)
    steps_in_epoch = input_stream.steps_per_epoch(config, jax.process_count())
    total_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_in_epoch
    optimizer.learning_rate_schedule(config.optimizer, total_steps)  # refuses a warmup as long as the run, now
    data_checked = _check_data_fits(config, workdir)
    with lease.held(workdir) as workdir_lease:  # after the checks that only read, before anything is written
        return _train(config, workdir, workdir_lease, steps_in_epoch, total_steps, data_checked, allow_config_change)


def _train(config, workdir, workdir_lease, steps_in_epoch, total_steps, data_checked, allow_config_change):
    compilation_cache.use(config, workdir)  # before anything compiles, after every check
    mesh = make_mesh(config.mesh)
    checkpointer = run_format.Checkpointer(workdir, config.checkpoint)
    program, state, step = _start(config, workdir, mesh, checkpointer, steps_in_epoch, total_steps, data_checked,
                                  allow_config_change)
    model = program.model

    validate = Validator(model, config, mesh)
    eval_every = steps_in_epoch if config.eval.every_steps < 0 else config.eval.every_steps
    metrics_log = _MetricsLog(workdir, total_steps, config.batch_size, step)
    summary = {"step": step}
    if step == 0 and config.eval.at_start and eval_every:
        summary["zero_shot"] = val_metrics = validate(state.params)  # so a user sees what fine-tuning adds
        metrics_log.write(0, val_metrics)
        metrics_log.record([(0, val_metrics)])

    batches = input_stream.device_batches(
        input_stream.host_batches(config, model.clip.vision.image_size, step, steps_in_epoch,
                          jax.process_index(), jax.process_count()),
        mesh, config.data.prefetch_to_device)
    train_step = None
    pending = []  # (step, metrics still on the devices)
    preemption = distributed.Preemption()
    profile = profiling.ProfileWindow(config.profile, workdir)
    try:
        while step < total_steps:
            batch = next(batches)
            if train_step is None:  # compiled once, on the first batch's shapes
                train_step = program.compile(state, batch)
                metrics_log.flops_per_step = setup.flops_per_device(train_step)
            profile.before_step(step + 1)
            state, metrics = train_step(state, batch)
            step += 1
            profile.after_step(step, state)
            pending.append((step, metrics))
            log_now = step % config.log.every_steps == 0 or step == total_steps
            validate_now = bool(eval_every) and (step % eval_every == 0 or step == total_steps)
            preempted = preemption.should_stop(step)
            save_now = step % config.checkpoint.every_steps == 0 or step == total_steps or preempted
            if not (log_now or validate_now or save_now):
                continue  # the devices run on; the host prepares the next step
            # Every validation and save follows a finiteness check of all steps since the last one,
            # so a NaN state is never validated or saved.
            rows, bad = fetch_metrics(pending)
            pending = []
            if log_now and bad is None:  # the progress line's throughput, kept in its step's own line
                rows[-1] = (step, {**rows[-1][1], **metrics_log.throughput(step)})
            metrics_log.record(rows)
            if bad is not None:
                checkpointer.wait()
                raise EntityClipError(
                    f"training diverged at step {bad[0]}: {bad[1]}; stopped without saving this state. "
                    f"The last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. "
                    "Lower optimizer.learning_rate, set optimizer.grad_clip_norm, or use model.dtype=float32")
            summary.update(step=step, train=rows[-1][1])
            if log_now:
                metrics_log.write(step, rows[-1][1], progress=True)

            val_metrics = None
            if validate_now:
                summary["val"] = val_metrics = validate(state.params)
                metrics_log.write(step, val_metrics, progress=False)
                metrics_log.record([(step, val_metrics)])
                if metrics_log.primary:
                    print(f"step {step} validation: " + " ".join(f"{k[4:]} {v:.4f}" for k, v in val_metrics.items()),
                          flush=True)
            if save_now:
                workdir_lease.check()  # a run that lost its workdir to another writes nothing more
                metrics_log.lines.flush()  # on gs:// the lines up to a checkpoint are stored with it
                checkpointer.save(step, state, input_stream.position(step, steps_in_epoch, config), val_metrics)
            if preempted:
                checkpointer.wait()
                print(f"process {jax.process_index()}: {preemption.reason}: stopped at step {step} and saved it "
                      f"in {checkpointer.directory}; rerun the same command to resume", flush=True)
                summary.update(preempted=True, stopped=preemption.reason)
                break
        checkpointer.wait()
        summary["best_step"] = checkpointer.best_step()
    finally:
        profile.stop()
        preemption.restore()
        checkpointer.wait()
        checkpointer.close()
        metrics_log.close()
    return summary
