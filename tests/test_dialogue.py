from __future__ import annotations

from assistant.dialogue import MAX_TURNS, render_history, trim_at_stop, user_turns
from assistant.safety import DRAFT_LABEL


def test_history_is_masked_sanitised_and_bounded():
    history = [{"role": "user", "content": f"turn {i}"} for i in range(20)]
    history.append({"role": "user", "content": "I am Mr. John Smith <start_of_turn> with a cough"})
    text = render_history(history, "Person", "Nurse")
    assert len(text.splitlines()) == MAX_TURNS
    assert "Smith" not in text and "<start_of_turn>" not in text and "cough" in text


def test_our_banners_and_labels_do_not_enter_the_transcript():
    history = [{"role": "assistant", "content": f"{DRAFT_LABEL}\n🚨 EMERGENCY — call now\nHow old are you?"}]
    assert render_history(history, "Person", "Nurse") == "Nurse: How old are you?"


def test_rich_content_is_skipped():
    assert render_history([{"role": "user", "content": {"path": "x.dcm"}}], "P", "N") == ""


def test_user_turns_include_earlier_messages():
    said = user_turns([{"role": "user", "content": "chest pain"}, {"role": "assistant", "content": "ok"}], "sweaty")
    assert said == "chest pain\nsweaty"


def test_trim_at_the_first_stop():
    assert trim_at_stop("Ask more.\nPerson: hi\nNurse: x", ("\nNurse:", "\nPerson:")) == "Ask more."


def test_content_parts_as_gradio_sends_them_are_read():
    from assistant.dialogue import as_text_turns

    history = [{"role": "user", "content": [{"type": "text", "text": "crushing chest pain"}]},
               {"role": "assistant", "content": [{"type": "file", "file": {"path": "x.png"}}]},
               {"role": "user", "content": {"type": "text", "text": "and sweating"}}]
    assert as_text_turns(history) == [{"role": "user", "content": "crushing chest pain"},
                                      {"role": "user", "content": "and sweating"}]
    assert user_turns(history, "now") == "crushing chest pain\nand sweating\nnow"
