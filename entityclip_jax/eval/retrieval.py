"""Recall@K, median and mean rank for image->text and text->image retrieval.

Ranks are counted, never sorted: the 0-based rank of the correct item in a query's
row is the number of gallery items that score higher than it. The similarity
matrix is scored a block of image rows at a time (at most chunk x Nt floats, so
100k x 100k never needs N x N memory), each score exactly once, and both
directions count their ranks from the same block: image->text along its rows,
text->image down its columns. The correct items' scores are read from the same
computed matrix as their competitors, so ties are exact ties. The matmul is the
fastest float32 one of the backend (NumPy's BLAS on CPU, XLA on GPU/TPU).

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

What a person looks at (top_k > 0): each query's k best-scoring gallery items
and their scores, found in the same pass, block by block, merged into a running
top k per row and per column (still never N x N). Equal scores come back in
gallery order: images by row; texts grouped by their image's row, then in input
order (the order the pass visits them).
"""
import jax
import jax.numpy as jnp
import numpy as np

from entityclip_jax.errors import EntityClipError

DEFAULT_KS = (1, 5, 10, 50, 100)
TIES = ("optimistic", "pessimistic")


def retrieval_ranks(image_embeds, text_embeds, text_to_image, *, chunk_size=1024, ties="optimistic", top_k=0):
    """0-based rank of the best correct item per query, both directions.

    image_embeds [Ni, D], text_embeds [Nt, D] (compared by dot product: pass
    L2-normalised features for cosine similarity); text_to_image [Nt] int, the
    image row each text belongs to. Returns {"i2t_ranks": [Ni], "t2i_ranks": [Nt]}
    as int64 NumPy arrays. With top_k > 0 also, per direction d:
      {d}_top [N, k] int64      the k best gallery items (text / image indices), best first
      {d}_top_scores [N, k]     their scores
      {d}_correct_scores [N]    the score of the best correct item (the one the rank is of)
    with k = min(top_k, gallery size).
    """
    image_embeds, text_embeds, text_to_image = _checked(image_embeds, text_embeds, text_to_image, chunk_size, ties)
    if int(top_k) < 0:
        raise EntityClipError(f"top_k must be 0 (ranks only) or a positive number of items, got {top_k}")
    return _ranks_one_pass(image_embeds, text_embeds, text_to_image, int(chunk_size), ties, int(top_k))


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


def _ranks_one_pass(image_embeds, text_embeds, text_to_image, chunk_size, ties, top_k):
    """Both directions' ranks from one pass over the similarity matrix, a block of image rows at a time.

    Texts are put in the order of their images, so the captions of image block k
    are one column range [start_k, end_k). Every score is computed exactly once:
      pass 1, block k: columns [0, end_k): every text there belongs to an image
              of block k or earlier, so its correct score is already known (or
              read from this very block);
      pass 2, block k: columns [end_k, Nt): by now every correct score is known.
    A row's correct scores always lie in pass 1's block, so each comparison is
    between two numbers of the same computed matrix and ties stay exact ties.
    Each block also feeds the running top k of its rows and of its columns.
    """
    xp, matmul = _array_backend()
    num_images = image_embeds.shape[0]
    order = np.argsort(text_to_image, kind="stable")
    image_of = text_to_image[order]                                      # image of each sorted text
    texts = xp.asarray(text_embeds[order])
    images = xp.asarray(image_embeds)
    bounds = list(range(0, num_images, chunk_size)) + [num_images]
    ends = np.searchsorted(image_of, bounds[1:])                         # end_k: texts of images < bounds[k+1]
    starts = np.concatenate([[0], ends[:-1]])
    pessimistic = ties == "pessimistic"
    text_best = np.zeros(len(order), np.float32)                          # correct score per sorted text
    i2t = np.zeros(num_images, np.int64)
    t2i = np.zeros(len(order), np.int64)
    image_best = []
    i2t_top = _RunningTop(num_images, min(top_k, len(order)))            # over sorted text positions
    t2i_top = _RunningTop(len(order), min(top_k, num_images))            # over image rows
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        scores = matmul(images[lo:hi], texts[:ends[k]])                    # [rows, end_k]
        # Correct scores, read from this block: each own caption's column, its image's row.
        own = np.arange(starts[k], ends[k])
        own_scores = np.asarray(scores[image_of[own] - lo, own])
        text_best[own] = own_scores
        best = np.full(hi - lo, -np.inf, np.float32)
        np.maximum.at(best, image_of[own] - lo, own_scores)
        image_best.append(best)
        i2t[lo:hi] += _count_rows(xp, scores, best, pessimistic)
        t2i[:ends[k]] += _count_columns(xp, scores, text_best[:ends[k]], pessimistic)
        if pessimistic:   # a query's own correct items are not wrong items
            np.subtract.at(i2t, image_of[own], (own_scores >= best[image_of[own] - lo]).astype(np.int64))
            t2i[own] -= 1
        i2t_top.add(slice(lo, hi), *_top_k(xp, scores, i2t_top.k), offset=0)
        t2i_top.add(slice(0, ends[k]), *_top_k(xp, scores.T, t2i_top.k), offset=lo)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if ends[k] == len(order):
            continue
        scores = matmul(images[lo:hi], texts[ends[k]:])
        i2t[lo:hi] += _count_rows(xp, scores, image_best[k], pessimistic)
        t2i[ends[k]:] += _count_columns(xp, scores, text_best[ends[k]:], pessimistic)
        i2t_top.add(slice(lo, hi), *_top_k(xp, scores, i2t_top.k), offset=ends[k])
        t2i_top.add(slice(ends[k], len(order)), *_top_k(xp, scores.T, t2i_top.k), offset=lo)
    unsort = np.empty_like(order)
    unsort[order] = np.arange(len(order))                                # sorted position of each text
    out = {"i2t_ranks": i2t, "t2i_ranks": t2i[unsort]}
    if top_k:
        out.update(i2t_top=order[i2t_top.index], i2t_top_scores=i2t_top.scores,
                   i2t_correct_scores=np.concatenate(image_best),
                   t2i_top=t2i_top.index[unsort], t2i_top_scores=t2i_top.scores[unsort],
                   t2i_correct_scores=text_best[unsort])
    return out


class _RunningTop:
    """The k best (score, index) of each of n rows so far; equal scores: the lower index first."""

    def __init__(self, n, k):
        self.k = k
        self.scores = np.full((n, k), -np.inf, np.float32)
        self.index = np.full((n, k), np.iinfo(np.int64).max, np.int64)

    def add(self, rows, scores, index, offset):
        """Merge a block's own top k (scores, index [r, k] best first, index local to the block)."""
        if not self.k:
            return
        scores = np.concatenate([self.scores[rows], scores], axis=1)
        index = np.concatenate([self.index[rows], index.astype(np.int64) + offset], axis=1)
        best = np.lexsort((index, -scores), axis=1)[:, :self.k]
        self.scores[rows] = np.take_along_axis(scores, best, axis=1)
        self.index[rows] = np.take_along_axis(index, best, axis=1)


def _top_k(xp, scores, k):
    """(scores, column index) [rows, min(k, cols)] of each row's best columns, best first,
    equal scores in column order. O(rows x cols): a selection, not a sort of the row."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), np.float32), np.zeros((scores.shape[0], 0), np.int64)
    if xp is jnp:
        values, index = jax.lax.top_k(scores, k)                 # lower index first among equals
        return np.asarray(values), np.asarray(index)
    scores = np.ascontiguousarray(scores)                   # columns (scores.T): select along memory
    cut = scores.shape[1] - k
    index = np.argpartition(scores, cut, axis=1)[:, cut:]   # some k best; ties at the k-th score: any of them
    kth = np.take_along_axis(scores, index, axis=1).min(axis=1, keepdims=True)
    crowded = np.flatnonzero((scores >= kth).sum(axis=1) > k)
    if crowded.size:   # more ties at the k-th score than places left: the first columns take them
        above, tied = scores[crowded] > kth[crowded], scores[crowded] == kth[crowded]
        need = k - above.sum(axis=1, keepdims=True)
        chosen = above | (tied & (np.cumsum(tied, axis=1) <= need))
        index[crowded] = np.nonzero(chosen)[1].reshape(len(crowded), k)
    values = np.take_along_axis(scores, index, axis=1)
    best = np.lexsort((index, -values), axis=1)
    return np.take_along_axis(values, best, axis=1), np.take_along_axis(index, best, axis=1)


def _count_rows(xp, scores, best, pessimistic):
    best = xp.asarray(best)[:, None]
    return np.asarray(xp.sum(scores >= best if pessimistic else scores > best, axis=1))


def _count_columns(xp, scores, best, pessimistic):
    best = xp.asarray(best)[None, :]
    return np.asarray(xp.sum(scores >= best if pessimistic else scores > best, axis=0))


def _array_backend():
    """(array module, matmul) of the fastest float32 matmul on this backend.

    On CPU NumPy's BLAS is ~2.5x XLA's CPU matmul; on GPU/TPU the scores stay
    on the device and only the counts come back.
    """
    return (np, _numpy_scores) if jax.default_backend() == "cpu" else (jnp, _jax_scores)


def _numpy_scores(images, texts):
    return images @ texts.T


def _jax_scores(images, texts):
    return jnp.dot(images, texts.T, precision=jax.lax.Precision.HIGHEST)
