"""The tf.data reader: multi-process sharding, the padded deterministic eval mode, global
jax.Arrays on 8 fake devices, and damaged shards."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from entityclip_jax.data import pipeline, records
from entityclip_jax.data.example import RawExample, SkipReport
from entityclip_jax.data.tokenizer import load_tokenizer
from entityclip_jax.errors import EntityClipError
from tests._raw_layouts import write_tiny_clip_tokenizer

NUM_EXAMPLES, PER_SHARD = 11, 4  # shards of 4, 4, 3


def small_jpeg(seed):
    """A small real-looking image: a crop of skimage's astronaut, shifted per seed."""
    import os
    import skimage
    photo = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")).convert("RGB")
    out = io.BytesIO()
    photo.crop((seed * 7, seed * 5, seed * 7 + 60, seed * 5 + 40)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tokenizer = load_tokenizer(write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok")))
    examples = [RawExample(id=f"id{i:02d}", query=f"a photo of a cat {i}", image_bytes=small_jpeg(i),
                           label=f"label{i % 3}", headline=f"headline {i}") for i in range(NUM_EXAMPLES)]
    out = tmp_path_factory.mktemp("records")
    records.write_split(examples, out, "test", tokenizer, SkipReport(), examples_per_shard=PER_SHARD,
                        workers=0, progress=False)
    return out


def shard_ids(data_dir):
    """The ids in each shard file, in file order."""
    import tensorflow as tf
    meta = records.read_meta(data_dir)
    out = []
    for shard in meta["splits"]["test"]["shards"]:
        ds = tf.data.TFRecordDataset(str(data_dir / shard["file"]))
        out.append({tf.io.parse_single_example(s, {"id": tf.io.FixedLenFeature([], tf.string)})["id"]
                    .numpy().decode() for s in ds})
    return out


def eval_batches(data_dir, process_index, process_count, batch_size=3, **kw):
    ds = pipeline.make_dataset(data_dir, "test", batch_size=batch_size, image_size=32, train=False,
                               process_index=process_index, process_count=process_count, **kw)
    return list(pipeline.numpy_batches(ds, (data_dir, "test")))


@pytest.mark.parametrize("process_count", [2, 4])  # 4 > 3 files: examples are sharded instead of files
def test_eval_covers_every_example_once_with_padding_mask(data_dir, process_count):
    seen, batch_counts = [], set()
    for index in range(process_count):
        batches = eval_batches(data_dir, index, process_count)
        batch_counts.add(len(batches))
        for batch in batches:
            assert batch["pixel_values"].shape == (3, 32, 32, 3) and batch["pixel_values"].dtype == np.float32
            assert batch["query_ids"].shape == (3, 77) and batch["query_ids"].dtype == np.int32
            real, pad = batch["mask"], ~batch["mask"]
            assert all(i for i in batch["id"][real]) and not any(batch["id"][pad])
            assert not batch["pixel_values"][pad].any() and not batch["query_ids"][pad].any()
            seen += [i.decode() for i in batch["id"][real]]
            for i, label, headline, query in zip(batch["id"][real], batch["label"][real], batch["headline"][real],
                                                 batch["query"][real]):
                number = int(i.decode()[2:])
                assert (label.decode(), headline.decode(), query.decode()) == \
                    (f"label{number % 3}", f"headline {number}", f"a photo of a cat {number}")
    assert len(batch_counts) == 1  # every host runs the same number of steps
    assert sorted(seen) == [f"id{i:02d}" for i in range(NUM_EXAMPLES)]


def test_eval_is_deterministic_and_masks_only_the_tail(data_dir):
    first, second = eval_batches(data_dir, 0, 1), eval_batches(data_dir, 0, 1)
    masks = np.concatenate([b["mask"] for b in first])
    assert masks.tolist() == [True] * NUM_EXAMPLES + [False] * (len(masks) - NUM_EXAMPLES)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
        assert a["id"].tolist() == b["id"].tolist()


def test_eval_of_some_ids_reads_just_those_examples(data_dir):
    """ids=: the examples with those ids, in split order, as the full pass gives them (unknown ids match none)."""
    full = {i.decode(): pixels for batch in eval_batches(data_dir, 0, 1)
            for i, pixels, real in zip(batch["id"], batch["pixel_values"], batch["mask"]) if real}
    batches = eval_batches(data_dir, 0, 1, batch_size=2, ids=["id09", "id02", "id07", "nope"])
    assert [len(b["id"]) for b in batches] == [2, 1] and all(b["mask"].all() for b in batches)
    got = [i.decode() for b in batches for i in b["id"]]
    assert got == ["id02", "id07", "id09"]
    pixels = np.concatenate([b["pixel_values"] for b in batches])
    np.testing.assert_array_equal(pixels, np.stack([full[i] for i in got]))


def test_train_processes_read_disjoint_files(data_dir):
    files = shard_ids(data_dir)
    assert len(files) == 3
    seen = []
    for index in range(2):
        ds = pipeline.make_dataset(data_dir, "test", batch_size=4, image_size=32, train=True, seed=1,
                                   process_index=index, process_count=2)
        ids = {i.decode() for batch in ds.take(6).as_numpy_iterator() for i in batch["id"]}
        expected = set().union(*files[index::2])
        assert ids == expected  # 24 draws cover each process's own files and nothing else
        seen.append(ids)
    assert not seen[0] & seen[1]


def test_train_random_crop_and_uint8_mode(data_dir):
    ds = pipeline.make_dataset(data_dir, "test", batch_size=4, image_size=24, train=True, seed=3,
                               process_index=0, process_count=1, random_crop=True, crop_scale=(0.3, 0.6),
                               normalize_on_host=False)
    batch = next(ds.as_numpy_iterator())
    assert batch["pixel_values"].shape == (4, 24, 24, 3) and batch["pixel_values"].dtype == np.uint8
    assert batch["mask"].all() and batch["pixel_values"].std() > 0


def test_to_global_arrays_shards_the_batch_over_eight_devices(data_dir):
    import jax
    from jax.sharding import Mesh
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    batch = eval_batches(data_dir, 0, 1, batch_size=8)[0]
    arrays = pipeline.to_global_arrays(batch, mesh, "data")
    assert set(arrays) == {"pixel_values", "query_ids", "explanation_ids", "mask"}  # strings stay on host
    for name, array in arrays.items():
        np.testing.assert_array_equal(np.asarray(array), batch[name])
        assert array.sharding.spec[0] in ("data", ("data",))
        rows = {tuple(range(8))[s.index[0]] for s in array.addressable_shards}
        assert len(rows) == 4 and all(len(r) == 2 for r in rows)  # 4 data shards of 2 rows, replicated on "model"
    both = pipeline.to_global_arrays(batch, mesh, ("data", "model"))
    assert sorted(s.index[0].start for s in both["query_ids"].addressable_shards) == list(range(8))


@pytest.mark.parametrize("normalize_on_host", [True, False])
def test_batch_shapes_are_what_the_devices_get(data_dir, normalize_on_host):
    """What `entityclip plan` compiles for without reading data: every array of a real batch, no more."""
    import jax
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()), ("data",))
    ds = pipeline.make_dataset(data_dir, "test", batch_size=8, image_size=24, train=True, process_index=0,
                               process_count=1, normalize_on_host=normalize_on_host)
    arrays = pipeline.to_global_arrays(next(ds.as_numpy_iterator()), mesh, "data")
    context_length = records.read_meta(data_dir)["context_length"]
    expected = pipeline.batch_shapes(8, 24, context_length, normalize_on_host)
    assert {k: (a.shape, a.dtype) for k, a in arrays.items()} == {k: (s.shape, s.dtype) for k, s in expected.items()}


def test_truncated_shard_is_named_or_skipped(data_dir, tmp_path, caplog):
    import shutil
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    victim = damaged / records.read_meta(damaged)["splits"]["test"]["shards"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:-50])
    with pytest.raises(EntityClipError, match=f"{victim.name}.*entityclip write-records --split test"):
        eval_batches(damaged, 0, 1)
    with caplog.at_level(logging.WARNING):
        batches = eval_batches(damaged, 0, 1, skip_corrupt_shards=True)
    assert victim.name in caplog.text
    ids = sorted(i.decode() for b in batches for i, m in zip(b["id"], b["mask"]) if m)
    assert ids == sorted(set().union(*[s for k, s in enumerate(shard_ids(data_dir)) if k != 1]))


def test_corrupt_record_inside_a_shard_is_a_clear_error(data_dir, tmp_path):
    import shutil
    damaged = tmp_path / "flipped"
    shutil.copytree(data_dir, damaged)
    victim = damaged / records.read_meta(damaged)["splits"]["test"]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, bad CRC
    victim.write_bytes(bytes(data))
    with pytest.raises(EntityClipError, match=f"shard {victim} is corrupt.*entityclip write-records --split test"):
        eval_batches(damaged, 0, 1)
    ds = pipeline.make_dataset(damaged, "test", batch_size=3, image_size=32, train=False,
                               process_index=0, process_count=1)
    with pytest.raises(EntityClipError, match=f"shard {victim} is corrupt"):  # also after skip/take
        list(pipeline.numpy_batches(ds.skip(0).take(100), (damaged, "test")))
    with pytest.raises(EntityClipError, match="a shard of this dataset is corrupt"):  # no source: no name
        list(pipeline.numpy_batches(ds))
    problems = pipeline.verify_shards(damaged, "test")
    assert [file for file, _ in problems] == [str(victim)]
    assert pipeline.verify_shards(data_dir, "test") == []


def test_unknown_split_and_unfinished_directory_are_refused(data_dir, tmp_path):
    with pytest.raises(EntityClipError, match="no split 'train'"):
        pipeline.make_dataset(data_dir, "train", batch_size=2, train=False, process_index=0, process_count=1)
    with pytest.raises(EntityClipError, match="entityclip_meta.json"):
        pipeline.make_dataset(tmp_path, "test", batch_size=2, train=False, process_index=0, process_count=1)
    assert pipeline.split_size(data_dir, "test") == NUM_EXAMPLES
