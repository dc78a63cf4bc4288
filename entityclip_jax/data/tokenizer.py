"""The CLIP BPE tokenizer: context 77, BOS first, EOT kept last on truncation.

Encoding runs on the Rust `tokenizers` pipeline that transformers' CLIPTokenizer
builds (NFC + whitespace collapse + lowercase, CLIP's word regex, byte-level BPE
with the "</w>" end-of-word suffix). We add BOS/EOT and truncate ourselves, the
way OpenAI's clip.tokenize does: [BOS] + pieces[:n - 2] + [EOT], so EOT is always
present and its index per row is known exactly.

Two styles (part of the fingerprint, so records of one are never read as the other):
  "openai"        (default) exactly OpenAI's clip.tokenize, which CLIP was pretrained
                  and the EntityCLIP release trained with: the text is cleaned first
                  (ftfy.fix_text, HTML entities unescaped twice, whitespace collapsed,
                  lower-cased; curly quotes become straight ones) and rows are padded
                  with id 0 after EOT (the release's experts attend to that padding).
  "transformers"  transformers' CLIPTokenizer: no cleaning, padded with the
                  checkpoint's pad token (49407 for Hugging Face's openai/clip-*).
Use the returned `eot_index`; the argmax of the ids (METHOD.md) finds the same
position for the OpenAI vocabulary with either padding (argmax returns the FIRST maximum).
"""
import gzip
import hashlib
import html
import json
import subprocess
import sys
import tempfile
import zipfile

import ftfy
import numpy as np
from tokenizers import Tokenizer

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.hub import resolve_checkpoint

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
OPENAI_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_NUM_MERGES = 49152 - 256 - 2  # what OpenAI's simple_tokenizer keeps
DEFAULT_CACHE = storage.join("~", ".cache", "entityclip_jax")
STYLES = ("openai", "transformers")
OPENAI_PAD_ID = 0  # clip.tokenize's zeros after EOT


def openai_clean(text):
    """OpenAI's simple_tokenizer cleaning: basic_clean, whitespace_clean, lower()."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


class ClipTokenizer:
    """CLIP tokenizer over a `tokenizers.Tokenizer` backend (a fast CLIP BPE)."""

    def __init__(self, backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, style="openai"):
        if style not in STYLES:
            raise EntityClipError(f"unknown tokenizer style {style!r}; choose one of {STYLES}")
        self.backend = backend
        backend.no_padding()     # a checkpoint's tokenizer.json may pad/truncate; we do both ourselves
        backend.no_truncation()
        self.style = style
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = self._token_id(bos_token, "bos")
        self.eos_token_id = self._token_id(eos_token, "eos")
        self.pad_token_id = OPENAI_PAD_ID if style == "openai" else self._token_id(pad_token, "pad")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.fingerprint = _fingerprint(backend, style, self.pad_token_id, bos_token, eos_token)

    def _token_id(self, token, role):
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise EntityClipError(f"the tokenizer vocabulary has no {role} token {token!r}; "
                                  "use a CLIP tokenizer (tokenizer.json or vocab.json + merges.txt)")
        return token_id

    def encode_with_mask(self, texts, context_length=77):
        """Returns (ids int32 [N, L], mask int32 [N, L], eot_index int32 [N])."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        if context_length < 2:
            raise EntityClipError(f"context_length must be at least 2 (BOS and EOT), got {context_length}")
        texts = [openai_clean(t) for t in texts] if self.style == "openai" else list(texts)
        pieces = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        ids = np.full((len(pieces), context_length), self.pad_token_id, np.int32)
        eot_index = np.empty(len(pieces), np.int32)
        for row, body in enumerate(pieces):
            body = body[:context_length - 2]
            ids[row, 0] = self.bos_token_id
            ids[row, 1:1 + len(body)] = body
            ids[row, 1 + len(body)] = self.eos_token_id
            eot_index[row] = 1 + len(body)
        mask = (np.arange(context_length)[None, :] <= eot_index[:, None]).astype(np.int32)
        return ids, mask, eot_index

    def encode(self, texts, context_length=77):
        """Returns (ids int32 [N, context_length], eot_index int32 [N])."""
        ids, _, eot_index = self.encode_with_mask(texts, context_length)
        return ids, eot_index

    def decode(self, ids):
        """Text of one row of ids; stops at the first EOT (the padding follows it), drops BOS."""
        ids = [int(i) for i in ids]
        if self.eos_token_id in ids:
            ids = ids[:ids.index(self.eos_token_id)]
        ids = [i for i in ids if i != self.bos_token_id]
        text = self.backend.decode(ids, skip_special_tokens=True)
        return " ".join(text.replace("</w>", " ").split())

    def tokens(self, ids):
        """Readable word pieces of one row of ids (for attention views)."""
        return [self.backend.decode([int(i)], skip_special_tokens=False).replace("</w>", "")
                for i in ids]


def _fingerprint(backend, style, pad_id, *special_tokens):
    """Hash of vocabulary + merges + special tokens + style and padding, independent of file layout."""
    model = json.loads(backend.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "merges": merges, "special": list(special_tokens),
                          "style": style, "pad_id": pad_id},
                         ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _special_tokens(directory):
    """bos/eos/pad token strings from special_tokens_map.json or tokenizer_config.json."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            try:
                settings = dict(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as err:
                raise EntityClipError(f"{path} is not a JSON object ({err}); download the tokenizer again") from None
            for key, value in settings.items():
                if key in ("bos_token", "eos_token", "pad_token") and value:
                    found[key] = value.get("content") if isinstance(value, dict) else value
    return (found.get("bos_token", BOS_TOKEN), found.get("eos_token", EOS_TOKEN),
            found.get("pad_token", found.get("eos_token", EOS_TOKEN)))


def load_tokenizer(path, style="openai"):
    """ClipTokenizer from a HF checkpoint directory or hub id, or OpenAI's bpe_simple_vocab_16e6.txt.gz.

    style: "openai" (clip.tokenize: cleaned text, 0 padding) or "transformers" (module docstring).
    """
    spec = resolve_checkpoint(str(path))
    path = storage.path(spec)
    if path.is_file() and path.name.endswith(".gz"):
        with tempfile.TemporaryDirectory() as tmp:
            build_hf_tokenizer_files(spec, tmp)
            return load_tokenizer(tmp, style)
    if not path.is_dir():
        raise EntityClipError(f"tokenizer path {path} does not exist; give a Hugging Face CLIP checkpoint "
                              f"directory (tokenizer.json, or vocab.json + merges.txt) or {OPENAI_BPE_NAME}")
    if (path / "tokenizer.json").is_file():
        backend = Tokenizer.from_str((path / "tokenizer.json").read_text(encoding="utf-8"))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        backend = _clip_backend(path)
    else:
        raise EntityClipError(f"{path} holds no tokenizer.json and no vocab.json + merges.txt; "
                              "point at a Hugging Face CLIP checkpoint directory, or build one with "
                              "`entityclip tokenizer --bpe bpe_simple_vocab_16e6.txt.gz --out DIR`")
    return ClipTokenizer(backend, *_special_tokens(path), style=style)


def _clip_backend(directory):
    """The fast CLIP pipeline exactly as transformers builds it from vocab.json + merges.txt
    (of a local or gs:// directory: only those two files are read)."""
    import transformers  # lazy: heavy, only for a directory without tokenizer.json
    fast = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)  # one class since v5
    if not storage.is_remote(directory):
        return fast.from_pretrained(str(directory)).backend_tokenizer
    with tempfile.TemporaryDirectory() as tmp:  # transformers reads local files only
        for name in ("vocab.json", "merges.txt"):
            storage.copy(storage.join(directory, name), storage.join(tmp, name))
        return fast.from_pretrained(tmp).backend_tokenizer


def bytes_to_unicode():
    """OpenAI's reversible byte -> printable unicode character table (GPT-2 / CLIP).

    Order matters: the vocabulary lists the printable bytes first, then the others.
    """
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def openai_vocab_and_merges(bpe_gz_path):
    """vocab dict and merges list as OpenAI's simple_tokenizer.SimpleTokenizer builds them."""
    try:
        lines = gzip.decompress(storage.path(bpe_gz_path).read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise EntityClipError(f"cannot read {bpe_gz_path} as OpenAI's gzipped BPE merges file: {err}")
    merges = [tuple(line.split()) for line in lines[1:OPENAI_NUM_MERGES + 1]]
    if len(merges) < 1 or any(len(m) != 2 for m in merges):
        raise EntityClipError(f"{bpe_gz_path} is not an OpenAI BPE merges file (lines of two symbols)")
    byte_chars = list(bytes_to_unicode().values())
    symbols = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    return {s: i for i, s in enumerate(symbols)}, merges


def build_hf_tokenizer_files(bpe_gz_path, out_dir):
    """Writes vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json that transformers' CLIPTokenizer(Fast) loads. out_dir may be on gs://
    (built locally, then copied up)."""
    vocab, merges = openai_vocab_and_merges(bpe_gz_path)
    out = storage.path(out_dir)
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory() as tmp:
            build_hf_tokenizer_files(bpe_gz_path, tmp)
            for name in storage.listdir(tmp):
                storage.copy(storage.join(tmp, name), out / name)
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").unlink(missing_ok=True)  # a stale one would win over the new vocab/merges
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                    encoding="utf-8")
    backend = _clip_backend(out)
    backend.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=77,
                  do_lower_case=True, errors="replace", clean_up_tokenization_spaces=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def ensure_openai_vocab(cache_dir=None):
    """Path to OpenAI's bpe_simple_vocab_16e6.txt.gz, taken once from the open_clip_torch
    wheel (`pip download --no-deps`, never installed) and cached."""
    cache = storage.path(cache_dir or DEFAULT_CACHE)
    target = cache / OPENAI_BPE_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--timeout", "30", "--retries", "1", "open_clip_torch", "-d", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise EntityClipError(f"could not run pip to fetch open_clip_torch: {err}")
        wheels = sorted(storage.path(tmp).glob("open_clip_torch-*.whl"))
        if result.returncode != 0 or not wheels:
            raise EntityClipError("pip could not download the open_clip_torch wheel "
                                  f"({result.stderr.strip()[-300:]}); copy {OPENAI_BPE_NAME} to {target}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [n for n in wheel.namelist() if n.endswith("/" + OPENAI_BPE_NAME)]
            if not members:
                raise EntityClipError(f"{wheels[0].name} holds no {OPENAI_BPE_NAME}")
            storage.write_bytes_atomic(target, wheel.read(members[0]))  # never a half-written cache file
    return target
