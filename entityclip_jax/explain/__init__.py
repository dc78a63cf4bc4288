"""LLM explanations of entity queries (who or what, how they look, the occasion), cached in JSONL.

    from entityclip_jax.explain import generate_explanations, read_explanations

Backends live in explain.backends (OpenAI-compatible HTTP, local transformers);
their heavy imports happen only when one is built.
"""
from entityclip_jax.data.explanation_cache import read_explanations
from entityclip_jax.explain.runner import Summary, generate_explanations

__all__ = ["Summary", "generate_explanations", "read_explanations"]
