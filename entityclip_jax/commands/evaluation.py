"""`entityclip eval` (Recall@K; --report: an HTML page), `classify` (zero-shot news sections) and
`compare` (two evaluations of one split, query by query): eval/evaluate.py, eval/compare.py."""
import json
import time

from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.compare import compare_results
from entityclip_jax.eval.evaluate import evaluate_retrieval, zero_shot_classification
from entityclip_jax.eval.html_report import DEFAULT_ROWS
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
    parser.add_argument("--report", action="store_true",
                        help="also each query's top 5 (retrieval_details.npz, for `compare`) and report.html, "
                             "a self-contained page of them")
    parser.add_argument("--report-rows", type=int, default=DEFAULT_ROWS,
                        help=f"queries per direction on the page; a larger split shows a random sample "
                             f"(default: {DEFAULT_ROWS})")


def run_eval(args):
    start = time.time()
    if args.report_rows < 1:
        raise EntityClipError(f"--report-rows must be at least 1, got {args.report_rows}")
    metrics, paths = evaluate_retrieval(args.checkpoint, args.data, args.split, args.out,
                                        args.batch_size, args.chunk_size, args.ties, args.report, args.report_rows)
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


def configure_compare(parser):
    parser.add_argument("results_a", metavar="RESULTS_A", help="an `entityclip eval --report` output directory")
    parser.add_argument("results_b", metavar="RESULTS_B", help="another one, of the same split")
    parser.add_argument("--out", help="the page to write (default: RESULTS_A/compare_<name of B>.html)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                        help=f"queries per direction on the page, those whose rank moved most "
                             f"(default: {DEFAULT_ROWS})")


def run_compare(args):
    if args.rows < 1:
        raise EntityClipError(f"--rows must be at least 1, got {args.rows}")
    out, summary = compare_results(args.results_a, args.results_b, args.out, max_rows=args.rows)
    for direction in summary:
        s = summary[direction]
        print(f"{s['label']}: {s['name_a']} fixed {s['fixed']} and broke {s['broken']} of {s['total']} "
              f"(rank 1 vs not); ranks better {s['better']}, worse {s['worse']}, same {s['same']}")
    print(f"wrote {out}")
