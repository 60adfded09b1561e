"""evaluate --task retrieval: own-report recall@k and labeler agreement, on written studies and on IU."""

from __future__ import annotations

import json

import pytest

from assistant.evaluate_retrieval import label_agreement, report_retrieval
from assistant.retrieval import EmbedderSpec
from assistant.retrieval_sources import IuStudy
from conftest import SHARED_DATA
from test_evaluate import WordHashEmbedder

SPEC = EmbedderSpec("word-hash", "1", 128)


def embed(texts):
    return WordHashEmbedder().encode(list(texts))


def study(sid: str, split: str, findings: str, impression: str) -> IuStudy:
    return IuStudy(sid, split, findings, impression, "")


def test_report_retrieval_finds_own_findings_and_counts_identical_texts():
    test = [study("a", "test", "Large right pleural effusion.", "Right effusion."),
            study("b", "test", "Left apical pneumothorax.", "Left pneumothorax."),
            study("c", "test", "Heart size normal. Lungs clear.", "Heart size normal."),
            study("d", "test", "Heart size normal. Lungs clear.", "Heart size normal.")]
    result = report_retrieval(test, test[:2], embed, SPEC)
    assert result["recall_at_1"] == 1.0 and result["n_queries"] == 2 and result["n_indexed"] == 4
    assert result["chance_at_1"] == 0.25 and result["chance_at_10"] == 2.5  # k over the indexed count
    both = report_retrieval(test, test[2:], embed, SPEC)
    # c and d share one findings text (a tie, broken by case id): by id d misses at @1, by text both are found.
    assert both["recall_at_1"] == 0.5 and both["recall_at_1_identical_text_counts"] == 1.0
    assert both["recall_at_5"] == 1.0


def test_label_agreement_compares_labeler_findings():
    train = [study("t1", "train", "Large right pleural effusion.", "Effusion."),
             study("t2", "train", "Left apical pneumothorax.", "Pneumothorax."),
             study("t3", "train", "Heart size normal. Lungs clear.", "No acute cardiopulmonary disease."),
             study("t4", "train", "Degenerative changes of the thoracic spine.", "Stable spine.")]  # no label
    queries = [study("q1", "test", "Small right pleural effusion.", "Effusion."),
               study("q2", "test", "Lungs clear. Heart size normal.", "No acute cardiopulmonary disease."),
               study("q3", "test", "Mild degenerative changes of the spine.", "Stable spine.")]
    result = label_agreement(train, queries, embed, SPEC)
    assert result["n_indexed"] == 4 and result["precision_at_1"] == 1.0 and result["exact_at_1"] == 1.0
    assert result["precision_at_5"] == 0.25  # one of the four cases agrees with each query
    assert result["chance_precision"] == 0.25 and result["queries_with_a_finding"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["queries_without_labels"] == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.skipif(not (SHARED_DATA / "iu-xray").is_dir(), reason="needs ../shared/data/iu-xray")
def test_retrieval_task_on_iu(tmp_path, capsys):
    from assistant.evaluate import evaluate

    out = tmp_path / "eval-retrieval.json"
    evaluate("retrieval", limit=20, embedder=WordHashEmbedder(), out=out, command="test")
    saved = json.loads(out.read_text())
    recall, labels = saved["metrics"]["report_retrieval"], saved["metrics"]["label_agreement"]
    assert saved["task"] == "retrieval" and saved["dataset"]["n_evaluated"] == 20
    assert recall["n_indexed"] == saved["dataset"]["n_split"] == 590 and labels["n_indexed"] == 2069
    assert 0.0 <= recall["recall_at_1"] <= recall["recall_at_5"] <= recall["recall_at_10"] <= 1.0
    assert labels["precision_at_1"] is not None and 0.0 < labels["chance_precision"] < 1.0
    assert saved["embedder"] == {"name": "WordHashEmbedder", "version": "supplied by the caller", "dim": 128}
    printed = capsys.readouterr().out
    assert "impression -> own findings (among 590 test findings)" in printed and "| chance |" in printed
