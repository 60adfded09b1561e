"""CheXpert-style labeler: agreement on a hand-labelled sentence set, F1 on hand-computed cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from assistant.labeler import LABELS, NIH14_FROM_CHEXPERT, finding_f1, label_report, label_vector

SENTENCES = [json.loads(line) for line in
             (Path(__file__).parent / "data" / "labeler_sentences.jsonl").read_text().splitlines()]
IU_REPORTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "iu-xray" / "indiana_reports.csv"


def test_sentence_set_is_large_enough_and_uses_known_labels():
    assert len(SENTENCES) >= 150
    for row in SENTENCES:
        assert set(row["labels"]) <= set(LABELS), row
        assert all(v in (1, 0, -1, None) for v in row["labels"].values()), row


def test_agreement_with_expected_labels():
    agree = total = extra = 0
    disagreements = []
    for row in SENTENCES:
        got = label_report(row["text"])
        for label, want in row["labels"].items():
            total += 1
            if got[label] == want:
                agree += 1
            else:
                disagreements.append((row["text"], label, want, got[label]))
        # Labels asserted that the sentence was not annotated for (No Finding is implied, not annotated).
        extra += sum(v is not None for k, v in got.items() if k not in row["labels"] and k != "No Finding")
    rate = agree / total
    print(f"\nlabeler agreement {rate:.3f} ({agree}/{total} expected labels); unexpected extra labels: {extra}")
    assert rate >= 0.95, disagreements
    assert extra <= 0.05 * total


def test_report_has_every_label_in_order():
    out = label_report("Small left pleural effusion.")
    assert tuple(out) == LABELS
    assert out["Pleural Effusion"] == 1 and out["Cardiomegaly"] is None and out["No Finding"] is None


@pytest.mark.parametrize("text", ["", "   ", "XXXX XXXX.", "XXXX"])
def test_empty_or_redacted_text_mentions_nothing(text):
    out = label_report(text)
    if not text.strip():
        assert all(v is None for v in out.values())
    else:  # redaction tokens alone assert no finding, as an empty CheXpert report would
        assert all(out[k] is None for k in LABELS if k != "No Finding")


def test_no_finding_follows_chexpert():
    assert label_report("No acute cardiopulmonary process.")["No Finding"] == 1
    assert label_report("Possible small effusion.")["No Finding"] is None  # uncertain pathology
    assert label_report("Calcified granuloma. No acute disease.")["No Finding"] is None  # "other finding"
    assert label_report("Pacemaker in place. Lungs clear.")["No Finding"] == 1  # devices do not count


def test_heart_failure_makes_cardiomegaly_uncertain():
    out = label_report("Congestive heart failure.")
    assert out["Edema"] == 1 and out["Cardiomegaly"] == -1
    assert label_report("No evidence of CHF.")["Cardiomegaly"] is None


def test_mentions_aggregate_positive_over_uncertain_over_negative():
    assert label_report("No effusion on the left. Small right effusion.")["Pleural Effusion"] == 1
    assert label_report("No effusion on the left. Possible right effusion.")["Pleural Effusion"] == -1
    assert label_report("Possible right effusion. Small left effusion.")["Pleural Effusion"] == 1


def test_label_vector_binarises_with_uncertain_flag():
    text = "Possible right lower lobe pneumonia. Cardiomegaly. No pneumothorax."
    ones, zeros = label_vector(text), label_vector(text, uncertain_as=0)
    assert len(ones) == len(LABELS) == 14
    i = LABELS.index
    assert ones[i("Pneumonia")] == 1 and zeros[i("Pneumonia")] == 0
    assert ones[i("Cardiomegaly")] == zeros[i("Cardiomegaly")] == 1
    assert ones[i("Pneumothorax")] == 0 and ones[i("Fracture")] == 0


def test_nih_mapping_names_real_labels_on_both_sides():
    nih14 = {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
             "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"}
    assert set(NIH14_FROM_CHEXPERT) <= set(LABELS)
    assert all(set(v) <= nih14 for v in NIH14_FROM_CHEXPERT.values())
    assert NIH14_FROM_CHEXPERT["Pleural Effusion"] == ("Effusion",)
    assert NIH14_FROM_CHEXPERT["Lung Lesion"] == ("Mass", "Nodule")


def test_finding_f1_hand_computed():
    refs = [{"Cardiomegaly": 1}, {"Cardiomegaly": 1, "Pleural Effusion": 1}]
    hyps = [{"Cardiomegaly": 1}, {"Pleural Effusion": -1}]
    # Uncertain counts as negative (R2Gen): Cardiomegaly tp=1 fn=1; Effusion fn=1; micro tp=1 fp=0 fn=2.
    strict = finding_f1(refs, hyps)
    assert strict["micro_precision"] == pytest.approx(1.0)
    assert strict["micro_recall"] == pytest.approx(1 / 3)
    assert strict["micro_f1"] == pytest.approx(0.5)
    assert strict["per_label"]["Cardiomegaly"]["f1"] == pytest.approx(2 / 3)
    assert strict["per_label"]["Pleural Effusion"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert strict["macro_precision"] == pytest.approx(1 / 14)
    assert strict["macro_recall"] == pytest.approx(0.5 / 14)
    assert strict["macro_f1"] == pytest.approx((2 / 3) / 14)
    # Uncertain as positive: Effusion becomes tp=1; micro tp=2 fp=0 fn=1.
    lenient = finding_f1(refs, hyps, uncertain_as_positive=True)
    assert lenient["micro_recall"] == pytest.approx(2 / 3)
    assert lenient["micro_f1"] == pytest.approx(0.8)
    assert lenient["macro_f1"] == pytest.approx((2 / 3 + 1) / 14)
    assert lenient["n"] == 2


def test_finding_f1_false_positive_and_zero_division():
    refs, hyps = [{"Edema": 0}, {}], [{"Edema": 1}, {"Edema": 1}]
    out = finding_f1(refs, hyps)
    assert out["per_label"]["Edema"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert out["micro_precision"] == 0.0 and out["micro_f1"] == 0.0
    # Labels with nothing to score take zero_division (sklearn's convention).
    assert finding_f1(refs, hyps, zero_division=1.0)["macro_f1"] == pytest.approx(13 / 14)


def test_finding_f1_on_texts():
    refs = ["Cardiomegaly. Small left pleural effusion.", "No acute cardiopulmonary process."]
    hyps = ["The heart is enlarged. No effusion.", "Normal chest radiograph."]
    out = finding_f1(refs, hyps)
    # Cardiomegaly tp; effusion fn; No Finding tp (report 2): micro tp=2 fp=0 fn=1.
    assert out["micro_precision"] == pytest.approx(1.0)
    assert out["micro_recall"] == pytest.approx(2 / 3)
    assert finding_f1(refs, refs)["micro_f1"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        finding_f1(refs, hyps[:1])


@pytest.mark.skipif(not IU_REPORTS.exists(), reason="shared IU X-ray reports not available")
def test_real_iu_reports_agree_with_their_mesh_tags():
    """Sanity check on real text: MeSH tags are not CheXpert labels, so the bounds are loose."""
    rows = list(csv.DictReader(IU_REPORTS.open(encoding="utf-8")))
    pairs = {"Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Pleural Effusion", "No Finding": "normal"}
    recall = {}
    for label, mesh in pairs.items():
        tagged = [r for r in rows if any(m.split("/")[0].strip() == mesh for m in r["MeSH"].split(";"))]
        hits = sum(label_report(f"{r['findings']} {r['impression']}")[label] in (1, -1) for r in tagged)
        recall[label] = hits / len(tagged)
    print(f"\nIU X-ray recall of MeSH-tagged findings: {recall}")
    assert recall["Cardiomegaly"] >= 0.9 and recall["Pleural Effusion"] >= 0.9 and recall["No Finding"] >= 0.85
