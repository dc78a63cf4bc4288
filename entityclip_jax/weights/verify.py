"""Check an exported Hugging Face directory against our Flax towers."""
import jax
import jax.numpy as jnp
import numpy as np

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip import CLIPModel


def compare_with_transformers(params, config, hf_dir, batch=2, seed=0, tolerance=1e-4):
    """Max |difference| of image and text embeddings, transformers vs ours.

    Raises when it exceeds tolerance: an export must be the same model.
    """
    import torch  # lazy: heavy, only to check an export
    import transformers  # lazy: heavy, only to check an export

    rng = np.random.default_rng(seed)
    t, v = config.text, config.vision
    length = min(16, t.max_position_embeddings)
    # BOS, then any ids but BOS and the end-of-text id (wherever a small tokenizer puts them), then EOT.
    end = t.end_of_text_id
    ids = rng.choice(np.setdiff1d(np.arange(t.vocab_size), [t.bos_token_id, end]), size=(batch, length))
    if 0 <= t.bos_token_id < t.vocab_size:
        ids[:, 0] = t.bos_token_id
    ids[:, -1] = end
    pixels = rng.standard_normal((batch, v.image_size, v.image_size, 3)).astype(np.float32)

    with storage.local_copy(hf_dir) as local:  # transformers reads local directories only
        model = transformers.CLIPModel.from_pretrained(local).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids),
                       pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    with jax.default_matmul_precision("highest"):
        ours = CLIPModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels))
    diff = max(np.abs(np.asarray(ours.image.embeds) - theirs.image_embeds.numpy()).max(),
               np.abs(np.asarray(ours.text.embeds) - theirs.text_embeds.numpy()).max())
    if diff > tolerance:
        raise EntityClipError(f"export in {hf_dir} differs from the Flax model by {diff:.2e} "
                              f"(> {tolerance}); please report this as a bug")
    return float(diff)
