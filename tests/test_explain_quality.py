"""The degenerate-answer filter on crafted strings, answer cleaning, and prompt versions."""
import pytest

from entityclip_jax.errors import EntityClipError
from entityclip_jax.explain import prompts
from entityclip_jax.explain.quality import clean, problem

QUERY = "Angela Merkel speaks at a press conference in Berlin."
GOOD = ("Angela Merkel was Chancellor of Germany from 2005 to 2021, a woman with short blond hair who often "
        "wears a coloured blazer. The press conference takes place in Berlin, the German capital.")


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \t ", "empty"),
    ("... !!", "empty"),
    ("Angela Merkel.", "too_short"),
    ("the the the the the the the the", "repeated"),
    ("She is a politician. She is a politician. She is a politician. She is a politician.", "repeated"),
    ("Merkel is a German politician who leads who leads who leads who leads who leads who leads", "repeated"),
    (QUERY, "echo"),
    ("angela merkel speaks at a press conference in berlin", "echo"),
    (QUERY + " Yes indeed.", "echo"),
    ("Each news photo caption is followed by an explanation of its entities", "echo"),
])
def test_degenerate_answers_are_named(text, reason):
    prompt_text = prompts.FEW_SHOT.render(QUERY)
    assert problem(text, QUERY, prompt_text) == reason


def test_a_real_explanation_passes():
    assert problem(GOOD, QUERY, prompts.FEW_SHOT.render(QUERY)) is None
    # Starting with the query is fine when real content follows.
    assert problem(QUERY + " " + GOOD, QUERY, prompts.INSTRUCTION.render(QUERY)) is None


def test_clean_cuts_at_stop_joins_lines_and_drops_a_half_sentence():
    assert clean(" First line here.\nCaption: next one", ("\n",)) == "First line here."
    assert clean("A  paragraph\nwith\tbreaks.") == "A paragraph with breaks."
    assert clean("One sentence. Two sentences. And a half", truncated=True) == "One sentence. Two sentences."
    assert clean("No sentence end at all", truncated=True) == "No sentence end at all"
    assert clean("Kept. Whole", truncated=False) == "Kept. Whole"


def test_prompt_versions_follow_the_text(tmp_path):
    assert "{query}" in prompts.FEW_SHOT.template and "{query}" in prompts.INSTRUCTION.template
    assert prompts.FEW_SHOT.template.endswith("Explanation:") and prompts.FEW_SHOT.stop == ("\n",)
    assert prompts.load_prompt(None, chat=False) is prompts.FEW_SHOT
    assert prompts.load_prompt(None, chat=True) is prompts.INSTRUCTION
    custom = prompts.load_prompt("Explain {query} briefly.", chat=True)
    assert custom.render("X {y}") == "Explain X {y} briefly."   # braces in a query are safe
    changed = prompts.load_prompt("Explain {query} shortly.", chat=True)
    assert custom.version != changed.version and custom.version.startswith("custom-")
    path = tmp_path / "mine.txt"
    path.write_text("Q: {query}\nA:\n")
    from_file = prompts.load_prompt(str(path), chat=False)
    assert from_file.template == "Q: {query}\nA:" and from_file.version.startswith("mine-")
    assert from_file.stop == ("\n",)
    with pytest.raises(EntityClipError, match="placeholder"):
        prompts.load_prompt("no placeholder here", chat=True)
