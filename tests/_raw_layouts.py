"""Test-time builders: a tiny CLIP-style BPE tokenizer and tiny raw datasets in each
release layout (N24News, VisualNews, GoodNews, EntityCLIP GoodNews, JSONL, CSV).

Everything is written into a caller-given directory; nothing is downloaded. Other
test files may import these builders (`from tests._raw_layouts import ...` or
`from _raw_layouts import ...`, both work with pytest's rootdir on sys.path).
"""
import csv
import io
import json
import pathlib

import numpy as np

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

TINY_CORPUS = [
    "a photo of a cat", "Angela Merkel meets François Hollande in Besançon",
    "President Obama speaks at the White House on Tuesday",
    "Queen Elizabeth II waves at the crowd in London",
    "the New York Yankees beat the Boston Red Sox 5-3",
    "\"We will win,\" said the coach of Real Madrid",
] * 20


def write_tiny_clip_tokenizer(out_dir, corpus=TINY_CORPUS, vocab_size=400):
    """Trains a small byte-level BPE with CLIP's pipeline and writes it as a HF directory
    holding both layouts: tokenizer.json, and vocab.json + merges.txt.

    BPE training breaks ties in hash order, so two calls may give different vocabularies:
    train once and copy files when a test needs the same vocabulary twice.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="",
                                   unk_token=CLIP_EOS, fuse_unk=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[CLIP_BOS, CLIP_EOS], show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    backend.save(str(out / "tokenizer.json"))
    backend.model.save(str(out))  # vocab.json + merges.txt
    return out


def write_jpeg(path, seed=0, size=(8, 6)):
    """A tiny random JPEG written by PIL."""
    from PIL import Image
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def _write_json(path, obj):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


CAPTIONS = ["Angela Merkel meets François Hollande in Besançon",
            "President Obama speaks at the White House",
            "Queen Elizabeth II waves at the crowd in London"]
LABELS = ["world", "politics", "arts"]


def write_n24news(root, splits=("train", "dev", "test"), n=3, layout="original"):
    """N24News: nytimes_{split}.json (JSON list) + images/{image_id}.jpg.

    layout "entityclip": news/nytimes_{split}.json + imgs/{image_id}.jpg and
    news/CapDsc_mistral_{split}.json keyed by "<image_id>.jpg" (the release's layout).
    """
    root = pathlib.Path(root)
    json_dir, image_dir = (root / "news", root / "imgs") if layout == "entityclip" else (root, root / "images")
    for s, split in enumerate(splits):
        records = []
        for i in range(n):
            image_id = f"{split}{i:03d}"
            write_jpeg(image_dir / f"{image_id}.jpg", seed=10 * s + i)
            records.append({"section": LABELS[i % 3], "headline": f"Headline {split} {i}",
                            "abstract": "An abstract.", "caption": CAPTIONS[i % 3],
                            "image_url": f"https://example.com/{image_id}.jpg",
                            "article_url": f"https://example.com/{image_id}.html",
                            "image_id": image_id, "body": "Body text."})
        _write_json(json_dir / f"nytimes_{split}.json", records)
        if layout == "entityclip":
            _write_json(json_dir / f"CapDsc_mistral_{split}.json",
                        {f"{r['image_id']}.jpg": f"Explanation of {r['image_id']}." for r in records})
    return root


def write_visualnews(root, splits=("train", "val", "test"), n=3, layout="entityclip"):
    """VisualNews records {id, caption, topic, source, image_path, article_path}.

    layout "entityclip": {split}.json per split, images under images/<outlet>/images/...,
      CapDsc_mistral_{split}.json keyed by an absolute path on another machine;
    layout "original": origin/data.json with paths relative to origin/, plus
      {split}_ids.txt (one id per line) to pass as split_ids.
    The two outlets reuse image file names, as the real release does.
    """
    root = pathlib.Path(root)
    base = root / "images" if layout == "entityclip" else root / "origin"
    all_records, next_id = [], 0
    for split in splits:
        records = []
        for i in range(n):
            outlet = ("bbc", "guardian")[i % 2]
            rel = f"{outlet}/images/{split}/{i // 2:03d}.jpg"  # bbc/.../000.jpg and guardian/.../000.jpg
            write_jpeg(base / rel, seed=next_id)
            records.append({"id": 1000 + next_id, "caption": CAPTIONS[i % 3], "topic": LABELS[i % 3],
                            "source": outlet, "image_path": "./" + rel,
                            "article_path": f"./{outlet}/articles/{1000 + next_id}.txt"})
            next_id += 1
        if layout == "entityclip":
            _write_json(root / f"{split}.json", records)
            _write_json(root / f"CapDsc_mistral_{split}.json",
                        {f"/star/someone/VisualNews/images/{r['image_path'][1:]}": f"Explanation of {r['id']}."
                         for r in records})
        else:
            (root / f"{split}_ids.txt").write_text("".join(f"{r['id']}\n" for r in records))
        all_records += records
    if layout == "original":
        _write_json(root / "origin" / "data.json", all_records)
    return root


def write_goodnews(root, splits=("train", "val", "test"), n=2, image_dir="resized"):
    """GoodNews: captioning_dataset.json {article: {images: {idx: caption}, headline: {...}}}
    + img_splits.json {"<article>_<idx>.jpg": split} + images under resized/ (or images/)."""
    root = pathlib.Path(root)
    dataset, img_splits = {}, {}
    for s, split in enumerate(splits):
        article = f"{s:04x}abcd"
        dataset[article] = {"images": {str(i): CAPTIONS[i % 3] for i in range(n)},
                            "headline": {"main": f"Headline of {split}", "print_headline": ""},
                            "article": "Body.", "article_url": "https://example.com"}
        for i in range(n):
            name = f"{article}_{i}.jpg"
            write_jpeg(root / image_dir / name, seed=10 * s + i)
            img_splits[name] = split
    _write_json(root / "captioning_dataset.json", dataset)
    _write_json(root / "img_splits.json", img_splits)
    return root


def write_goodnews_entityclip(root, splits=("train", "val", "test"), n=2):
    """EntityCLIP release GoodNews: new_goodnews_capim_{split}.json, a JSON list of
    {image_id: "<article>_<idx>.jpg", captioning, title}, images under images/, and
    train_cap_individual/New_Corr_CapDsc_mistral_{split}.json keyed by file name."""
    root = pathlib.Path(root)
    for s, split in enumerate(splits):
        records = []
        for i in range(n):
            image_id = f"{s:04x}ef01_{i}.jpg"
            write_jpeg(root / "images" / image_id, seed=10 * s + i)
            records.append({"image_id": image_id, "captioning": CAPTIONS[i % 3] + "\r\nPhoto: AP",
                            "title": f"Title {split} {i}"})
        _write_json(root / f"new_goodnews_capim_{split}.json", records)
        _write_json(root / "train_cap_individual" / f"New_Corr_CapDsc_mistral_{split}.json",
                    {r["image_id"]: f"Explanation of {r['image_id']}." for r in records})
    return root


def generic_rows(root, n=3, prefix="img"):
    root = pathlib.Path(root)
    rows = []
    for i in range(n):
        write_jpeg(root / "pics" / f"{prefix}{i}.jpg", seed=i)
        rows.append({"id": f"{prefix}{i}", "image": f"pics/{prefix}{i}.jpg", "query": CAPTIONS[i % 3],
                     "explanation": f"Explanation {i}.", "label": LABELS[i % 3]})
    return rows


def write_jsonl(root, split="train", rows=None):
    root = pathlib.Path(root)
    rows = generic_rows(root) if rows is None else rows
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_csv(root, split="train", rows=None):
    root = pathlib.Path(root)
    rows = generic_rows(root) if rows is None else rows
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (root / f"{split}.csv").write_text(buf.getvalue(), encoding="utf-8")
    return root
