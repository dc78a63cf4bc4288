"""write-records and check-source under bad data: phone photos, nothing to write, corrupt images, kill -9."""
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from entityclip_jax import cli
from entityclip_jax.data import records
from entityclip_jax.data.example import RawExample, SkipReport
from entityclip_jax.data.tokenizer import load_tokenizer
from tests._child_process import child_env
from tests._raw_layouts import write_tiny_clip_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def rocket():
    """A real, non-square photo from the scikit-image wheel, as RGB pixels."""
    import skimage
    return np.asarray(Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", "rocket.jpg")).convert("RGB"))


def phone_photo(pixels, orientation=6):
    """JPEG bytes of pixels as a phone stores them: sensor-oriented, with an EXIF orientation tag.
    Orientation 6: the viewer turns the stored pixels 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def decoded(data):
    import tensorflow as tf
    return tf.io.decode_image(data, channels=3).numpy()  # what the training pipeline sees


def test_exif_orientation_is_applied_when_writing_records(tmp_path, tokenizer_dir):
    import tensorflow as tf
    stored = rocket()
    upright = np.rot90(stored, k=-1)  # what a viewer shows: turned clockwise
    examples = [RawExample(id="phone", query="a rocket on its pad", image_bytes=phone_photo(stored))]
    records.write_split(examples, tmp_path, "train", load_tokenizer(tokenizer_dir), SkipReport(), workers=0,
                        progress=False)
    shard = tmp_path / records.read_meta(tmp_path)["splits"]["train"]["shards"][0]["file"]
    record = next(iter(tf.data.TFRecordDataset(str(shard))))
    image = tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]
    pixels = decoded(image.numpy())
    assert pixels.shape == upright.shape
    assert np.abs(pixels.astype(float) - upright).mean() < 4  # two JPEG generations apart


def test_exif_orientation_is_applied_by_search_index(tmp_path):
    from entityclip_jax.eval.search import image_folder_batches
    stored = rocket()
    (tmp_path / "phone.jpg").write_bytes(phone_photo(stored))
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(tmp_path / "upright.png")
    Image.fromarray(stored).save(tmp_path / "sideways.png")
    batch = next(image_folder_batches([str(tmp_path / n) for n in ("phone.jpg", "upright.png", "sideways.png")],
                                      64, 3))
    phone, upright, sideways = batch["pixel_values"]
    assert np.abs(phone - upright).mean() < 0.1 < np.abs(phone - sideways).mean()


def _jsonl_dataset(root, good=3):
    """good real photos, one truncated, one missing."""
    (root / "img").mkdir(parents=True)
    out = io.BytesIO()
    Image.fromarray(rocket()).save(out, format="JPEG")
    photo = out.getvalue()
    lines = []
    for i in range(good):
        (root / "img" / f"p{i}.jpg").write_bytes(photo)
        lines.append({"id": f"p{i}", "image": f"img/p{i}.jpg", "query": f"rocket {i}"})
    (root / "img" / "broken.jpg").write_bytes(photo[:len(photo) // 2])
    lines.append({"id": "broken", "image": "img/broken.jpg", "query": "a truncated photo"})
    lines.append({"id": "absent", "image": "img/absent.jpg", "query": "a missing photo"})
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_check_source_counts_what_write_records_writes(tmp_path, tokenizer_dir, capsys):
    root = _jsonl_dataset(tmp_path / "raw")
    shared = ["--source", "jsonl", "--root", str(root), "--split", "train", "--workers", "0"]
    assert cli.main(["check-source", *shared]) == 0
    checked = capsys.readouterr().out
    assert cli.main(["write-records", *shared, "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "rec")]) == 0
    written = records.read_meta(tmp_path / "rec")["splits"]["train"]
    assert written["num_examples"] == 3
    assert written["skipped"]["by_reason"] == {"corrupt_image": 1, "missing_image": 1}
    assert f"jsonl train: 3 examples, 2 skipped {written['skipped']['by_reason']}" in checked
    # The old flag names still work.
    assert cli.main(["check-source", "--kind", "jsonl", "--root", str(root), "--split", "train",
                     "--policy", "empty", "--workers", "0"]) == 0


def test_write_records_with_nothing_to_write_fails(tmp_path, tokenizer_dir, capsys):
    root = _jsonl_dataset(tmp_path / "raw", good=0)
    rc = cli.main(["write-records", "--source", "jsonl", "--root", str(root), "--split", "train",
                   "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "rec"), "--workers", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "no example of split 'train' could be written" in err and "corrupt_image" in err
    assert not list((tmp_path / "rec").glob("*"))


def _descendants(pid):
    children = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.slow  # kill
def test_kill_9_of_write_records_leaves_no_workers(tmp_path, tokenizer_dir):
    root = tmp_path / "raw"
    (root / "img").mkdir(parents=True)
    Image.fromarray(np.tile(rocket(), (2, 2, 1))).save(root / "img" / "big.png")
    (root / "train.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "image": "img/big.png", "query": "q"}) + "\n"
                                              for i in range(20000)))
    proc = subprocess.Popen([sys.executable, "-m", "entityclip_jax.cli", "write-records", "--source", "jsonl",
                             "--root", str(root), "--split", "train", "--tokenizer", tokenizer_dir, "--out",
                             str(tmp_path / "rec"), "--workers", "2", "--max-side", "64"],
                            cwd=ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(_descendants(proc.pid)) < 2 and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are busy now
        workers = _descendants(proc.pid)
        assert proc.poll() is None and len(workers) >= 2, "write-records ended before its workers could be seen"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # leave nothing running, then fail
        os.kill(pid, signal.SIGKILL)
    assert not survivors
