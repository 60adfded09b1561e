"""evaluate --task summary: coverage, grounding and hallucination scoring, and the task on a tiny model."""

from __future__ import annotations

import json

import pytest

from assistant.ehr_records import record_from_upload, reference_summary
from assistant.evaluate_summary import aggregate, lead_summary, score_summary, summary_body
from assistant.grounding import annotate
from assistant.safety import label_draft
from conftest import ROOT, SHARED_DATA

needs_synthea = pytest.mark.skipif(not (SHARED_DATA / "synthea").is_dir(), reason="needs ../shared/data/synthea")
RECORD = record_from_upload(ROOT / "tests" / "data" / "fhir_bundle_one_patient.json")
LEXICON = ["Hypertension", "Stroke", "Warfarin", "Warfarin Sodium 5 MG Oral Tablet", "lisinopril", "Allergy to peanuts"]


def test_summary_body_drops_label_banner_and_source_check():
    text = "Problems:\n- Hypertension."
    shown = "🚨 EMERGENCY — banner\n\n" + label_draft(annotate(text, RECORD.text))
    assert "Source check:" in shown
    assert summary_body(shown) == text


def test_reference_target_scores_perfectly():
    score = score_summary(reference_summary(RECORD), RECORD, LEXICON)
    assert all(covered == total for covered, total in score["coverage"].values())
    assert score["statements"] == score["supported"] > 0 and score["hallucinated"] == []


def test_a_summary_with_omissions_and_inventions():
    summary = ("Problems:\n- Hypertension since age 44.\n- History of stroke.\nMedications:\n- Lisinopril daily.\n"
               "- Warfarin 5 mg.\nRecent results:\n- Systolic blood pressure 138 mmHg.\n- Diastolic blood pressure 90.")
    score = score_summary(summary, RECORD, LEXICON)
    assert score["coverage"]["problems"] == [1, 1] and score["coverage"]["medications"] == [1, 1]
    assert score["coverage"]["allergies"] == [0, 1] and score["coverage"]["follow_up"] == [0, 1]
    assert score["coverage"]["results"] == [1, 3]  # a result counts only with its value (84, not 90)
    assert sorted(score["hallucinated"]) == ["Stroke", "Warfarin"] and score["named"] == 4
    assert score["supported"] < score["statements"]  # the invented lines find no source sentence
    total = aggregate([score, score_summary(reference_summary(RECORD), RECORD, LEXICON)])
    assert total["hallucinated_facts"] == 2 and total["named_supported_fraction"] == pytest.approx(5 / 7)
    assert total["coverage"]["allergies"] == 0.5 and total["facts"]["results"] == 6


def test_lead_baseline_copies_the_first_record_entries():
    lead = lead_summary(RECORD, entries=2)
    assert lead == "- Hypertension (since age 44).\n- Viral sinusitis (resolved by age 57)."
    assert score_summary(lead, RECORD, LEXICON)["hallucinated"] == []


@needs_synthea
def test_summary_task_on_a_tiny_model(tiny_vlm, tmp_path, capsys):
    from assistant.evaluate import evaluate
    from assistant.pipeline import Assistant

    out = tmp_path / "eval-summary.json"
    result = evaluate("summary", limit=2, assistant=Assistant(tiny_vlm), out=out, max_new_tokens=6,
                      command="python -m assistant evaluate --task summary --limit 2", progress=False)
    saved = json.loads(out.read_text())
    assert saved["task"] == "summary" and saved["dataset"]["n_evaluated"] == 2 and saved["dataset"]["limit"] == 2
    assert saved["dataset"]["split"] == "test" and saved["dataset"]["n_split"] >= 2
    assert saved["generation"]["max_new_tokens"] == 6 and saved["model"]["parameters"] > 0
    assert set(saved["metrics"]) == {"model", "lead", "reference"}
    assert saved["metrics"]["reference"]["coverage_all"] == 1.0
    assert saved["metrics"]["reference"]["grounding_precision"] == 1.0
    assert saved["metrics"]["reference"]["hallucinated_facts"] == 0
    assert saved["created"] and saved["command"].endswith("--limit 2") and saved["elapsed_s"] >= 0
    rows = (tmp_path / "eval-summary.predictions.jsonl").read_text().splitlines()
    assert len(rows) == 2 and len(json.loads(rows[0])["patient"]) == 12  # a pseudonym, not the Synthea id
    assert "predictions" not in saved and len(result["predictions"]) == 2
    printed = capsys.readouterr().out
    assert "grounding precision" in printed and "reference: grounded target (upper bound)" in printed
