"""Reader throughput: images/s (and per CPU core) for read + parse + decode + preprocess.

Records are written from the real photos shipped in installed wheels (scikit-image,
matplotlib, scikit-learn), re-encoded at a typical news-photo size (640x480 JPEG,
quality 90) and replicated to --records examples. Then:
  1. the whole pipeline (make_dataset) in several configurations, eval mode
     (one pass, no shuffle) unless noted, counting images after a warm-up batch;
  2. where the time goes: CPU milliseconds per image for cumulative stages
     (read+parse, decode, resize, crop, normalise) on the first 1000 records.
images/s/core is images per CPU-second of this process, which stays meaningful
when other jobs share the machine; "cores used" is CPU seconds per wall second.
The configurations alternate over --rounds rounds (the order reversed every
other round); each figure is the median over rounds with its min-max spread,
and its ratio to the exact mode is the median of per-round ratios. Prints one
JSON line per figure.

    python benchmarks/bench_pipeline.py [--records 3000] [--batch 64] [--image-size 224] [--rounds 3]
"""
import argparse
import io
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounds import alternate, emit, ratio, spread  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def wheel_photos():
    import matplotlib.cbook
    import skimage
    import sklearn
    sk = os.path.join(os.path.dirname(skimage.__file__), "data")
    sl = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    return ([os.path.join(sk, n) for n in ("astronaut.png", "rocket.jpg", "coffee.png", "chelsea.png")]
            + [matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)]
            + [os.path.join(sl, n) for n in ("china.jpg", "flower.jpg")])


def news_jpegs(size=(640, 480), quality=90):
    """Each photo center-cropped to 4:3 and resized to `size`, as JPEG bytes."""
    from PIL import Image, ImageOps
    out = []
    for path in wheel_photos():
        image = ImageOps.fit(Image.open(path).convert("RGB"), size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def write_records(out_dir, n):
    from entityclip_jax.data import records
    from entityclip_jax.data.example import RawExample, SkipReport
    from tests._raw_layouts import write_tiny_clip_tokenizer
    from entityclip_jax.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(write_tiny_clip_tokenizer(pathlib.Path(out_dir) / "tok"))
    photos = news_jpegs()
    examples = (RawExample(id=f"ex{i:06d}", query=f"Angela Merkel meets Barack Obama in Berlin {i}",
                           image_bytes=photos[i % len(photos)], explanation="Angela Merkel was chancellor.")
                for i in range(n))
    start = time.perf_counter()
    entry = records.write_split(examples, pathlib.Path(out_dir) / "records", "train", tokenizer, SkipReport(),
                                examples_per_shard=256, workers=None, progress=False)
    seconds = time.perf_counter() - start
    emit("writer_records_per_s", records=entry["num_examples"], mib=entry["num_bytes"] / 2**20,
         shards=len(entry["shards"]), seconds=seconds, records_per_s=entry["num_examples"] / seconds,
         workers=os.cpu_count())
    return pathlib.Path(out_dir) / "records"


def timed(batches):
    """(images, wall seconds, process CPU seconds) over an iterable of batches, after one warm-up batch."""
    iterator = iter(batches)
    next(iterator)  # graph building, thread pools
    wall, cpu, images = time.perf_counter(), time.process_time(), 0
    for batch in iterator:
        images += int(batch["mask"].numpy().sum()) if isinstance(batch, dict) else int(batch.shape[0])
    return images, time.perf_counter() - wall, time.process_time() - cpu


def measure(data_dir, batch, image_size, train=False, **options):
    """Whole pipeline: one pass (eval) or as many images (train)."""
    from entityclip_jax.data.pipeline import make_dataset, split_size
    ds = make_dataset(data_dir, "train", batch_size=batch, image_size=image_size, train=train, seed=0,
                      process_index=0, process_count=1, **options)
    if train:
        ds = ds.take(split_size(data_dir, "train") // batch)
    return timed(ds)


def breakdown(data_dir, batch, image_size):
    """CPU milliseconds per image for cumulative stages, in tf.data (parallel map, batch)."""
    import tensorflow as tf
    from entityclip_jax.data import pipeline, preprocess, records
    meta = records.read_meta(data_dir)
    files = [str(pathlib.Path(data_dir) / s["file"]) for s in meta["splits"]["train"]["shards"]]
    parse = pipeline._parse(meta["context_length"])

    def size(image):
        return tf.stack(preprocess.resized_short_side(tf.shape(image)[0], tf.shape(image)[1], image_size))

    def crop(image):
        return preprocess._to_uint8_range(image[:image_size, :image_size])

    stages = {
        "read + parse": lambda x: parse(x)["query_ids"][:1],
        "+ decode (accurate IDCT)": lambda x: preprocess.decode(parse(x)["image"])[:1, :1],
        "+ resize bicubic antialias": lambda x: (lambda im: tf.image.resize(
            im, size(im), "bicubic", antialias=True))(preprocess.decode(parse(x)["image"]))[:1, :1],
        "+ crop, round": lambda x: (lambda im: crop(tf.image.resize(
            im, size(im), "bicubic", antialias=True)))(preprocess.decode(parse(x)["image"]))[:1, :1],
        "+ normalize float32 (= clip_preprocess), batched": lambda x: preprocess.clip_preprocess(
            parse(x)["image"], image_size),
        "dct: + decode at 1/2 (DCT scaling)": lambda x: preprocess.decode(parse(x)["image"], image_size)[:1, :1],
        "dct: + resize, crop (no antialias, shrink < 2x)": lambda x: preprocess.center_crop_image(
            preprocess.decode(parse(x)["image"], image_size), image_size, fast=True)[:1, :1],
        "dct: + uint8 out, batched": lambda x: preprocess.clip_preprocess(
            parse(x)["image"], image_size, dct_scaling=True, normalize_on_host=False),
    }
    for name, fn in stages.items():
        ds = tf.data.TFRecordDataset(files).take(1000).map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
        images, _, cpu = timed(ds.prefetch(2))
        emit("pipeline_stage_cpu_ms_per_image", stage=name, image_size=image_size,
             cpu_ms_per_image=1000 * cpu / images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import tensorflow as tf
    cores = len(os.sched_getaffinity(0))
    print(f"# machine: {cores} CPU cores available, TensorFlow {tf.__version__}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_records(tmp, args.records)
        configs = {
            "exact (CLIPImageProcessor match), float32 normalised on host": {},
            "exact, uint8 out (normalise on device)": {"normalize_on_host": False},
            "dct_scaling (fast), float32": {"dct_scaling": True},
            "dct_scaling (fast), uint8": {"dct_scaling": True, "normalize_on_host": False},
            "train: shuffle, dct_scaling, uint8": {"train": True, "dct_scaling": True, "normalize_on_host": False},
            "train: shuffle, random resized crop (decode_and_crop_jpeg), uint8":
                {"train": True, "random_crop": True, "normalize_on_host": False},
        }
        results = {name: [] for name in configs}

        def side(name):
            return lambda: results[name].append(measure(data_dir, args.batch, args.image_size, **configs[name]))
        alternate({name: side(name) for name in configs}, args.rounds)
        exact = next(iter(configs))
        per_core = {name: [images / cpu for images, _, cpu in runs] for name, runs in results.items()}
        for name, runs in results.items():
            emit("pipeline_images_per_s", configuration=name, image_size=args.image_size, batch=args.batch,
                 rounds=args.rounds, cores=cores, images_per_s=spread([images / wall for images, wall, _ in runs]),
                 images_per_s_per_core=spread(per_core[name]),
                 per_core_over_exact=ratio(per_core[name], per_core[exact]), load_average=os.getloadavg()[0])
        breakdown(data_dir, args.batch, args.image_size)

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests._raw_layouts: the tiny tokenizer
    main()
