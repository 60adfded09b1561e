from __future__ import annotations

from assistant.safety import find_red_flags
from assistant.triage import assess, model_level, with_urgency


def test_red_flags_set_the_level_and_the_model_cannot_lower_it():
    flags = find_red_flags("crushing chest pain spreading to my left arm and sweating")
    level, reason = assess(flags, "Urgency: self-care, rest at home")
    assert level == "emergency" and "fixed safety rules" in reason


def test_without_flags_the_models_level_is_used_and_labelled_as_ai():
    assert assess([], "Ask about fever.\nUrgency: routine, see your GP") == (
        "routine", "suggested by the AI from this conversation: confirm with a clinician")


def test_no_level_is_said_plainly():
    assert assess([], "How long has it hurt?")[0] == "not determined"


def test_the_models_urgency_line_is_replaced_not_duplicated():
    text = with_urgency("Drink fluids.\nUrgency: self-care", [])
    assert text.count("Urgency:") == 1 and text.endswith("Urgency: self-care (suggested by the AI from this "
                                                          "conversation: confirm with a clinician).")


def test_model_level_reads_only_the_urgency_line():
    assert model_level("This is not an emergency.\nUrgency - urgent") == "urgent"
    assert model_level("emergency departments are busy") is None
