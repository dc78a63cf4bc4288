"""ClipTokenizer: real OpenAI vocabulary (from the open_clip_torch wheel, cached) against
transformers' CLIPTokenizer and a plain port of OpenAI's simple_tokenizer; a tiny BPE
trained at test time for everything that must run without the wheel."""
import functools
import gzip
import html
import json

import numpy as np
import pytest

from entityclip_jax.data import tokenizer as tok_lib
from entityclip_jax.errors import EntityClipError
from tests._raw_layouts import TINY_CORPUS, write_tiny_clip_tokenizer

NEWS_CAPTIONS = [
    "a photo of a cat",
    "Angela Merkel meets François Hollande in Besançon",
    "Zlatan Ibrahimović celebrates after scoring for Paris Saint-Germain at Parc des Princes",
    "“It's over,” said José Mourinho, 53, after Chelsea's 2-1 loss to Real Madrid on Sept. 14, 2016",
    'The "Brexit" vote: Theresa May\'s cabinet at 10 Downing Street, London — June 23, 2016',
    "Søren Kierkegaard's grave in Copenhagen; Łódź mayor Hanna Zdanowska; Ñoño in São Paulo",
    "President Xi Jinping (习近平) and Shinzō Abe at the G20 summit in Hangzhou",
    "  multiple   spaces\tand\nnewlines   ",
    "U.S. $1,000,000 prize for 3D-printed 4K TVs; 100% up 25.5% Y/Y",
    "",
]
LONG_TEXT = " ".join(["Barack Obama and Vladimir Putin discuss Syria in Geneva"] * 30)


@functools.lru_cache(maxsize=None)
def _fetch_openai_vocab():
    """Fetched once per session; a failure is remembered too, so pip is not retried per test."""
    try:
        return tok_lib.ensure_openai_vocab(), None
    except EntityClipError as err:
        return None, str(err)


def _openai_vocab():
    path, error = _fetch_openai_vocab()
    if path is None:
        pytest.skip(f"OpenAI vocabulary unavailable (pip could not fetch open_clip_torch): {error}")
    return path


@pytest.fixture(scope="module")
def openai_tok():
    return tok_lib.load_tokenizer(_openai_vocab())


@pytest.fixture(scope="module")
def openai_hf_dir(tmp_path_factory):
    return tok_lib.build_hf_tokenizer_files(_openai_vocab(), tmp_path_factory.mktemp("clip_tok"))


class OpenAISimpleTokenizer:
    """Plain port of OpenAI CLIP's simple_tokenizer (ftfy.fix_text left out: no mojibake here)."""

    def __init__(self, bpe_path):
        import regex
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        byte_encoder = tok_lib.bytes_to_unicode()
        vocab = list(byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.byte_encoder, self.encoder = byte_encoder, dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def tokenize(self, text, context_length=77):
        import unicodedata
        text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)).strip())
        text = " ".join(text.split()).lower()
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self.bpe(token)]
        ids = [49406] + ids + [49407]
        ids = ids[:context_length]
        ids[-1] = 49407
        return ids + [0] * (context_length - len(ids))


def test_photo_of_a_cat(openai_tok):
    ids, eot = openai_tok.encode(["a photo of a cat"])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert eot.tolist() == [6]
    assert (ids[0, 7:] == openai_tok.pad_token_id).all()
    assert (openai_tok.bos_token_id, openai_tok.eos_token_id, openai_tok.vocab_size) == (49406, 49407, 49408)


def test_matches_transformers_on_news_captions(openai_tok, openai_hf_dir):
    from transformers import CLIPTokenizer
    hf = CLIPTokenizer.from_pretrained(str(openai_hf_dir))
    texts = NEWS_CAPTIONS + [LONG_TEXT]
    ids, mask, eot = openai_tok.encode_with_mask(texts)
    expected = hf(texts, padding="max_length", truncation=True, max_length=77)
    assert ids.tolist() == expected["input_ids"]
    assert mask.tolist() == expected["attention_mask"]
    assert hf.pad_token_id == openai_tok.pad_token_id == 49407


def test_matches_openai_simple_tokenizer(openai_tok):
    reference = OpenAISimpleTokenizer(_openai_vocab())
    texts = NEWS_CAPTIONS + [LONG_TEXT]
    ids, eot = openai_tok.encode(texts)
    for row, text in enumerate(texts):
        want = reference.tokenize(text)
        got = ids[row].tolist()
        # OpenAI pads with 0, the HF checkpoint with EOT: compare up to EOT, then the padding.
        assert got[:eot[row] + 1] == want[:eot[row] + 1], text
        assert want[eot[row]] == 49407 and not any(want[eot[row] + 1:])
    # argmax of the ids finds EOT (METHOD.md), even with EOT used as padding.
    assert (ids.argmax(-1) == eot).all()


def test_long_text_truncation_keeps_eot_last(openai_tok):
    ids, mask, eot = openai_tok.encode_with_mask([LONG_TEXT, "short"])
    assert eot.tolist()[0] == 76 and ids[0, 76] == 49407 and ids[0, 0] == 49406
    assert 49407 not in ids[0, :76].tolist()
    assert mask[0].all() and mask[1].sum() == eot[1] + 1
    assert openai_tok.decode(ids[0]).startswith("barack obama and vladimir putin")
    assert openai_tok.tokens(ids[1, :eot[1] + 1]) == ["<|startoftext|>", "short", "<|endoftext|>"]


def test_fingerprint_is_layout_independent(openai_tok, openai_hf_dir, tmp_path):
    assert tok_lib.load_tokenizer(openai_hf_dir).fingerprint == openai_tok.fingerprint
    files = json.loads((openai_hf_dir / "tokenizer_config.json").read_text())
    assert files["tokenizer_class"] == "CLIPTokenizer"
    small = write_tiny_clip_tokenizer(tmp_path / "small")
    assert tok_lib.load_tokenizer(small).fingerprint != openai_tok.fingerprint


def test_tiny_bpe_load_encode_truncate(tmp_path):
    import shutil
    directory = write_tiny_clip_tokenizer(tmp_path / "tok")
    tok = tok_lib.load_tokenizer(directory)
    assert tok.bos_token_id != tok.eos_token_id
    texts = ["Angela Merkel meets François Hollande", " ".join(TINY_CORPUS[:5])]
    ids, mask, eot = tok.encode_with_mask(texts, context_length=16)
    assert ids.shape == (2, 16) and mask.shape == (2, 16) and eot.dtype == np.int32
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert ids[np.arange(2), eot].tolist() == [tok.eos_token_id] * 2
    assert eot[1] == 15                                             # truncated, EOT kept last
    assert (ids[0, eot[0] + 1:] == tok.pad_token_id).all() and eot[0] < 15
    assert mask.sum(-1).tolist() == (eot + 1).tolist()
    assert tok.decode(ids[0]) == "angela merkel meets françois hollande"
    # Pieces come from the backend, not a re-split of the text.
    pieces = tok.tokens(ids[0, 1:eot[0]])
    assert "".join(pieces) == "angelamerkelmeetsfrançoishollande"
    # The same vocabulary as vocab.json + merges.txt only: same ids, same fingerprint.
    other = tmp_path / "vocab_merges"
    other.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(directory / name, other / name)
    assert tok_lib.load_tokenizer(other).fingerprint == tok.fingerprint
    assert tok_lib.load_tokenizer(other).encode(texts, 16)[0].tolist() == ids.tolist()
    # A tokenizer.json that pads and truncates by itself (as some checkpoints do) changes nothing.
    from tokenizers import Tokenizer
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.enable_padding(length=40, pad_id=tok.eos_token_id)
    backend.enable_truncation(max_length=5)
    (tmp_path / "padded").mkdir()
    backend.save(str(tmp_path / "padded" / "tokenizer.json"))
    assert tok_lib.load_tokenizer(tmp_path / "padded").encode(texts, 16)[0].tolist() == ids.tolist()


def test_bad_tokenizer_paths_are_refused(tmp_path):
    with pytest.raises(EntityClipError, match="does not exist"):
        tok_lib.load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(EntityClipError, match="vocab.json"):
        tok_lib.load_tokenizer(tmp_path)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(EntityClipError, match="cannot read"):
        tok_lib.load_tokenizer(bad)


def test_cli_writes_hf_files(tmp_path, capsys):
    import argparse
    from entityclip_jax.data import commands
    parser = argparse.ArgumentParser()
    commands.configure_tokenizer(parser)
    out = tmp_path / "hf"
    commands.run_tokenizer(parser.parse_args(["--bpe", str(_openai_vocab()), "--out", str(out)]))
    assert "fingerprint sha256:" in capsys.readouterr().out
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    assert len(json.loads((out / "vocab.json").read_text())) == 49408
    assert tok_lib.load_tokenizer(out).encode(["a photo of a cat"])[0][0, :7].tolist() == \
        [49406, 320, 1125, 539, 320, 2368, 49407]


def test_ensure_openai_vocab_extracts_from_the_wheel(tmp_path):
    cached = _openai_vocab()  # skips when pip cannot reach open_clip_torch
    fresh = tok_lib.ensure_openai_vocab(tmp_path)  # a new cache dir: downloads and extracts again
    assert fresh == tmp_path / tok_lib.OPENAI_BPE_NAME
    assert fresh.read_bytes() == cached.read_bytes()
    assert not list(tmp_path.glob("*.partial"))
    assert tok_lib.ensure_openai_vocab(tmp_path) == fresh  # second call: from the cache
