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
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.objective.batch_loss import token_mask
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


def expert_words(clip_config, tower_params, heads, pixel_values, query_ids, explanation_ids, tokenizer, k=5):
    """What each explanation expert reads in one example's explanation: [(image_words, query_words)],
    one pair per expert, each the top k (word, attention mass) from the image patches and from the
    query words (BOS and EOT left out). pixel_values [1, H, W, 3], query_ids / explanation_ids [1, L];
    heads: an EntityCLIP run's head parameters (explanation_experts stacked over experts)."""
    towers, variables = CLIPModel(clip_config), {"params": tower_params}
    image = towers.apply(variables, pixel_values, method=CLIPModel.encode_image)
    query = towers.apply(variables, query_ids, method=CLIPModel.encode_text)
    explanation = towers.apply(variables, explanation_ids, method=CLIPModel.encode_text)
    e_mask = token_mask(explanation.eot_index, explanation_ids.shape[1])
    q_len = int(query.eot_index[0])
    experts = heads["explanation_experts"]
    out = []
    for n in range(len(jax.tree.leaves(experts)[0])):
        expert = jax.tree.map(lambda x: x[n], experts)
        by_image = expert_attention(expert, image.tokens[:, 1:], explanation.tokens, e_mask)[0]
        by_query = expert_attention(expert, query.tokens[:, 1:q_len], explanation.tokens, e_mask)[0]
        out.append(tuple(top_words(word_scores(rows, explanation_ids[0], tokenizer), k)
                         for rows in (by_image, by_query)))
    return out


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
