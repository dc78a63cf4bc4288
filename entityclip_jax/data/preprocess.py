"""CLIP image preprocessing as TensorFlow ops, for tf.data.

Eval/inference path = transformers' CLIPImageProcessor (PIL backend):
  decode -> bicubic resize of the SHORT side to `image_size` (long side
  int(size * long / short)) -> round to uint8 -> center crop -> /255 ->
  (x - mean) / std, NHWC float32.
tf.image.resize(bicubic, antialias=True) stands in for PIL's bicubic (PIL
antialiases when shrinking); tests/test_preprocess.py measures the gap.

`normalize` is plain arithmetic, so the same function runs in TF on the host
or in jnp on the device when pixels travel as uint8 (normalize_on_host=False:
a quarter of the bytes over PCIe and less host work).

Import TensorFlow only through functions here: the module is imported by
light code paths too.
"""
import io

from PIL import Image, ImageOps

from entityclip_jax.models.clip_pixels import normalize  # the towers' input contract

_EXIF_ORIENTATION = 0x0112


def exif_upright(image):
    """A PIL image turned as its EXIF orientation says (phone photos), and whether it was turned.

    TensorFlow's decoders ignore EXIF, so records and search indexes store and
    read upright pixels instead: this is the one place both apply it.
    """
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
        return image, False
    return ImageOps.exif_transpose(image), True


def upright_image_bytes(data, jpeg_quality=90):
    """Encoded image bytes -> the same bytes, or an upright re-encoding when EXIF turns the image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            turned, changed = exif_upright(image)
            if not changed:
                return data
            out = io.BytesIO()
            if image.format == "PNG":
                turned.save(out, format="PNG")
            else:
                turned.convert("RGB").save(out, format="JPEG", quality=jpeg_quality)
            return out.getvalue()
    except Exception:  # PIL raises many types for bad bytes; the decoder reports them as before
        return data


def read_image_file(path):
    """tf.io.read_file with the EXIF orientation applied (a tf.string scalar), for tf.data maps."""
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    data = tf.numpy_function(upright_image_bytes, [tf.io.read_file(path)], tf.string, stateful=False)
    data.set_shape([])
    return data


def resized_short_side(height, width, size):
    """(new_height, new_width) with the short side = size, as transformers computes it."""
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    new_long = tf.cast(tf.math.floor(size * long / short), tf.int32)
    size = tf.constant(size, tf.int32)
    return (tf.where(height <= width, size, new_long), tf.where(height <= width, new_long, size))


def decode(image_bytes, dct_min_side=None):
    """JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3] (first frame of animations).

    JPEGs use the accurate integer IDCT, as PIL does (TF's default fast IDCT
    is about one grey level off on average).
    dct_min_side: for JPEGs, let libjpeg downscale by 2, 4 or 8 while decoding
    (DCT scaling: a cheaper decode and a smaller image to resize) while the
    short side stays >= this.
    """
    import tensorflow as tf  # lazy: heavy; light code paths import this module

    def jpeg(ratio):
        return tf.io.decode_jpeg(image_bytes, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")

    def jpeg_scaled():
        if dct_min_side is None:
            return jpeg(1)
        short = tf.reduce_min(tf.io.extract_jpeg_shape(image_bytes)[:2])
        # ratios 2, 4, 8 are usable while ceil(short / r) >= dct_min_side; the count picks the largest.
        usable = [tf.cast((short + r - 1) // r >= dct_min_side, tf.int32) for r in (2, 4, 8)]
        return tf.switch_case(tf.add_n(usable), [lambda r=r: jpeg(r) for r in (1, 2, 4, 8)])

    def any_format():
        return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg_scaled, any_format)
    image.set_shape([None, None, 3])
    return image


def _to_uint8_range(image):
    """Round and clip a resized float image like PIL's uint8 output."""
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def center_crop_image(image, image_size, fast=False):
    """uint8 [h, w, 3] -> float32 [s, s, 3] in 0..255: resize short side, center crop.

    fast: skip antialiasing when the shrink is below 2x (TF's antialiased resize
    costs ~4x the plain bicubic one; DCT-scaled decoding leaves a shrink < 2x).
    """
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    shape = tf.shape(image)
    new_h, new_w = resized_short_side(shape[0], shape[1], image_size)
    new_size = tf.stack([new_h, new_w])

    def resize(antialias):
        return lambda: tf.image.resize(image, new_size, method="bicubic", antialias=antialias)

    if fast:
        resized = tf.cond(tf.reduce_min(shape[:2]) < 2 * image_size, resize(False), resize(True))
    else:
        resized = resize(True)()
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    cropped = resized[top:top + image_size, left:left + image_size]
    cropped.set_shape([image_size, image_size, 3])
    return _to_uint8_range(cropped)


def random_resized_crop_image(image_bytes, image_size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Train-time crop: a random box of `scale` area fraction and `ratio` aspect, resized to s x s.

    Returns float32 [s, s, 3] in 0..255. JPEGs decode only the box. `seed` is a
    stateless seed (int32/int64 tensor of shape [2]).
    """
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    is_jpeg = tf.io.is_jpeg(image_bytes)
    full = tf.cond(is_jpeg, lambda: tf.zeros([0, 0, 3], tf.uint8), lambda: decode(image_bytes))
    shape = tf.cond(is_jpeg, lambda: tf.io.extract_jpeg_shape(image_bytes), lambda: tf.shape(full))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    crop = tf.cond(
        is_jpeg,
        lambda: tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.slice(full, begin, size))
    resized = tf.image.resize(crop, [image_size, image_size], method="bicubic", antialias=True)
    resized.set_shape([image_size, image_size, 3])
    return _to_uint8_range(resized)


def clip_preprocess(image_bytes, image_size=224, *, normalize_on_host=True, dct_scaling=False,
                    random_crop_seed=None, crop_scale=(0.08, 1.0)):
    """Encoded image bytes -> [s, s, 3]: float32 CLIP-normalised, or uint8 when normalize_on_host=False.

    random_crop_seed: None for the CLIPImageProcessor path (eval and plain
    training); a stateless seed [2] for a random resized crop of `crop_scale`.
    dct_scaling: decode large JPEGs at 1/2, 1/4 or 1/8 size (DCT scaling) while the short
    side stays >= image_size, and resize without antialiasing when the shrink left
    is below 2x. About 2-3x cheaper; differs from CLIPImageProcessor by ~0.03 mean
    (normalised units) instead of ~0.002. Meant for training, not for evaluation.
    """
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    if random_crop_seed is None:
        image = decode(image_bytes, image_size if dct_scaling else None)
        pixels = center_crop_image(image, image_size, fast=dct_scaling)
    else:
        pixels = random_resized_crop_image(image_bytes, image_size, random_crop_seed, scale=crop_scale)
    return normalize(pixels) if normalize_on_host else tf.cast(pixels, tf.uint8)
