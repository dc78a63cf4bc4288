"""The attention view exposes exactly the expert's attention and draws a real PNG."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from entityclip_jax.eval.attention import draw_attention, expert_attention, top_words, word_scores
from entityclip_jax.models.heads import init_expert_stack
from entityclip_jax.models.mmae import dense, expert_block, layer_norm, quick_gelu


def test_weights_rebuild_the_expert_block_output():
    rng = np.random.default_rng(0)
    expert = jax.tree.map(lambda x: x[0], init_expert_stack(jax.random.key(0), 1, 16))
    X = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    E = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
    with jax.default_matmul_precision("highest"):
        weights = expert_attention(expert, X, E, mask)
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
        assert float(jnp.abs(weights[1, :, 4:]).max()) == 0.0  # padding keys get nothing
        values = dense(expert["self_attn"]["v_proj"], layer_norm(expert["layer_norm1"], E))
        x1 = X + dense(expert["self_attn"]["out_proj"], weights @ values)
        rebuilt = x1 + dense(expert["mlp"]["fc2"], quick_gelu(dense(expert["mlp"]["fc1"],
                                                                    layer_norm(expert["layer_norm2"], x1))))
        np.testing.assert_allclose(rebuilt, expert_block(expert, X, E, mask), atol=1e-5)


class _PieceTokenizer:
    """Just enough of ClipTokenizer: ids index a piece list; '</w>' ends a word."""
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1
    pieces = ["<|startoftext|>", "<|endoftext|>", "tur", "quoise</w>", "crown</w>", "the</w>"]

    class backend:
        @staticmethod
        def id_to_token(i):
            return _PieceTokenizer.pieces[i]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("</w>", " ")


def test_word_scores_merge_pieces_and_rank(tmp_path):
    ids = [0, 5, 2, 3, 4, 1, 1]
    attention = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.0, 0.0],
                          [0.0, 0.0, 0.1, 0.1, 0.8, 0.0, 0.0]])
    words = word_scores(attention, ids, _PieceTokenizer())
    assert [w for w, _ in words] == ["the", "turquoise", "crown"]
    np.testing.assert_allclose([m for _, m in words], [0.1, 0.7, 1.2])
    assert [w for w, _ in top_words(words, k=2)] == ["crown", "turquoise"]
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    out = draw_attention(image, "Queen Aurelia at a summit", top_words(words), top_words(words),
                         tmp_path / "attention.png")
    with Image.open(out) as png:
        assert png.size[0] > 400 and png.size[1] > 200


class _OpenAIPaddedTokenizer(_PieceTokenizer):
    """OpenAI's layout: id 0 is the real piece '!' and also the padding after EOT."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    pieces = ["!</w>", "<|startoftext|>", "<|endoftext|>", "wow", "crown</w>"]

    class backend:
        @staticmethod
        def id_to_token(i):
            return _OpenAIPaddedTokenizer.pieces[i]


def test_word_scores_keep_a_real_zero_id_and_drop_the_padding():
    ids = [1, 3, 0, 4, 2, 0, 0]  # "wow! crown" EOT pad pad
    attention = np.array([[0.0, 0.1, 0.2, 0.3, 0.0, 0.2, 0.2]])
    words = word_scores(attention, ids, _OpenAIPaddedTokenizer())
    assert [w for w, _ in words] == ["wow!", "crown"]
    np.testing.assert_allclose([m for _, m in words], [0.3, 0.3])
