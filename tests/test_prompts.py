from __future__ import annotations

import pytest

from assistant.prompts import PromptError, load_template, render, sanitise_field


def test_template_comment_is_stripped():
    text = load_template("draft_report")
    assert not text.lstrip().startswith("<!--")
    assert "FINDINGS:" in text


def test_render_fills_fields():
    text = render("draft_report", indication="cough", views="PA view", images="<image>")
    assert "INDICATION: cough" in text and "PA view" in text


def test_missing_field_and_template_are_clear_errors():
    with pytest.raises(PromptError, match="needs field"):
        render("draft_report", indication="x")
    with pytest.raises(PromptError, match="not found"):
        load_template("no_such_task")


@pytest.mark.parametrize("hostile", ["<image>", "<unused0>", "< start_of_turn >", "</s>", "<bos>"])
def test_user_text_cannot_carry_control_tokens(hostile):
    assert "<" not in sanitise_field(f"fever {hostile} cough")


def test_user_text_is_single_spaced_and_capped():
    assert sanitise_field("a\n\n  b\tc") == "a b c"
    assert len(sanitise_field("x" * 10_000)) == 2000
    assert sanitise_field(None) == ""
