"""Metrics on hand-computed examples: R2Gen/pycocoevalcap, ReXrank BLEU-2, finding F1, education,
summary faithfulness and triage."""

from __future__ import annotations

import math
import shutil

import pytest

from assistant.metrics import (
    clean_report_iu_xray,
    clinical_f1,
    coco_scores,
    count_syllables,
    education_scores,
    flesch_kincaid_grade,
    items_match,
    mentioned_items,
    problem_coverage,
    rexrank_bleu2,
    rexrank_tokens,
    rouge_l,
    sentence_bleu,
    summary_faithfulness,
    triage_metrics,
)


# ---- R2Gen cleaning and pycocoevalcap ----------------------------------------------------------

@pytest.mark.parametrize("raw, cleaned", [
    ("The heart is normal. No effusion, or pneumothorax.", "the heart is normal . no effusion or pneumothorax ."),
    ("1. Clear lungs. 2. No acute disease.", "clear lungs . no acute disease ."),
    ("Heart size normal.. Lungs (clear).", "heart size normal . lungs clear ."),
    ("T-spine: mild degenerative change.", "t-spine mild degenerative change ."),  # "-" survives, ":" does not
])
def test_clean_report_matches_r2gen(raw, cleaned):
    assert clean_report_iu_xray(raw) == cleaned


def test_coco_scores_on_a_hand_computed_pair():
    # cleaned: ref "the lungs are clear ." (5 tokens), hyp "the lungs clear ." (4 tokens)
    scores = coco_scores(["The lungs are clear."], ["The lungs clear."], meteor=False)
    penalty = math.exp(1 - 5 / 4)
    assert scores["BLEU_1"] == pytest.approx(penalty * 4 / 4, rel=1e-6)
    assert scores["BLEU_2"] == pytest.approx(penalty * math.sqrt(1 * 2 / 3), rel=1e-6)
    # LCS 4: P = 1, R = 0.8; F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    assert scores["ROUGE_L"] == pytest.approx(2.44 * 0.8 / (0.8 + 1.44), rel=1e-9)
    assert scores["METEOR"] is None and scores["METEOR_error"] == "not requested"


def test_coco_scores_identical_reports_score_perfectly():
    refs = ["The lungs are clear.", "Heart size is enlarged. Small left effusion."]
    scores = coco_scores(refs, refs, meteor=False)
    assert all(scores[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-6) for n in range(1, 5))
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["CIDEr"] == pytest.approx(10.0)  # CIDEr-D's x10 scale: a perfect match is 10


def test_coco_scores_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        coco_scores(["a", "b"], ["a"], meteor=False)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs Java")
def test_meteor_runs_offline_and_matches_pycocoevalcap():
    refs = ["The lungs are clear.", "Heart size is normal."]
    # A newline in a generated report once desynchronised pycocoevalcap's pipe protocol (and hung).
    scores = coco_scores(refs, ["The lungs\nare clear.", "Heart is enlarged."])
    # pycocoevalcap's own Meteor().compute_score on the same cleaned texts gives 0.36297914659987984.
    assert scores["METEOR"] == pytest.approx(0.36297914659987984, abs=1e-9)
    assert coco_scores(refs, refs)["METEOR"] == pytest.approx(1.0, abs=0.01)


def test_meteor_without_java_is_none_with_a_reason(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    scores = coco_scores(["The lungs are clear."], ["The lungs are clear."])
    assert scores["METEOR"] is None and "java not found" in scores["METEOR_error"]


# ---- ReXrank BLEU-2 ----------------------------------------------------------------------------

def test_rexrank_tokens_split_full_stops_only():
    assert rexrank_tokens("Heart normal. Lungs, clear.") == ["heart", "normal", ".", "lungs,", "clear", "."]


def test_sentence_bleu2_hand_computed():
    ref, hyp = rexrank_tokens("the lungs are clear."), rexrank_tokens("the lungs clear.")
    # unigrams 4/4, bigrams 2/3 ("the lungs", "clear ."), brevity exp(1 - 5/4)
    assert sentence_bleu(ref, hyp) == pytest.approx(math.exp(-0.25) * math.sqrt(2 / 3))
    # no bigram match: smoothing method 1 uses 0.1 matches -> sqrt(1/2 * 0.1/1)
    assert sentence_bleu(["a", "c"], ["a", "b"]) == pytest.approx(math.sqrt(0.5 * 0.1))
    assert sentence_bleu(["a"], ["b"]) == 0.0 and sentence_bleu(["a"], []) == 0.0


def test_rexrank_bleu2_is_the_mean_over_studies():
    perfect, none = "no acute disease.", "zzz"
    assert rexrank_bleu2([perfect, perfect], [perfect, none]) == pytest.approx(0.5)


# ---- finding F1 --------------------------------------------------------------------------------

def test_clinical_f1_hand_computed():
    refs = ["There is a large pleural effusion.", "The lungs are clear."]
    hyps = ["Large pleural effusion.", "Cardiomegaly."]
    # TP effusion; FP cardiomegaly; FN No Finding (the second reference is normal)
    scores = clinical_f1(refs, hyps)
    assert scores["micro_precision"] == scores["micro_recall"] == scores["micro_f1"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx(1 / 14)  # only Pleural Effusion scores, 14 labels
    assert scores["per_label_f1"]["Pleural Effusion"] == 1.0 and scores["per_label_support"]["No Finding"] == 1


# ---- education ---------------------------------------------------------------------------------

def test_rouge_l_hand_computed():
    # LCS 5 of 6 reference words, all 5 hypothesis words: P = 1, R = 5/6
    p, r = 1.0, 5 / 6
    assert rouge_l("the cat sat on the mat", "The cat on the mat.") == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    assert rouge_l("abc", "xyz") == 0.0


@pytest.mark.parametrize("word, syllables", [
    ("the", 1), ("make", 1), ("table", 2), ("free", 1), ("created", 2), ("jumped", 1), ("boxes", 2),
    ("lines", 1), ("year", 1), ("water", 2), ("daily", 2), ("medicine", 3), ("hospital", 3),
])
def test_syllable_counts(word, syllables):
    assert count_syllables(word) == syllables


def test_flesch_kincaid_grade_hand_computed():
    # 6 words, 1 sentence, 6 syllables: 0.39*6 + 11.8*1 - 15.59
    assert flesch_kincaid_grade("The cat sat on the mat.") == pytest.approx(0.39 * 6 + 11.8 - 15.59)
    # 6 words, 2 sentences, 8 syllables (water, daily: 2 each)
    assert flesch_kincaid_grade("Take one pill. Drink water daily.") == pytest.approx(0.39 * 3 + 11.8 * 8 / 6 - 15.59)
    assert flesch_kincaid_grade("...") is None


def test_education_scores_average_over_answers():
    scores = education_scores(["take one pill", "rest"], ["Take one pill.", "Rest."])
    assert scores["ROUGE_L"] == pytest.approx(1.0) and scores["n"] == 2


# ---- EHR summary faithfulness ------------------------------------------------------------------

def test_items_match_is_fuzzy_and_case_insensitive():
    assert items_match("Lisinopril 10 mg", "lisinopril 10 MG Oral Tablet")
    assert items_match("acute bronchitis", "Acute bronchitis (disorder)")
    assert items_match("metformn", "Metformin")  # a typo
    assert not items_match("metformin", "lisinopril 10 MG Oral Tablet")
    assert not items_match("", "anything")


def test_summary_faithfulness_counts_unsupported_items():
    record = ["lisinopril 10 MG Oral Tablet", "Hypertension", "Prediabetes"]
    result = summary_faithfulness(["Lisinopril", "hypertension", "warfarin"], record)
    assert result == {"named": 3, "supported": 2, "unsupported": ["warfarin"], "supported_fraction": 2 / 3}
    assert summary_faithfulness([], record)["supported_fraction"] is None


def test_mentioned_items_and_problem_coverage():
    summary = "Known hypertension; prediabets on diet. Takes lisinopril."
    assert mentioned_items(summary, ["Lisinopril", "Warfarin", "Prediabetes"]) == ["Lisinopril", "Prediabetes"]
    coverage = problem_coverage(summary, ["Hypertension", "Prediabetes", "Acute bronchitis (disorder)"])
    assert coverage["coverage"] == pytest.approx(2 / 3) and coverage["missing"] == ["Acute bronchitis (disorder)"]


# ---- triage ------------------------------------------------------------------------------------

def test_triage_metrics_hand_computed():
    expected = ["emergency", "emergency", "urgent", "none", "none", "none", "none"]
    predicted = ["emergency", "urgent", "emergency", "none", "urgent", "none", "none"]
    categories = ["Stroke", "Sepsis", "Sepsis", None, None, None, None]
    flagged = [{"Stroke"}, {"Sepsis"}, {"Sepsis"}, set(), {"Sepsis"}, set(), set()]
    m = triage_metrics(expected, predicted, categories, flagged)
    assert m["emergency_recall"] == 0.5
    assert m["urgent_accuracy"] == 0.0 and m["urgent_flagged_any"] == 1.0  # over-triaged to emergency
    assert m["false_alarm_rate"] == 0.25
    # Sepsis: the emergency was under-triaged (miss), the urgent one over-triaged (safe, a hit)
    assert m["per_category_recall"] == {"Sepsis": 0.5, "Stroke": 1.0}
    assert m["confusion"]["emergency"] == {"emergency": 1, "urgent": 1}
    assert m["counts"] == {"emergency": 2, "urgent": 1, "none": 4}
