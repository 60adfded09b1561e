from __future__ import annotations

from assistant.report import parse_continuation


def test_findings_and_impression_are_split():
    draft = parse_continuation(" The lungs are clear.\nIMPRESSION: No acute disease.")
    assert draft.findings == "The lungs are clear."
    assert draft.impression == "No acute disease."


def test_run_off_into_a_new_document_is_cut():
    draft = parse_continuation(" Heart normal.\n\nIMPRESSION: Normal.\nEXAMINATION: CT head")
    assert draft.impression == "Normal."


def test_missing_impression_is_said_plainly_in_the_final_text():
    text = parse_continuation(" Heart normal.").to_text()
    assert "IMPRESSION:\n(not generated" in text


def test_partial_text_grows_by_extension():
    first = parse_continuation(" Heart").to_text(partial=True)
    second = parse_continuation(" Heart normal.\nIMPRESSION: ok").to_text(partial=True)
    assert second.startswith(first)
