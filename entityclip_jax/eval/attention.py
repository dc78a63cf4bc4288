"""Which explanation words an explanation expert attends to (the paper's Figure 4).

For one example, an explanation expert's attention from image patches to the
explanation tokens, and from query words to the explanation tokens, is summed
over the query rows and over the BPE pieces of each word; the top words are
drawn beside the photo and the query.
"""
import jax
import jax.numpy as jnp
import numpy as np

from entityclip_jax import storage
from entityclip_jax.models.mmae import dense, layer_norm


def expert_attention(expert, X, E, e_mask=None):
    """Attention probabilities of one expert block: [B, Tq, D], [B, S, D] -> [B, Tq, S].

    The same computation as mmae.expert_block's attention (shared LN1, one
    head, 1/sqrt(D) scale, padding keys masked), with the weights exposed.
    """
    attn = expert["self_attn"]
    q = dense(attn["q_proj"], layer_norm(expert["layer_norm1"], X)).astype(jnp.float32)
    k = dense(attn["k_proj"], layer_norm(expert["layer_norm1"], E)).astype(jnp.float32)
    logits = jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(q.shape[-1])
    if e_mask is not None:
        logits = jnp.where(e_mask.astype(bool)[:, None, :], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def word_scores(attention_rows, ids, tokenizer):
    """Attention mass per word: rows [Tq, S] summed over queries, BPE pieces merged.

    ids: the S explanation token ids; tokenizer: a data.tokenizer.ClipTokenizer
    (a CLIP piece that ends a word carries '</w>'). BOS, EOT and the padding after it are left out.
    Returns [(word, mass)] in text order.
    """
    mass = np.asarray(attention_rows).sum(axis=0)
    words, group, group_mass = [], [], 0.0
    for token_id, m in zip(np.asarray(ids).tolist(), mass):
        if token_id == tokenizer.eos_token_id:
            break  # padding follows EOT, and its id (0 as OpenAI pads) is also a real piece ("!")
        if token_id == tokenizer.bos_token_id:
            continue
        group.append(token_id)
        group_mass += float(m)
        if tokenizer.backend.id_to_token(token_id).endswith("</w>"):
            words.append((tokenizer.decode(group).strip(), group_mass))
            group, group_mass = [], 0.0
    if group:
        words.append((tokenizer.decode(group).strip(), group_mass))
    return words


def top_words(words, k=5, stopwords=frozenset({"a", "an", "the", "of", "in", "with", "is", "and", ".", ",", ";"})):
    ranked = sorted((w for w in words if w[0].lower() not in stopwords), key=lambda w: -w[1])
    return ranked[:k]


def draw_attention(image, query, image_words, query_words, out_png, title="explanation expert"):
    """A PNG: the photo with the top words its patches attend to, and the query with its own."""
    import matplotlib  # lazy: ~0.5 s to import, only for plots; pyplot needs Agg chosen first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see above

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    axes[0].imshow(np.asarray(image))
    axes[0].set_title("image")
    axes[0].axis("off")
    for ax, words, label in ((axes[1], image_words, "attended by image patches"),
                             (axes[2], query_words, "attended by query words")):
        names = [w for w, _ in words][::-1]
        ax.barh(names, [m for _, m in words][::-1], color="tab:orange")
        ax.set_title(label)
        ax.set_xlabel("attention mass")
    fig.suptitle(f"{title}\nquery: {query}", fontsize=10)
    fig.tight_layout()
    with storage.open(out_png, "wb") as f:  # a file object: matplotlib would open a gs:// name locally
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out_png
