"""The training data stream on a resume: the batches already consumed are skipped as
serialized records, none of their images decoded, and the batches after the skip are
those of the uninterrupted stream (with and without random crops, one and two processes)."""
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from entityclip_jax.data import preprocess, records
from entityclip_jax.data.example import RawExample, SkipReport
from entityclip_jax.data.tokenizer import load_tokenizer
from entityclip_jax.train import input_stream
from tests._raw_layouts import write_tiny_clip_tokenizer
from tests._tiny_training import tiny_config

NUM_EXAMPLES, PER_SHARD, HOST_BATCH = 192, 32, 4


def noise_jpeg(seed):
    """A 16x16 JPEG of its own: no two examples share image bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(records dir, {sha1 of image bytes: id})."""
    tokenizer = load_tokenizer(write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok")))
    images = {f"id{i:03d}": noise_jpeg(i) for i in range(NUM_EXAMPLES)}
    examples = [RawExample(id=key, query=f"a photo {key}", image_bytes=image) for key, image in images.items()]
    out = tmp_path_factory.mktemp("records")
    records.write_split(examples, out, "train", tokenizer, SkipReport(), examples_per_shard=PER_SHARD,
                        workers=0, progress=False)
    return str(out), {hashlib.sha1(image).hexdigest(): key for key, image in images.items()}


@pytest.fixture
def decoded(monkeypatch):
    """The image (by sha1) of every example the pipeline decodes, in the order tf.data runs them."""
    import tensorflow as tf
    log, real = [], preprocess.clip_preprocess

    def note(image):
        log.append(hashlib.sha1(image.numpy()).hexdigest())
        return np.int64(len(log))

    def counting(image, *args, **kwargs):
        noted = tf.py_function(note, [image], tf.int64)
        with tf.control_dependencies([noted]):
            return tf.identity(real(image, *args, **kwargs))
    monkeypatch.setattr(preprocess, "clip_preprocess", counting)
    return log


def batches(config, start_step, count, process_index, process_count):
    steps = input_stream.steps_per_epoch(config, process_count)
    stream = input_stream.host_batches(config, 32, start_step, steps, process_index, process_count)
    return [next(stream) for _ in range(count)]


@pytest.mark.parametrize("random_crop", [False, True])
@pytest.mark.parametrize("process_count", [1, 2])
def test_a_resume_decodes_no_image_of_the_consumed_batches(data, decoded, random_crop, process_count):
    data_dir, image_ids = data
    config = tiny_config(**{"data.dir": data_dir, "batch_size": HOST_BATCH * process_count,
                            "data.random_crop": random_crop, "data.shuffle_buffer": 8})
    consumed, after = 12, 2  # resume at batch 12 of 192 / (4 * process_count)
    for process_index in range(process_count):
        decoded.clear()
        resumed = batches(config, consumed, after, process_index, process_count)
        seen = {image_ids[sha] for sha in list(decoded)}
        uninterrupted = batches(config, 0, consumed + after, process_index, process_count)

        skipped = {i.decode() for batch in uninterrupted[:consumed] for i in batch["id"]}
        assert len(skipped) == consumed * HOST_BATCH  # one pass: no example comes twice
        assert not seen & skipped, sorted(seen & skipped)
        assert {i.decode() for batch in resumed for i in batch["id"]} <= seen  # the counter counts
        for got, want in zip(resumed, uninterrupted[consumed:]):
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
