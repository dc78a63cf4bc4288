"""CLI for the raw-data side: `entityclip tokenizer` (and `entityclip check-source`)."""
import collections

from entityclip_jax import storage
from entityclip_jax.data.example import SkipReport
from entityclip_jax.data.records import checked_examples
from entityclip_jax.data.tokenizer import build_hf_tokenizer_files, load_tokenizer
from entityclip_jax.data.write_command import add_source_arguments, source_examples


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
