"""Hard negatives for GI-ITM (ALBEF style, METHOD.md), sampled inside jit.

For each row of the main similarity logits of the GLOBAL batch, one negative
is drawn with probability proportional to softmax(logits) with the diagonal
set to zero, i.e. a categorical over the logits with the diagonal at -inf.
The release (faithful mode) adds 1e-5 to every weight AFTER zeroing the
diagonal, so a pair can be drawn as its own negative. The choice carries no gradient.
"""
import jax
import jax.numpy as jnp

from entityclip_jax.errors import EntityClipError

RELEASE_WEIGHT_FLOOR = 1e-5  # the release's weights = softmax, diagonal zeroed, + 1e-5 everywhere


def negative_log_weights(logits, *, faithful=False):
    """Unnormalised log-probabilities of drawing column j for row i: [B, B] -> [B, B] fp32."""
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    diagonal = jnp.eye(logits.shape[0], dtype=bool)
    if faithful:
        weights = jnp.where(diagonal, 0.0, jax.nn.softmax(logits, axis=-1)) + RELEASE_WEIGHT_FLOOR
        return jnp.log(weights)
    return jnp.where(diagonal, -jnp.inf, logits)


def sample_off_diagonal(rng, logits, *, faithful=False):
    """One column per row of a square [B, B] logits matrix: [B] int32. Never the
    diagonal, except in faithful mode (with the release's small floor weight)."""
    batch = logits.shape[0]
    if batch < 2 or logits.shape != (batch, batch):
        raise EntityClipError(
            f"hard negatives need a square logits matrix with a batch of at least 2, got shape "
            f"{logits.shape}; raise the (global) batch size")
    return jax.random.categorical(rng, negative_log_weights(logits, faithful=faithful), axis=-1).astype(jnp.int32)


def sample_hard_negatives(rng, logits_per_image, *, faithful=False):
    """(neg_text_for_image, neg_image_for_text), both [B] int32.

    neg_text_for_image[i]: a query j != i, drawn from row i of logits_per_image.
    neg_image_for_text[i]: an image j' != i, drawn from row i of logits_per_text
    (the transpose). The GI-ITM negative triples are then
        A = (image_i, query_j, explanation_j)   and   B = (image_j', query_i, explanation_i).
    faithful: the release's weights (j == i possible, see negative_log_weights).
    """
    rng_text, rng_image = jax.random.split(rng)
    return (sample_off_diagonal(rng_text, logits_per_image, faithful=faithful),
            sample_off_diagonal(rng_image, logits_per_image.T, faithful=faithful))
