"""Turns (id, query) pairs into an explanation cache: deduplicated, concurrent, resumable.

Each distinct query (per prompt version and model) is generated once; every id
gets its own record. A rerun skips queries the cache already holds as "ok",
writes the missing per-id records of those from the cache, and retries queries
that failed before (unless keep_failed). Ctrl-C or a backend that keeps failing
ends the run cleanly: finished records are synced and the summary says why it
stopped.
"""
import collections
import concurrent.futures
import dataclasses
import time

from tqdm import tqdm

from entityclip_jax.data import explanation_cache
from entityclip_jax.explain import quality


@dataclasses.dataclass
class Summary:
    ids: int = 0                # distinct ids in the input
    queries: int = 0            # distinct query texts among them
    generated: int = 0          # queries explained in this run
    cached: int = 0             # queries the cache already held as ok
    kept_failed: int = 0        # queries that failed before and were left alone (keep_failed)
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> queries
    skipped_input: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    records_written: int = 0
    tokens: int = 0
    seconds: float = 0.0
    torn_bytes: int = 0         # a torn last line left by a killed run, cut before appending
    stopped: str | None = None  # why the run ended early, or None when it went through

    @property
    def complete(self):
        return self.stopped is None and not self.failed and self.kept_failed == 0

    def to_dict(self):
        rate = self.generated / self.seconds if self.seconds else 0.0
        return {"ids": self.ids, "queries": self.queries, "generated": self.generated, "cached": self.cached,
                "failed": sum(self.failed.values()), "failed_by_reason": dict(self.failed),
                "kept_failed": self.kept_failed, "skipped_input": dict(self.skipped_input),
                "records_written": self.records_written, "tokens": self.tokens,
                "seconds": round(self.seconds, 2), "queries_per_s": round(rate, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
                "torn_bytes": self.torn_bytes, "stopped": self.stopped}

    def __str__(self):
        d = self.to_dict()
        lines = [f"explained {d['generated']} queries, {d['cached']} already cached, {d['failed']} failed"
                 f" ({d['ids']} ids, {d['queries']} distinct queries) in {d['seconds']} s:"
                 f" {d['queries_per_s']} queries/s, {d['tokens']} tokens, {d['tokens_per_s']} tokens/s"]
        if self.failed:
            lines.append("failed by reason: " + ", ".join(f"{r}={n}" for r, n in self.failed.most_common())
                         + " (rerun to retry them; --keep-failed leaves them)")
        if self.kept_failed:
            lines.append(f"{self.kept_failed} queries that failed before were left alone (--keep-failed)")
        if self.skipped_input:
            lines.append("skipped input: " + ", ".join(f"{r}={n}" for r, n in self.skipped_input.items()))
        if self.torn_bytes:
            lines.append(f"cut a torn last record ({self.torn_bytes} bytes) left by an interrupted run")
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}; rerun the same command to resume")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    explanation: str | None
    tokens: int
    reason: str | None


def _plan(queries, summary, report):
    """query -> its ids, in input order; empty queries and conflicting ids are skipped."""
    ids_by_query, query_of = {}, {}
    for record_id, query in queries:
        record_id = str(record_id)
        if query is None or (isinstance(query, str) and not query.strip()):
            summary.skipped_input["empty_query"] += 1
            report and report.skip(record_id, "empty_query: the query text is empty")
            continue
        if not isinstance(query, str):  # a number, a list ...: say so, it is not empty
            summary.skipped_input["not_text"] += 1
            report and report.skip(record_id, f"not_text: the query is {type(query).__name__} {str(query)[:40]!r}, "
                                              "not a string; quote it in the input file")
            continue
        if record_id in query_of:
            if query_of[record_id] != query:
                summary.skipped_input["duplicate_id"] += 1
                report and report.skip(record_id, "duplicate_id: the same id has two different queries")
            continue
        query_of[record_id] = query
        ids_by_query.setdefault(query, []).append(record_id)
    summary.ids, summary.queries = len(query_of), len(ids_by_query)
    return ids_by_query


def _cache_state(path, prompt_version, model):
    ok, have, failed_before = {}, set(), set()
    for record in explanation_cache.iter_records(path):
        if record.get("prompt_version") != prompt_version or record.get("model") != model:
            continue
        query = record.get("query")
        if record["status"] == explanation_cache.OK and record.get("explanation"):
            ok[query] = record
            have.add((str(record["id"]), query))
        elif record["status"] == explanation_cache.FAILED:
            failed_before.add(query)
    return ok, have, failed_before


def _explain_batch(backend, prompt, queries, max_new_tokens, quality_retries):
    """Generates a batch; degenerate answers are retried (sampled) up to quality_retries times."""
    outcomes, tokens = {}, collections.Counter()
    pending, sample = list(queries), False
    for _ in range(quality_retries + 1):
        rendered = [prompt.render(q) for q in pending]
        generations = backend.generate(rendered, chat=prompt.chat, max_new_tokens=max_new_tokens,
                                       stop=prompt.stop, sample=sample)
        retry = []
        for query, text_in, generation in zip(pending, rendered, generations):
            tokens[query] += generation.tokens
            if generation.error:   # the backend already retried its transport
                outcomes[query] = _Outcome(None, tokens[query], generation.error)
                continue
            text = quality.clean(generation.text, prompt.stop, generation.truncated)
            reason = quality.problem(text, query, text_in)
            outcomes[query] = _Outcome(None if reason else text, tokens[query], reason)
            if reason:
                retry.append(query)
        pending, sample = retry, True
        if not pending:
            break
    return [(q, outcomes[q]) for q in queries]


def generate_explanations(queries, cache_path, backend, prompt, *, concurrency=1, max_new_tokens=96,
                          progress=True, keep_failed=False, quality_retries=2, max_consecutive_failures=20,
                          sync_every=32, report=None):
    """Explains every (id, query) pair into the JSONL cache at cache_path; returns a Summary.

    concurrency: batches in flight at once (HTTP: parallel requests; a local
    model: use 1). report: an optional data.example.SkipReport for bad input.
    """
    started = time.monotonic()
    summary = Summary()
    ids_by_query = _plan(queries, summary, report)
    ok, have, failed_before = _cache_state(cache_path, prompt.version, backend.model)

    def record(record_id, query, outcome):
        meta = dict(backend=backend.name, model=backend.model, prompt_version=prompt.version, tokens=outcome.tokens)
        if outcome.reason:
            return explanation_cache.make_record(record_id, query, None, status=explanation_cache.FAILED, reason=outcome.reason, **meta)
        return explanation_cache.make_record(record_id, query, outcome.explanation, **meta)

    todo = []
    with explanation_cache.CacheWriter(cache_path, sync_every=sync_every) as writer:
        summary.torn_bytes = writer.torn_bytes
        for query, ids in ids_by_query.items():
            if query in ok:
                summary.cached += 1
                hit = _Outcome(ok[query]["explanation"], 0, None)
                for record_id in ids:
                    if (record_id, query) not in have:   # an id new to the cache, or cut off by a kill
                        writer.write(record(record_id, query, hit))
                        summary.records_written += 1
            elif keep_failed and query in failed_before:
                summary.kept_failed += 1
            else:
                todo.append(query)
        _run(todo, ids_by_query, backend, prompt, writer, record, summary, concurrency=concurrency,
             max_new_tokens=max_new_tokens, progress=progress, quality_retries=quality_retries,
             max_consecutive_failures=max_consecutive_failures)
    summary.seconds = time.monotonic() - started
    return summary


def _run(todo, ids_by_query, backend, prompt, writer, record, summary, *, concurrency, max_new_tokens,
         progress, quality_retries, max_consecutive_failures):
    batch_size = max(1, getattr(backend, "batch_size", 1))
    batches = iter([todo[i:i + batch_size] for i in range(0, len(todo), batch_size)])
    pool = concurrent.futures.ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="explain")
    bar = tqdm(total=len(todo), unit="query", desc="explain", disable=not progress, dynamic_ncols=True)
    in_flight, failures_in_a_row, interrupted = set(), 0, False
    try:
        while True:
            while summary.stopped is None and len(in_flight) < 2 * max(1, concurrency):
                batch = next(batches, None)
                if batch is None:
                    break
                in_flight.add(pool.submit(_explain_batch, backend, prompt, batch, max_new_tokens, quality_retries))
            if not in_flight:
                break
            done, in_flight = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                for query, outcome in future.result():   # BackendError propagates: the setup is wrong
                    for record_id in ids_by_query[query]:
                        writer.write(record(record_id, query, outcome))
                        summary.records_written += 1
                    summary.tokens += outcome.tokens
                    if outcome.reason:
                        summary.failed[outcome.reason] += 1
                        failures_in_a_row += 1
                    else:
                        summary.generated += 1
                        failures_in_a_row = 0
                    bar.update(1)
                bar.set_postfix(failed=sum(summary.failed.values()), refresh=False)
            if max_consecutive_failures and failures_in_a_row >= max_consecutive_failures and not summary.stopped:
                last = summary.failed.most_common(1)[0][0]
                summary.stopped = (f"{failures_in_a_row} queries failed in a row (most often: {last}); "
                                   "check that the backend is up and answers well")
    except KeyboardInterrupt:
        interrupted = True
        summary.stopped = "interrupted"
        _cancel(backend)
    except BaseException:
        _cancel(backend)
        raise
    finally:
        for future in in_flight:
            future.cancel()
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        bar.close()


def _cancel(backend):
    cancel = getattr(backend, "cancel", None)
    if cancel:
        cancel()
