"""Hard negatives for GI-ITM (ALBEF style, METHOD.md), sampled inside jit.

For each row of the main similarity logits of the GLOBAL batch, one negative
is drawn with probability proportional to softmax(logits) with the diagonal
set to zero, i.e. a categorical over the logits with the diagonal at -inf.
The choice carries no gradient.
"""
import jax
import jax.numpy as jnp

from entityclip_jax.errors import EntityClipError


def sample_off_diagonal(rng, logits):
    """One column per row of a square [B, B] logits matrix, never the diagonal: [B] int32."""
    batch = logits.shape[0]
    if batch < 2 or logits.shape != (batch, batch):
        raise EntityClipError(
            f"hard negatives need a square logits matrix with a batch of at least 2, got shape "
            f"{logits.shape}; raise the (global) batch size")
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    logits = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_hard_negatives(rng, logits_per_image):
    """(neg_text_for_image, neg_image_for_text), both [B] int32.

    neg_text_for_image[i]: a query j != i, drawn from row i of logits_per_image.
    neg_image_for_text[i]: an image j' != i, drawn from row i of logits_per_text
    (the transpose). The GI-ITM negative triples are then
        A = (image_i, query_j, explanation_j)   and   B = (image_j', query_i, explanation_i).
    """
    rng_text, rng_image = jax.random.split(rng)
    return (sample_off_diagonal(rng_text, logits_per_image),
            sample_off_diagonal(rng_image, logits_per_image.T))
