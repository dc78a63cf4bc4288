"""ClipTokenizer against references independent of it: OpenAI's own tokenizer code
(open_clip's copy of simple_tokenizer, read from the open_clip_torch wheel, never
installed) and transformers' CLIPTokenizer built from OpenAI's vocabulary by that code;
a tiny BPE trained at test time for everything that must run without the wheel."""
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys
import zipfile

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
# What OpenAI's cleaning changes: curly quotes and apostrophes, HTML entities (escaped
# twice too), dashes, decomposed accents, mojibake, CJK, emoji, blank text.
CLEANING_CAPTIONS = [
    "The Queen’s speech",
    "R&amp;B singer",
    "‘Hamilton’ star Lin‑Manuel Miranda’s “last” show",
    "Tom &amp;amp; Jerry &quot;reunion&quot; &#8212; at the O&#39;Reilly Theater",
    "Trump — Clinton – debate … in St. Louis",
    "Cafe\u0301 owner Zoe\u0308 Smith; Ångström Œuvre ÉCOLE",
    "cafÃ© in SÃ£o Paulo, BeyoncÃ© â€œliveâ€\x9d",
    "東京オリンピック 2020 开幕式 서울",
    "Fans cheer 🎉🇫🇷 as Mbappé scores ⚽️ 👍🏽",
    "\u00a0non\u2009breaking\u3000spaces\u200b and zero width",
    "   ",
    "",
]
LONG_TEXT = " ".join(["Barack Obama and Vladimir Putin discuss Syria in Geneva"] * 30)
LONG_CURLY = " ".join(["The Queen’s “Christmas” message — 2016 &amp; beyond"] * 20)


@functools.lru_cache(maxsize=None)
def _open_clip_wheel_files(cache):
    """open_clip/tokenizer.py and the BPE file unpacked from the open_clip_torch wheel
    (`pip download --no-deps`: read, never installed). (directory, error)."""
    cache = pathlib.Path(cache)
    target = cache / "open_clip"
    if (target / "tokenizer.py").is_file() and (target / tok_lib.OPENAI_BPE_NAME).is_file():
        return target, None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--timeout", "30", "--retries", "1", "open_clip_torch", "-d", str(cache)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, str(err)
    wheels = sorted(cache.glob("open_clip_torch-*.whl"))
    if result.returncode != 0 or not wheels:
        return None, result.stderr.strip()[-300:]
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in ("open_clip/tokenizer.py", f"open_clip/{tok_lib.OPENAI_BPE_NAME}"):
            wheel.extract(name, cache)
    return target, None


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory):
    directory, error = _open_clip_wheel_files(str(tmp_path_factory.getbasetemp() / "open_clip_wheel"))
    if directory is None:
        pytest.skip(f"pip could not fetch the open_clip_torch wheel: {error}")
    return directory


@pytest.fixture(scope="session")
def openai_reference(open_clip_dir):
    """OpenAI's SimpleTokenizer as open_clip ships it (clean="lower": fix_text, unescape x2,
    whitespace, lower), imported from the unpacked file; __call__ is clip.tokenize."""
    spec = importlib.util.spec_from_file_location("wheel_open_clip_tokenizer", open_clip_dir / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(open_clip_dir / tok_lib.OPENAI_BPE_NAME))


def _reference_ids(reference, texts, context_length=77):
    return reference(texts, context_length=context_length).numpy().tolist()


def _openai_vocab():
    path, error = _fetch_openai_vocab()
    if path is None:
        pytest.skip(f"OpenAI vocabulary unavailable (pip could not fetch open_clip_torch): {error}")
    return path


@functools.lru_cache(maxsize=None)
def _fetch_openai_vocab():
    """Fetched once per session; a failure is remembered too, so pip is not retried per test."""
    try:
        return tok_lib.ensure_openai_vocab(), None
    except EntityClipError as err:
        return None, str(err)


@pytest.fixture(scope="module")
def openai_tok():
    return tok_lib.load_tokenizer(_openai_vocab())


@pytest.fixture(scope="module")
def openai_hf_dir(tmp_path_factory):
    return tok_lib.build_hf_tokenizer_files(_openai_vocab(), tmp_path_factory.mktemp("clip_tok"))


def test_photo_of_a_cat(openai_tok):
    ids, eot = openai_tok.encode(["a photo of a cat"])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert eot.tolist() == [6]
    assert (ids[0, 7:] == 0).all() and openai_tok.pad_token_id == 0  # clip.tokenize's padding
    assert (openai_tok.bos_token_id, openai_tok.eos_token_id, openai_tok.vocab_size) == (49406, 49407, 49408)


def test_issue_examples_match_openai(openai_tok):
    ids, eot = openai_tok.encode(["The Queen’s speech", "R&amp;B singer"])
    assert ids[0, :eot[0] + 1].tolist() == [49406, 518, 2997, 568, 4902, 49407]
    assert ids[1, :eot[1] + 1].tolist() == [49406, 337, 261, 321, 5108, 49407]


def test_openai_style_equals_clip_tokenize(openai_tok, openai_reference):
    """Whole rows, EOT and the 0 padding included, as clip.tokenize gives them."""
    texts = NEWS_CAPTIONS + CLEANING_CAPTIONS + [LONG_TEXT, LONG_CURLY]
    ids, mask, eot = openai_tok.encode_with_mask(texts)
    want = _reference_ids(openai_reference, texts)
    for row, text in enumerate(texts):
        assert ids[row].tolist() == want[row], text
    assert openai_tok.pad_token_id == 0
    assert (ids.argmax(-1) == eot).all()  # METHOD.md's argmax finds EOT
    assert mask.sum(-1).tolist() == (eot + 1).tolist()
    # Short contexts truncate as clip.tokenize does: EOT replaces the last piece.
    short = openai_tok.encode(texts, context_length=8)[0]
    assert short.tolist() == _reference_ids(openai_reference, texts, context_length=8)


def test_transformers_style_equals_clip_tokenizer(openai_hf_dir, openai_reference):
    """style="transformers": transformers' CLIPTokenizer built here from OpenAI's own encoder
    and merge ranks (not from the files the code under test wrote): no cleaning, EOT padding."""
    from transformers import CLIPTokenizer
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(token, token): i for token, i in openai_reference.encoder.items()}
    merges = [pair for pair, _ in sorted(openai_reference.bpe_ranks.items(), key=lambda kv: kv[1])]
    hf = CLIPTokenizer(vocab=vocab, merges=merges)
    ours = tok_lib.load_tokenizer(openai_hf_dir, style="transformers")
    texts = NEWS_CAPTIONS + CLEANING_CAPTIONS + [LONG_TEXT]
    ids, mask, eot = ours.encode_with_mask(texts)
    expected = hf(texts, padding="max_length", truncation=True, max_length=77)
    assert ids.tolist() == expected["input_ids"]
    assert mask.tolist() == expected["attention_mask"]
    assert hf.pad_token_id == ours.pad_token_id == 49407
    # The styles differ where the cleaning matters, and only in the padding elsewhere.
    openai_ids, _, openai_eot = tok_lib.load_tokenizer(openai_hf_dir).encode_with_mask(texts)
    assert ids[0, :eot[0] + 1].tolist() == openai_ids[0, :openai_eot[0] + 1].tolist()
    row = len(NEWS_CAPTIONS)  # "The Queen’s speech"
    assert ids[row, :eot[row] + 1].tolist() == [49406, 518, 2997, 728, 503, 338, 4902, 49407]


def test_style_is_part_of_the_fingerprint(openai_hf_dir):
    openai = tok_lib.load_tokenizer(openai_hf_dir)
    transformers_style = tok_lib.load_tokenizer(openai_hf_dir, style="transformers")
    assert openai.style == "openai" and transformers_style.style == "transformers"
    assert openai.fingerprint != transformers_style.fingerprint
    with pytest.raises(EntityClipError, match="style"):
        tok_lib.load_tokenizer(openai_hf_dir, style="ftfy")


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
    from entityclip_jax.commands import records as commands
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


def test_ensure_openai_vocab_extracts_from_the_wheel(tmp_path, open_clip_dir):
    fresh = tok_lib.ensure_openai_vocab(tmp_path)  # a new cache dir: downloads and extracts again
    assert fresh == tmp_path / tok_lib.OPENAI_BPE_NAME
    assert fresh.read_bytes() == (open_clip_dir / tok_lib.OPENAI_BPE_NAME).read_bytes()
    assert not list(tmp_path.glob("*.partial"))
    assert tok_lib.ensure_openai_vocab(tmp_path) == fresh  # second call: from the cache
