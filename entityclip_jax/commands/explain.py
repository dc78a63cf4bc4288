"""`entityclip explain` and `entityclip explain-import`."""
import itertools
import json
import signal
import sys

from entityclip_jax import storage
from entityclip_jax.data.example import SkipReport
from entityclip_jax.data.sources import SOURCES, read_source
from entityclip_jax.errors import EXIT_DONE, EXIT_SOME_FAILED, EXIT_STOPPED_EARLY, EntityClipError
from entityclip_jax.explain.backends.openai_http import OpenAIHTTPBackend
from entityclip_jax.explain.backends.transformers_lm import TransformersBackend
from entityclip_jax.explain.prompts import load_prompt
from entityclip_jax.explain.release import import_capdsc
from entityclip_jax.explain.runner import generate_explanations


def _add_input(parser, required):
    group = parser.add_argument_group("input (a plain JSONL of {id, query}, or a dataset source)")
    if required:
        group.add_argument("--queries", metavar="FILE.jsonl", help="one JSON object {\"id\", \"query\"} per line")
    group.add_argument("--source", choices=list(SOURCES), help="dataset source adapter")
    group.add_argument("--root", help="dataset root directory (with --source)")
    group.add_argument("--split", default="train", help="split to read (with --source; default train)")


def configure_explain(parser):
    _add_input(parser, required=True)
    parser.add_argument("--out", required=True, metavar="CACHE.jsonl", help="explanation cache (appended, resumable)")
    parser.add_argument("--limit", type=int, help="explain only the first N input records")
    parser.add_argument("--backend", choices=("transformers", "http"), default="transformers",
                        help="local transformers model (default: offline Gemma-3 270M) or an OpenAI-compatible server")
    parser.add_argument("--prompt", help="template file or string with {query} (default: built-in, by --prompt-style)")
    parser.add_argument("--prompt-name", help="name in the prompt version (default: file name or 'custom')")
    parser.add_argument("--prompt-style", choices=("chat", "completion"),
                        help="chat: instruction prompt as a chat message; completion: few-shot text that stops at "
                             "a newline, for base models (default: chat for http, completion for transformers)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, help="requests (http, default 8) or batches (transformers, "
                        "default 1) in flight")
    parser.add_argument("--keep-failed", action="store_true", help="do not retry queries that failed in an earlier run")
    parser.add_argument("--quality-retries", type=int, default=2, help="sampled retries after a degenerate answer")
    parser.add_argument("--max-consecutive-failures", type=int, default=20,
                        help="stop the run after this many failed queries in a row (0: never)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    http = parser.add_argument_group("http backend (vLLM, llama.cpp server, Ollama, TGI)")
    http.add_argument("--base-url", default="http://localhost:8000/v1", help="server URL up to /v1")
    http.add_argument("--model", help="model name the server serves")
    http.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    http.add_argument("--connect-timeout", type=float, default=10.0)
    http.add_argument("--read-timeout", type=float, default=120.0, help="seconds one socket read may wait")
    http.add_argument("--request-timeout", type=float, default=300.0,
                      help="seconds one whole request may take, however the server drips its answer")
    http.add_argument("--retries", type=int, default=5, help="retries on timeout, 5xx, 429, malformed JSON")
    http.add_argument("--backoff-base", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    http.add_argument("--backoff-max", type=float, default=60.0)
    http.add_argument("--temperature", type=float, default=0.0)
    local = parser.add_argument_group("transformers backend")
    local.add_argument("--model-path", help="model directory or .gguf file (default: Gemma-3 270M GGUF package)")
    local.add_argument("--model-name", help="model name in the cache key (default: file or directory name)")
    local.add_argument("--batch-size", type=int, default=8)
    local.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    local.add_argument("--no-gguf-cache", action="store_true",
                       help="do not keep a de-quantized copy of a GGUF model under $ENTITYCLIP_CACHE "
                            "(default ~/.cache/entityclip_jax; loads then take a minute instead of seconds)")


def configure_explain_import(parser):
    parser.add_argument("--capdsc", required=True, metavar="FILE", help="release file CapDsc_mistral_{split}.json")
    parser.add_argument("--out", required=True, metavar="CACHE.jsonl", help="explanation cache to append to")
    _add_input(parser, required=False)


def _read_queries_jsonl(path, report):
    if not storage.path(path).is_file():
        raise EntityClipError(f"--queries {path} not found; give a JSONL file with one {{\"id\", \"query\"}} per line")
    with storage.open(path, errors="replace") as f:  # local or gs://
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield str(record["id"]), record["query"]
            except (ValueError, KeyError, TypeError):
                report.skip(f"line {number}", "bad_line: not a JSON object with id and query")


def _examples(args, report):
    if not (args.root and args.source):
        raise EntityClipError("--source needs --root DIR (and --split, default train)")
    return read_source(args.source, args.root, args.split, report)


def _queries(args, report):
    if bool(getattr(args, "queries", None)) == bool(args.source):
        raise EntityClipError("give exactly one input: --queries FILE.jsonl or --source KIND --root DIR --split S")
    if args.queries:
        pairs = _read_queries_jsonl(args.queries, report)
    else:
        pairs = ((example.id, example.query) for example in _examples(args, report))
    if args.limit is not None:
        pairs = itertools.islice(pairs, args.limit)
    return pairs


def _backend(args):
    if args.backend == "http":
        return OpenAIHTTPBackend(args.base_url, args.model, api_key_env=args.api_key_env,
                                 connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
                                 request_timeout=args.request_timeout,
                                 retries=args.retries, backoff_base=args.backoff_base,
                                 backoff_max=args.backoff_max, temperature=args.temperature)
    return TransformersBackend(args.model_path, batch_size=args.batch_size, device=args.device,
                               model_name=args.model_name, convert_cache=not args.no_gguf_cache)


def run_explain(args):
    """Exit status 0: the cache is complete; 1: some queries failed (a rerun retries them);
    75: stopped early (Ctrl-C, SIGTERM, the backend failing again and again), rerun to resume."""
    try:
        return _explain(args)
    except KeyboardInterrupt:   # before or after generation: nothing unsynced was written
        print("entityclip explain: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_STOPPED_EARLY


def _explain(args):
    style = args.prompt_style or ("chat" if args.backend == "http" else "completion")
    prompt = load_prompt(args.prompt, chat=style == "chat", name=args.prompt_name)
    report = SkipReport()
    queries = _queries(args, report)
    concurrency = args.concurrency or (8 if args.backend == "http" else 1)
    backend = _backend(args)
    # kill (SIGTERM) ends the run as cleanly as Ctrl-C: finished records are synced. SIGINT too,
    # even when a shell started us as a background job, which hands SIGINT over ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    summary = generate_explanations(queries, args.out, backend, prompt, concurrency=concurrency,
                                    max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                                    keep_failed=args.keep_failed, quality_retries=args.quality_retries,
                                    max_consecutive_failures=args.max_consecutive_failures, report=report)
    print(summary, file=sys.stderr)
    if report:
        print(f"input: skipped {len(report)} records: "
              + ", ".join(f"{r}={n}" for r, n in report.counts.items()), file=sys.stderr)
        for record_id, reason in report.items[:10]:
            print(f"  skipped {record_id}: {reason}", file=sys.stderr)
    if args.summary_json:
        with storage.open(args.summary_json, "w") as f:
            json.dump({**summary.to_dict(), "prompt_version": prompt.version, "model": backend.model,
                       "input": report.to_dict()}, f, indent=2)
    if summary.stopped:
        return EXIT_STOPPED_EARLY
    return EXIT_DONE if summary.complete else EXIT_SOME_FAILED


def run_explain_import(args):
    report = SkipReport()
    examples = _examples(args, report) if args.source else None
    counts = import_capdsc(args.capdsc, args.out, examples)
    if report:
        counts["skipped_examples"] = len(report)
    print("imported: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0 if counts["imported"] or counts["already_cached"] else 1
