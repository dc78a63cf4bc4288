"""`entityclip write-records`, `check-source` and `tokenizer`: raw dataset splits -> TFRecords.

write-records turns one split of a raw dataset into explanation-augmented TFRecords.
check-source takes the same source and image flags (add_source_arguments) and reads
the split the same way (source_examples + records.checked_examples), so its counts
are what write-records writes. tokenizer turns OpenAI's BPE file into Hugging Face
tokenizer files.
"""
import collections
import os

from entityclip_jax import storage
from entityclip_jax.data.example import SkipReport
from entityclip_jax.data.explanation_cache import read_explanations
from entityclip_jax.data.records import checked_examples, write_split
from entityclip_jax.data.sources import SOURCES, read_source
from entityclip_jax.data.sources.explanations import attach_explanations, read_capdsc, release_capdsc_path
from entityclip_jax.data.tokenizer import build_hf_tokenizer_files, load_tokenizer
from entityclip_jax.errors import EntityClipError

def add_source_arguments(parser):
    """The raw-split, explanation and image flags write-records and check-source share."""
    parser.add_argument("--source", "--kind", dest="source", required=True, choices=list(SOURCES),
                        help="layout of the raw dataset")
    parser.add_argument("--root", required=True, help="root directory of the raw dataset release")
    parser.add_argument("--split", required=True, help="split to read (train, dev/val, test, ...)")
    parser.add_argument("--explanations", help="explanation cache JSONL written by `entityclip explain`")
    parser.add_argument("--capdsc", help="the EntityCLIP release's CapDsc_*.json for this split; "
                                         "'auto' finds the release's file for the split")
    parser.add_argument("--missing-explanation", "--policy", dest="missing_explanation",
                        choices=("empty", "skip", "error"), default="empty",
                        help="what to do with a record that has no explanation (default: empty)")
    parser.add_argument("--source-option", "--option", dest="source_option", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="adapter option, e.g. file=extra.jsonl (jsonl/csv), layout=release (goodnews), "
                             "split_ids=val_ids.txt (visualnews)")
    parser.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs (default 90)")
    parser.add_argument("--workers", type=int, help="image-checking processes (default: all cores)")


def configure_write_records(parser):
    add_source_arguments(parser)
    parser.add_argument("--tokenizer", required=True,
                        help="Hugging Face CLIP checkpoint/tokenizer directory or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--tokenizer-style", choices=("openai", "transformers"), default="openai",
                        help="openai (default): clip.tokenize exactly, cleaned text, 0 padding; "
                             "transformers: CLIPTokenizer's ids, no cleaning, the checkpoint's padding")
    parser.add_argument("--out", required=True, help="records directory (other splits in it are kept)")
    parser.add_argument("--examples-per-shard", type=int, default=1024)
    parser.add_argument("--context-length", type=int, default=77)


def _options(pairs):
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EntityClipError(f"--source-option {pair!r} must look like KEY=VALUE")
        options[key] = value
    return options


def source_examples(args, report):
    """The split's RawExamples with explanations attached, as add_source_arguments' flags say."""
    by_id, by_query = {}, {}
    if args.explanations:
        by_id, by_query = read_explanations(args.explanations)
    capdsc = args.capdsc
    if capdsc == "auto":
        capdsc = release_capdsc_path(args.source, args.root, args.split)
        if capdsc is None:
            raise EntityClipError(f"no CapDsc file of the release found under {args.root} for split {args.split}")
    by_image = read_capdsc(capdsc) if capdsc else {}
    examples = read_source(args.source, args.root, args.split, report, **_options(args.source_option))
    return attach_explanations(examples, by_id, by_query, by_image, args.missing_explanation, report)


def run_write_records(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    storage.check_writable(args.out, "choose an --out you can write to, or fix its permissions")

    tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_style)
    report = SkipReport()
    entry = write_split(source_examples(args, report), args.out, args.split, tokenizer, report,
                        context_length=args.context_length, examples_per_shard=args.examples_per_shard,
                        max_side=args.max_side, jpeg_quality=args.jpeg_quality, workers=args.workers,
                        source=args.source)
    skipped = entry["skipped"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped["by_reason"].items())
    print(f"wrote {entry['num_examples']} {args.split} examples in {len(entry['shards'])} shards to {args.out}; "
          f"skipped {skipped['skipped']}{f' ({reasons})' if reasons else ''}; "
          f"empty explanations {skipped.get('notes_by_reason', {}).get('empty_explanation', 0)}")
    return 0


def configure_tokenizer(parser):
    parser.add_argument("--bpe", required=True,
                        help="OpenAI's bpe_simple_vocab_16e6.txt.gz (ships inside the open_clip_torch wheel)")
    parser.add_argument("--out", required=True, help="directory for the Hugging Face tokenizer files")


def run_tokenizer(args):
    out = build_hf_tokenizer_files(args.bpe, args.out)
    tokenizer = load_tokenizer(out)
    print(f"wrote {out}: vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint}")


def configure_check_source(parser):
    add_source_arguments(parser)
    parser.add_argument("--report", default=None, help="write the skip report here as JSON")


def run_check_source(args):
    """Reads a split as write-records does (images decoded too), and prints counts and skip reasons."""
    report = SkipReport()
    examples = checked_examples(source_examples(args, report), report, max_side=args.max_side,
                                jpeg_quality=args.jpeg_quality, workers=args.workers)
    count, labels = 0, collections.Counter()
    for example, _ in examples:
        count += 1
        labels[example.label] += 1
    summary = report.to_dict()
    print(f"{args.source} {args.split}: {count} examples, {summary['skipped']} skipped {summary['by_reason']}, "
          f"{summary['noted']} noted {summary['notes_by_reason']}")
    if any(label is not None for label in labels):
        print(f"labels: {dict(labels.most_common())}")
    if args.report:
        storage.write_json_atomic(args.report, summary, indent=1)
