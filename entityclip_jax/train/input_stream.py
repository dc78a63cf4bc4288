"""The training data stream, resumable at any step.

The order of epoch e is a deterministic function of (seed, e): each epoch reads
its own tf.data pipeline (data/pipeline.py, train mode) seeded with
epoch_seed(seed, e) and takes steps_per_epoch batches of it. So the data
position is just the step: resuming at step s re-creates epoch s // steps_per_epoch
and skips the s % steps_per_epoch batches already consumed, as serialized records
(make_dataset's skip_batches): a resume late in an epoch decodes none of their images.

device_batches puts the next batches on the devices while a step runs
(data.prefetch_to_device of them, 0 for none).
"""
import collections

from entityclip_jax.data import pipeline
from entityclip_jax.errors import EntityClipError


def epoch_seed(seed, epoch):
    return (int(seed) * 1_000_003 + int(epoch)) % (2 ** 31 - 1)


def steps_per_epoch(config, process_count=1):
    """Full global batches in one pass over the training split."""
    if not config.data.dir:
        raise EntityClipError("config.data.dir is not set; point it at the records written by "
                              "`entityclip write-records`, e.g. --config.data.dir=data/records/n24news")
    num_examples = pipeline.split_size(config.data.dir, config.data.train_split)
    steps = num_examples // config.batch_size
    if steps == 0:
        raise EntityClipError(f"the {config.data.train_split!r} split of {config.data.dir} has {num_examples} "
                              f"examples, fewer than one batch of {config.batch_size}; lower batch_size")
    if config.batch_size % process_count:
        raise EntityClipError(f"batch_size {config.batch_size} does not split over {process_count} processes")
    return steps


def position(step, steps_in_epoch, config):
    """Where step `step` stands in the data stream (saved with each checkpoint)."""
    return dict(step=int(step), epoch=int(step) // steps_in_epoch, batch_in_epoch=int(step) % steps_in_epoch,
                examples_consumed=int(step) * config.batch_size, steps_per_epoch=steps_in_epoch,
                global_batch_size=config.batch_size, seed=config.seed)


def check_position(saved, steps_in_epoch, config):
    """A resumed run must cut the data the same way, or its order would differ."""
    expected = position(saved["step"], steps_in_epoch, config)
    for key in ("steps_per_epoch", "global_batch_size", "seed"):
        if saved.get(key) != expected[key]:
            raise EntityClipError(f"the checkpoint was trained with {key}={saved.get(key)}, this config gives "
                                  f"{expected[key]}; resume with the same data, batch_size and seed, or start "
                                  "a new --workdir")


def host_batches(config, image_size, start_step, steps_in_epoch, process_index, process_count):
    """Per-host numpy batches from start_step on, epoch after epoch, forever."""
    epoch, skip = divmod(start_step, steps_in_epoch)
    while True:
        ds = pipeline.make_dataset(
            config.data.dir, config.data.train_split, batch_size=config.batch_size // process_count,
            image_size=image_size, train=True, seed=epoch_seed(config.seed, epoch),
            process_index=process_index, process_count=process_count, random_crop=config.data.random_crop,
            shuffle_buffer=config.data.shuffle_buffer, normalize_on_host=config.data.normalize_on_host,
            dct_scaling=config.data.dct_scaling, skip_batches=skip)
        yield from pipeline.numpy_batches(ds.take(steps_in_epoch - skip),
                                          (config.data.dir, config.data.train_split))
        epoch, skip = epoch + 1, 0


def device_batches(host_batches, mesh, prefetch):
    """Global device arrays from per-host numpy batches, `prefetch` of them put on
    the devices ahead of the one being used: their copies overlap the running step."""
    queue = collections.deque()
    for batch in host_batches:
        queue.append(pipeline.to_global_arrays(batch, mesh, mesh.axis_names))
        if len(queue) > prefetch:
            yield queue.popleft()
    yield from queue
