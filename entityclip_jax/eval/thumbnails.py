"""Small JPEG thumbnails of the images a page shows: inlined as data: URIs, or served by `serve`.

From records they are made of the pixels the model saw (resize + centre crop at
the model's image size), so a page shows what was ranked.
"""
import base64
import io

from entityclip_jax.data.pipeline import make_dataset, numpy_batches
from entityclip_jax.eval.search import thumbnail

THUMBNAIL_SIZE = 96    # pixels per side; ~2-3 KB as JPEG


def jpeg_thumbnail(image, size=THUMBNAIL_SIZE, quality=80):
    """JPEG bytes of a size x size tile of `image` (a file path, PIL image or uint8 [h, w, 3])."""
    buffer = io.BytesIO()
    thumbnail(image, size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def data_uri(data, mime="image/jpeg"):
    """The bytes of an image as a data: URI, for a page that must open without a network."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def record_thumbnails(data_dir, split, image_size, ids=None, size=THUMBNAIL_SIZE, batch_size=64):
    """{example id: JPEG bytes} of a records split (of just `ids` when given: only their images are decoded)."""
    if ids is not None and not len(ids):
        return {}
    dataset = make_dataset(data_dir, split, batch_size=batch_size, image_size=image_size, train=False,
                           process_index=0, process_count=1, normalize_on_host=False, ids=ids)
    found = {}
    for batch in numpy_batches(dataset, (data_dir, split)):
        for example_id, pixels, real in zip(batch["id"], batch["pixel_values"], batch["mask"]):
            if real:
                found[example_id.decode("utf-8")] = jpeg_thumbnail(pixels, size)
    return found
