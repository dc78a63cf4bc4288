"""The local transformers backend on a tiny random Llama built at test time.

A random LM writes junk, so these tests assert mechanics (batching with left
padding, the token cap, stopping, caching), not the quality of the text.
"""
import collections
import json

import pytest

from entityclip_jax.data import explanation_cache
from entityclip_jax.explain.prompts import Prompt
from entityclip_jax.explain.runner import generate_explanations

CORPUS = ["Angela Merkel speaks at a press conference in Berlin.",
          "Barack Obama shakes hands with Vladimir Putin at the summit.",
          "Serena Williams returns the ball during the Wimbledon final.",
          "Caption: a photo\nExplanation: a person in a red coat.\n"] * 20


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("tiny_lm")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                                     eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    # Special tokens are never generated, so every row runs to its cap or its stop string.
    model.generation_config.suppress_tokens = [0, 1, 2]
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def backend(tiny_lm_dir):
    from entityclip_jax.explain.backends.transformers_lm import TransformersBackend
    return TransformersBackend(tiny_lm_dir, batch_size=3, device="cpu", repetition_penalty=1.0)


PROMPTS = ["Caption: Angela Merkel speaks.\nExplanation:",
           "Caption: Serena Williams returns the ball during the final.\nExplanation:",
           "Caption: Obama\nExplanation:"]


def _reference(backend, prompt, max_new_tokens):
    """Greedy continuation of one unpadded prompt, decoded straight from model.generate."""
    import torch
    ids = backend.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = backend.lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=2)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return new, backend.tokenizer.decode(new, skip_special_tokens=True)


def test_batched_generation_matches_unbatched_and_respects_the_cap(backend):
    generations = backend.generate(PROMPTS, chat=False, max_new_tokens=7)
    assert len(generations) == len(PROMPTS)
    for prompt, generation in zip(PROMPTS, generations):
        ids, text = _reference(backend, prompt, 7)
        assert len(ids) == 7 and generation.tokens == 7 and generation.truncated
        assert generation.text == text   # left padding changes nothing


def test_stop_string_ends_each_row_on_its_own(backend):
    free = backend.generate(PROMPTS, chat=False, max_new_tokens=12)
    # A stop string taken from the middle of the first row's own output.
    ids, _ = _reference(backend, PROMPTS[0], 12)
    stop = backend.tokenizer.decode(ids[4:5])
    assert stop.strip(), "fixture: pick a visible token"
    stopped = backend.generate(PROMPTS, chat=False, max_new_tokens=12, stop=(stop,))
    first = stopped[0]
    assert not first.truncated and first.tokens <= 5 and stop in first.text
    assert free[0].text.startswith(first.text)
    for before, after in zip(free[1:], stopped[1:]):   # other rows run on until their own stop or cap
        assert before.text.startswith(after.text)
        assert after.tokens == 12 or stop in after.text


def test_newline_stop_gives_one_line(tiny_lm_dir):
    """Make the newline the model's favourite token after a few steps; generation must stop there."""
    import torch
    from entityclip_jax.explain.backends.transformers_lm import TransformersBackend
    from entityclip_jax.explain.quality import clean

    lm = TransformersBackend(tiny_lm_dir, batch_size=2, device="cpu", repetition_penalty=1.0)
    ids, _ = _reference(lm, PROMPTS[1], 10)
    newline = lm.tokenizer.convert_tokens_to_ids("Ċ")
    assert newline != lm.tokenizer.unk_token_id
    with torch.no_grad():   # the newline now outscores the token greedy chose at step 3
        lm.lm.lm_head.weight[newline] = 3.0 * lm.lm.lm_head.weight[ids[2]]
    generation = lm.generate(PROMPTS[1:2], chat=False, max_new_tokens=10, stop=("\n",))[0]
    assert "\n" in generation.text and not generation.truncated and generation.tokens <= 3
    assert "\n" not in clean(generation.text, ("\n",))


def test_cache_generates_each_distinct_query_once(backend, tmp_path):
    calls = collections.Counter()
    original = backend.generate

    def counting_generate(prompts, **kwargs):
        calls.update(prompts)
        return original(prompts, **kwargs)

    backend.generate = counting_generate
    try:
        prompt = Prompt("t", "Caption: {query}\nExplanation:", chat=False, stop=("\n",))
        queries = [("a", "Merkel in Berlin"), ("b", "Obama meets Putin"), ("c", "Merkel in Berlin"),
                   ("d", "Serena at Wimbledon"), ("e", "Obama meets Putin")]
        path = tmp_path / "cache.jsonl"
        summary = generate_explanations(queries, path, backend, prompt, max_new_tokens=6,
                                        quality_retries=0, progress=False)
        assert sorted(calls.values()) == [1, 1, 1] and len(calls) == 3
        records = list(explanation_cache.iter_records(path))
        assert sorted(r["id"] for r in records) == ["a", "b", "c", "d", "e"]
        by_id = {r["id"]: r for r in records}
        assert by_id["a"]["explanation"] == by_id["c"]["explanation"]
        assert by_id["a"]["status"] == by_id["c"]["status"]
        assert all(r["model"] == "tiny_lm0" and r["backend"] == "transformers" for r in records)
        assert summary.generated + sum(summary.failed.values()) == 3

        # A rerun with keep_failed generates nothing; without it, only failed queries again.
        calls.clear()
        again = generate_explanations(queries, path, backend, prompt, max_new_tokens=6, quality_retries=0,
                                      progress=False, keep_failed=True)
        assert not calls and again.cached == summary.generated and again.records_written == 0
        failed_queries = {r["query"] for r in records if r["status"] == "failed"}
        generate_explanations(queries, path, backend, prompt, max_new_tokens=6, quality_retries=0, progress=False)
        assert set(prompt.render(q) for q in failed_queries) == set(calls)
    finally:
        del backend.generate


def test_cli_explain_with_a_local_model_directory(tiny_lm_dir, tmp_path):
    from entityclip_jax.cli import main

    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"id": 1, "query": "Merkel in Berlin"}\nnot json\n{"id": 2, "query": "Merkel in Berlin"}\n'
                       '{"id": 3, "query": "Obama in Paris"}\n{"id": 4, "query": "cut by the limit"}\n')
    out, summary_json = tmp_path / "cache.jsonl", tmp_path / "summary.json"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Caption: {query}\nExplanation:\n")
    code = main(["explain", "--queries", str(queries), "--out", str(out), "--model-path", tiny_lm_dir,
                 "--prompt", str(prompt), "--max-new-tokens", "5", "--quality-retries", "0", "--limit", "3",
                 "--no-progress", "--summary-json", str(summary_json)])
    summary = json.loads(summary_json.read_text())
    assert summary["ids"] == 3 and summary["queries"] == 2 and summary["input"]["by_reason"] == {"bad_line": 1}
    assert summary["prompt_version"].startswith("prompt-") and summary["model"] == "tiny_lm0"
    assert summary["generated"] + summary["failed"] == 2 and code == (0 if summary["failed"] == 0 else 1)
    assert sorted(r["id"] for r in explanation_cache.iter_records(out)) == ["1", "2", "3"]
