"""Validation during training, with the plain CLIP towers (METHOD.md "Inference").

Every validation example is encoded once, data-parallel over the training mesh
(the pipeline's eval mode pads the last batch and masks the padding), then:
  val/vtc_loss  CLIP's symmetric InfoNCE over consecutive chunks of the split,
                averaged over the chunks, in one jit (the release's model
                selection criterion; see validation_vtc_loss for the chunking);
  val/i2t_R@K, val/t2i_R@K (K = 1, 5, 10) and val/rsum over the whole split.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from entityclip_jax.data import pipeline
from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.encode import check_finite
from entityclip_jax.eval.retrieval import recall_metrics, retrieval_ranks
from entityclip_jax.objective.losses import clip_contrastive_loss
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.objective.batch_loss import pixels
from entityclip_jax.parallel import sharding

KS = (1, 5, 10)


@functools.partial(jax.jit, static_argnames=("batch_size", "faithful"))
def validation_vtc_loss(image, text, logit_scale, *, batch_size, faithful=False):
    """Mean VTC loss over consecutive chunks of the split's [N, D] embeddings.

    default:  chunks of the training batch size, the scale clamped at ln(100)
              as in training, a last chunk of one row left out (its loss is 0
              whatever the model);
    faithful: the release's main.py: its validation loader's batches of
              2 x the training batch size, every batch (the last, short one
              included), logit_scale not clamped.
    """
    chunk = 2 * batch_size if faithful else batch_size
    loss = functools.partial(clip_contrastive_loss, logit_scale=logit_scale, clamp=not faithful)
    num_rows = image.shape[0]
    full = num_rows // chunk
    losses = []
    if full:
        shape = (full, chunk, image.shape[1])
        losses.append(jax.lax.map(lambda pair: loss(*pair), (image[:full * chunk].reshape(shape),
                                                             text[:full * chunk].reshape(shape))))
    tail = num_rows - full * chunk
    if tail >= (1 if faithful else 2):
        losses.append(loss(image[full * chunk:], text[full * chunk:])[None])
    return jnp.mean(jnp.concatenate(losses))


class Validator:
    def __init__(self, model, config, mesh):
        self.config, self.mesh = config, mesh
        self.batch_size = config.eval.batch_size
        if self.batch_size % mesh.size:
            raise EntityClipError(f"eval.batch_size {self.batch_size} must be a multiple of the {mesh.size} devices")
        towers = model.towers

        def encode(clip_params, batch):
            variables = {"params": clip_params}
            image = towers.apply(variables, pixels(batch), method=CLIPModel.encode_image).embeds
            text = towers.apply(variables, batch["query_ids"], method=CLIPModel.encode_text).embeds
            return image, text, batch["mask"]
        # Inputs keep their shardings (the batch split over the mesh); outputs replicated: every host
        # gets the whole batch's embeddings.
        self.encode = jax.jit(encode, out_shardings=sharding.replicated(mesh))
        self.image_size = model.clip.vision.image_size

    def _batches(self):
        ds = pipeline.make_dataset(
            self.config.data.dir, self.config.data.val_split, batch_size=self.batch_size // jax.process_count(),
            image_size=self.image_size, train=False, normalize_on_host=self.config.data.normalize_on_host,
            dct_scaling=self.config.data.dct_scaling)
        for batch in pipeline.numpy_batches(ds, (self.config.data.dir, self.config.data.val_split)):
            yield pipeline.to_global_arrays(batch, self.mesh, self.mesh.axis_names)

    def __call__(self, params):
        parts = [self.encode(params["clip"], batch) for batch in self._batches()]
        image, text, mask = (np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(3))
        image = check_finite(image[mask], "validation image embeddings")
        text = check_finite(text[mask], "validation text embeddings")
        if len(image) < 2:
            raise EntityClipError(f"the {self.config.data.val_split!r} split has {len(image)} examples; "
                                  "validation needs at least 2")
        loss = validation_vtc_loss(image, text, params["clip"]["logit_scale"], batch_size=self.config.batch_size,
                                   faithful=bool(self.config.heads.faithful_release))
        # Pessimistic ties, as `entityclip eval`: a collapsed model must not look perfect.
        recall = recall_metrics(retrieval_ranks(image, text, np.arange(len(text)), ties="pessimistic"), ks=KS)
        metrics = {"val/vtc_loss": float(loss), "val/rsum": recall["rsum"]}
        for direction in ("i2t", "t2i"):
            metrics.update({f"val/{direction}_R@{k}": recall[direction][f"R@{k}"] for k in KS})
        return metrics
