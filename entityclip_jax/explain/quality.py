"""Cleaning an LLM answer and telling a degenerate one from a usable explanation.

Degenerate answers are never cached as good: they are retried, then recorded
as failed with the reason returned by `problem`.
"""
import collections
import re

_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def clean(text, stop=(), truncated=False):
    """Cuts at the first stop string, makes one line, and drops a half sentence
    left by the token cap (when a full sentence exists before it)."""
    text = (text or "").lstrip()
    for s in stop:
        if s and s in text:
            text = text[:text.index(s)]
    text = " ".join(text.split())
    if truncated:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends:
            text = text[:ends[-1]]
    return text


def _words(text):
    return _WORD.findall(text.lower())


def _normalized(text):
    return " ".join(_words(text))


def problem(text, query, prompt_text="", *, min_words=4):
    """None for a usable explanation, else the reason it is degenerate:
    "empty", "too_short", "repeated" (a looping phrase) or "echo" (a copy of the
    query or of the prompt)."""
    words = _words(text)
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too_short"
    trigrams = list(zip(words, words[1:], words[2:]))
    if trigrams:
        top = collections.Counter(trigrams).most_common(1)[0][1]
        if top >= 4 or (len(trigrams) >= 6 and len(set(trigrams)) / len(trigrams) < 0.5):
            return "repeated"
    norm, norm_query = _normalized(text), _normalized(query)
    if norm_query and norm.startswith(norm_query) and len(words) - len(norm_query.split()) < min_words:
        return "echo"
    if norm in _normalized(prompt_text) or norm in norm_query:
        return "echo"
    return None
