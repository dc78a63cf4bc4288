"""CLI for the raw-data side: `entityclip tokenizer` (and `entityclip check-source`)."""


def configure_tokenizer(parser):
    parser.add_argument("--bpe", required=True,
                        help="OpenAI's bpe_simple_vocab_16e6.txt.gz (ships inside the open_clip_torch wheel)")
    parser.add_argument("--out", required=True, help="directory for the Hugging Face tokenizer files")


def run_tokenizer(args):
    from entityclip_jax.data.tokenizer import build_hf_tokenizer_files, load_tokenizer
    out = build_hf_tokenizer_files(args.bpe, args.out)
    tokenizer = load_tokenizer(out)
    print(f"wrote {out}: vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint}")


def configure_check_source(parser):
    parser.add_argument("--kind", required=True, help="n24news, visualnews, goodnews, jsonl or csv")
    parser.add_argument("--root", required=True, help="dataset root folder (the release's layout)")
    parser.add_argument("--split", default="train", help="train, val/dev, test (VisualNews data.json: all)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="source option, e.g. split_ids=val_ids.txt (VisualNews), layout=original (GoodNews), "
                             "file=x.jsonl (JSONL/CSV)")
    parser.add_argument("--capdsc", default=None,
                        help="CapDsc_*.json explanations; 'auto' finds the release's file for the split")
    parser.add_argument("--explanations", default=None, help="explanation cache (JSONL from `entityclip explain`)")
    parser.add_argument("--policy", default="empty", choices=["empty", "skip", "error"],
                        help="what to do with an example that has no explanation")
    parser.add_argument("--report", default=None, help="write the skip report here as JSON")


def run_check_source(args):
    """Reads a split the way the writer will, and prints counts and skip reasons."""
    import collections
    import json

    from entityclip_jax.data.example import SkipReport
    from entityclip_jax.data.sources import read_source
    from entityclip_jax.data.sources import explanations
    from entityclip_jax.errors import EntityClipError

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise EntityClipError(f"--option {item!r} is not KEY=VALUE")
        options[key] = value
    report = SkipReport()
    examples = read_source(args.kind, args.root, args.split, report, **options)
    by_id, by_query, by_image = {}, {}, {}
    capdsc = args.capdsc
    if capdsc == "auto":
        capdsc = explanations.release_capdsc_path(args.kind, args.root, args.split)
        if capdsc is None:
            raise EntityClipError(f"no CapDsc file of the release found under {args.root} for split {args.split}")
    if capdsc:
        by_image = explanations.read_capdsc(capdsc)
    if args.explanations:
        by_id, by_query = explanations.read_explanation_cache(args.explanations)
    if capdsc or args.explanations:
        examples = explanations.attach_explanations(examples, by_id, by_query, by_image, args.policy, report)
    count, labels = 0, collections.Counter()
    for example in examples:
        count += 1
        labels[example.label] += 1
    summary = report.to_dict()
    print(f"{args.kind} {args.split}: {count} examples, {summary['skipped']} skipped {summary['by_reason']}, "
          f"{summary['noted']} noted {summary['notes_by_reason']}")
    if any(label is not None for label in labels):
        print(f"labels: {dict(labels.most_common())}")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
