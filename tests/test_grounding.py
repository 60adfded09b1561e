from __future__ import annotations

from assistant.grounding import annotate, ground_summary

SOURCE = """Patient seen for follow-up of type 2 diabetes mellitus.
Medications: metformin 500 mg twice daily; lisinopril 10 mg daily.
Allergies: penicillin (rash).
HbA1c 7.9% on 2024-01-10."""


def test_supported_statements_point_to_their_source_line():
    checks = {c.statement: c for c in ground_summary("Problems:\n- Type 2 diabetes mellitus\n- Metformin 500 mg twice daily", SOURCE)}
    assert checks["Type 2 diabetes mellitus"].line == 1
    assert checks["Metformin 500 mg twice daily"].line == 2


def test_invented_statements_are_flagged():
    (check,) = ground_summary("- Warfarin 5 mg daily for atrial fibrillation", SOURCE)
    assert check.source is None and check.score < 0.6


def test_annotation_lists_each_statement():
    text = annotate("Problems:\n- Penicillin allergy (rash)\n- Asthma since childhood", SOURCE)
    assert "Source check:" in text
    assert "→ source line 3" in text
    assert "Asthma since childhood → ⚠️ not found in the source" in text
