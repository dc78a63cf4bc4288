"""`entityclip eval` (Recall@K) and `entityclip classify` (zero-shot news sections): eval/evaluate.py."""
import json
import time

from entityclip_jax.eval.evaluate import evaluate_retrieval, zero_shot_classification
from entityclip_jax.eval.report import markdown_table


def _add_common(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir, towers dir, Hugging Face CLIPModel dir or OpenAI .pt")
    parser.add_argument("--data", required=True, help="TFRecord dataset directory (write-records output)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="directory for the JSON, Markdown and PNG results")
    parser.add_argument("--batch-size", type=int, default=64)


def configure_eval(parser):
    _add_common(parser)
    parser.add_argument("--chunk-size", type=int, default=1024, help="similarity rows scored at a time")
    parser.add_argument("--ties", choices=("pessimistic", "optimistic"), default="pessimistic",
                        help="tied scores count against the query (default: a collapsed model scores 0, not 100)")


def run_eval(args):
    start = time.time()
    metrics, paths = evaluate_retrieval(args.checkpoint, args.data, args.split, args.out,
                                        args.batch_size, args.chunk_size, args.ties)
    print(markdown_table(metrics))
    print(f"{metrics['num_images']} images, {metrics['num_texts']} texts in {time.time() - start:.1f}s; "
          f"wrote {', '.join(str(p) for p in _as_list(paths))}")


def configure_classify(parser):
    _add_common(parser)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or OpenAI .gz vocabulary")
    parser.add_argument("--template", help="class prompt template with {section}")


def run_classify(args):
    paths = zero_shot_classification(args.checkpoint, args.data, args.split, args.out, args.tokenizer,
                                     template=args.template, batch_size=args.batch_size)
    summary = json.loads(paths["json"].read_text())
    print(f"zero-shot accuracy {summary['accuracy']:.1f}% over {summary['num_examples']} articles; "
          f"wrote {paths['json']} and {paths['png']}")


def _as_list(paths):
    return list(paths.values()) if isinstance(paths, dict) else list(paths)
