"""Recall@K, median and mean rank for image->text and text->image retrieval.

Ranks are counted, never sorted: the 0-based rank of the correct item in a query's
row is the number of gallery items that score higher than it. Rows are scored a
chunk at a time ([chunk, N] similarities), so 100k x 100k needs chunk * N floats,
not N * N, and no row is ever sorted. The correct items' scores are read from
the same similarity block as their competitors (an index table per query:
[Ni, most captions of any image] for images), so ties are exact ties.

Ground truth is a mapping `text_to_image[t]` = the image that text t describes.
Several captions per image: an image's rank is that of its best-scoring caption
(the best-ranked correct item). Duplicate captions (the same sentence under two
images) get identical embeddings and so tie; ties are where the two conventions
differ:
  optimistic  (default): rank = #items scoring strictly higher than the best
              correct item, i.e. ties are broken in the query's favour.
  pessimistic: rank = #WRONG items scoring higher than OR EQUAL to the best
              correct item, i.e. ties are broken against the query.
A collapsed model (all embeddings equal) scores R@1 = 100 optimistically and
~0 pessimistically, so report both when in doubt.

Median and mean rank are 1-based, as in the EntityCLIP release (util.py:
median = floor(median(0-based ranks)) + 1, mean = mean(0-based ranks) + 1).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from entityclip_jax.errors import EntityClipError

DEFAULT_KS = (1, 5, 10, 50, 100)
TIES = ("optimistic", "pessimistic")


def retrieval_ranks(image_embeds, text_embeds, text_to_image, *, chunk_size=1024, ties="optimistic"):
    """0-based rank of the best correct item per query, both directions.

    image_embeds [Ni, D], text_embeds [Nt, D] (compared by dot product: pass
    L2-normalised features for cosine similarity); text_to_image [Nt] int, the
    image row each text belongs to. Returns {"i2t_ranks": [Ni], "t2i_ranks": [Nt]}
    as int64 NumPy arrays.
    """
    image_embeds, text_embeds, text_to_image = _checked(image_embeds, text_embeds, text_to_image, chunk_size, ties)
    # Which gallery rows are correct for each query, as index tables padded with -1.
    texts_of_image = _texts_per_image(text_to_image, image_embeds.shape[0])    # [Ni, max captions]
    return {
        "i2t_ranks": _chunked_ranks(image_embeds, texts_of_image, text_embeds, chunk_size, ties),
        "t2i_ranks": _chunked_ranks(text_embeds, text_to_image[:, None], image_embeds, chunk_size, ties),
    }


def recall_metrics(ranks, ks=DEFAULT_KS):
    """R@K (percent), 1-based median and mean rank per direction, and rsum.

    `ranks` is retrieval_ranks' output. rsum = R@1 + R@5 + R@10 of both
    directions (computed from the ranks, whatever `ks` holds).
    """
    metrics = {}
    for direction in ("i2t", "t2i"):
        r = np.asarray(ranks[f"{direction}_ranks"])
        if r.size == 0:
            raise EntityClipError(f"no {direction} ranks to summarise: the evaluation set is empty")
        metrics[direction] = {f"R@{k}": _recall_at(r, k) for k in ks}
        metrics[direction]["median_rank"] = float(np.floor(np.median(r)) + 1)
        metrics[direction]["mean_rank"] = float(r.mean() + 1)
    metrics["rsum"] = float(sum(_recall_at(np.asarray(ranks[f"{d}_ranks"]), k)
                                for d in ("i2t", "t2i") for k in (1, 5, 10)))
    metrics["num_images"] = int(np.asarray(ranks["i2t_ranks"]).size)
    metrics["num_texts"] = int(np.asarray(ranks["t2i_ranks"]).size)
    return metrics


def group_images_by_id(image_ids):
    """One image per distinct id, for datasets with several captions per image.

    `image_ids` [N]: the image id of each (image, caption) example. Returns
    (keep [Ni] row indices of the first example of each distinct image, in order
    of first appearance; text_to_image [N] the kept-image index of each caption).
    Use as: retrieval_ranks(image_embeds[keep], text_embeds, text_to_image).
    """
    image_ids = np.asarray(image_ids)
    _, keep, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    order = np.argsort(keep, kind="stable")       # np.unique sorts by id; restore appearance order
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    return keep[order], position[inverse.reshape(-1)].astype(np.int32)


def _recall_at(ranks, k):
    return float(100.0 * np.mean(ranks < k))


def _checked(image_embeds, text_embeds, text_to_image, chunk_size, ties):
    image_embeds = np.asarray(image_embeds, np.float32)
    text_embeds = np.asarray(text_embeds, np.float32)
    text_to_image = np.asarray(text_to_image)
    if ties not in TIES:
        raise EntityClipError(f"ties must be one of {TIES}, got {ties!r}")
    if int(chunk_size) < 1:
        raise EntityClipError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise EntityClipError(f"embeddings must be [N, D] with the same D; got images {image_embeds.shape} "
                              f"and texts {text_embeds.shape}")
    if text_to_image.shape != (text_embeds.shape[0],) or not np.issubdtype(text_to_image.dtype, np.integer):
        raise EntityClipError(f"text_to_image must hold one integer image index per text ({text_embeds.shape[0]}), "
                              f"got {text_to_image.dtype} {text_to_image.shape}")
    if not (np.isfinite(image_embeds).all() and np.isfinite(text_embeds).all()):
        raise EntityClipError("embeddings hold NaN or inf; check the checkpoint and the inputs of the encoders")
    num_images = image_embeds.shape[0]
    if num_images == 0 or text_to_image.size == 0:
        raise EntityClipError("nothing to rank: no images or no texts")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise EntityClipError(f"text_to_image holds indices outside [0, {num_images}); "
                              "map every text to the row of its image (see group_images_by_id)")
    captionless = np.flatnonzero(np.bincount(text_to_image, minlength=num_images) == 0)
    if captionless.size:
        raise EntityClipError(f"{captionless.size} images have no text (first: row {captionless[0]}); "
                              "drop them or map their captions to them in text_to_image")
    return image_embeds, text_embeds, text_to_image.astype(np.int32)


def _texts_per_image(text_to_image, num_images):
    """[Ni, M] the texts of each image (M = most captions of any image), -1 padded."""
    order = np.argsort(text_to_image, kind="stable")
    counts = np.bincount(text_to_image, minlength=num_images)
    starts = np.cumsum(counts) - counts
    slot = np.arange(order.size) - starts[text_to_image[order]]    # position within its image's group
    table = np.full((num_images, counts.max()), -1, np.int32)
    table[text_to_image[order], slot] = order
    return table


def _chunked_ranks(queries, correct, gallery, chunk_size, ties):
    """Rank of each query's best correct gallery row; correct [Q, M] lists them (-1 = none)."""
    num_queries = queries.shape[0]
    chunk = min(int(chunk_size), num_queries)
    num_chunks = -(-num_queries // chunk)
    pad = num_chunks * chunk - num_queries
    # Pad the queries to whole chunks (padded rows are ranked, then dropped) so
    # every chunk has one shape and compiles once.
    queries = np.pad(queries, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
    correct = np.pad(correct, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
    ranks = _ranks_by_chunk(jnp.asarray(queries), jnp.asarray(correct), jnp.asarray(gallery),
                            ties == "pessimistic")
    return np.asarray(ranks).reshape(-1)[:num_queries].astype(np.int64)


@functools.partial(jax.jit, static_argnums=3)
def _ranks_by_chunk(queries, correct, gallery, pessimistic):
    def one_chunk(args):
        q, rows = args
        scores = jnp.dot(q, gallery.T, precision=jax.lax.Precision.HIGHEST)     # [chunk, N]
        # The correct items' scores are read from this same matrix, so a tie is
        # an exact tie and the correct item never outranks itself.
        correct_scores = jnp.where(rows >= 0, jnp.take_along_axis(scores, jnp.maximum(rows, 0), axis=1), -jnp.inf)
        best = jnp.max(correct_scores, axis=1, keepdims=True)
        if pessimistic:   # wrong items at or above the best correct one
            return jnp.sum(scores >= best, axis=1) - jnp.sum(correct_scores >= best, axis=1)
        return jnp.sum(scores > best, axis=1)
    # lax.map runs the chunks one after another: peak memory is one chunk's scores.
    return jax.lax.map(one_chunk, (queries, correct))
