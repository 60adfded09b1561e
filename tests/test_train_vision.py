"""Vision training/evaluation entry points: metrics, the shipped weights' evaluation, CLI wiring."""

from __future__ import annotations

import json

import numpy as np

from assistant.cli import build_parser, main
from assistant.train_vision import MIN_POSITIVES, finding_metrics
from assistant.vision import FINDINGS


def test_finding_metrics_nulls_rare_findings_and_scores_normal_vs_abnormal():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 14), np.float32)
    labels[:20, 0] = 1.0  # Atelectasis: 20 positives
    labels[:MIN_POSITIVES - 1, 13] = 1.0  # Hernia: too few
    probs = rng.random((40, 14)) * 0.1
    probs[:20, 0] += 0.8  # perfectly separable Atelectasis
    metrics = finding_metrics(probs, labels)
    assert metrics["per_finding"]["Atelectasis"] == {"auroc": 1.0, "positives": 20}
    assert metrics["per_finding"]["Hernia"] == {"auroc": None, "positives": MIN_POSITIVES - 1}
    assert metrics["findings_scored"] == 1 and metrics["macro_auroc"] == 1.0
    assert metrics["abnormal"] == 20 and metrics["normal_vs_abnormal_auroc"]["max"] == 1.0


def test_evaluate_vision_on_the_shipped_weights_writes_json(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["evaluate-vision", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    test = metrics["nih_test"]
    assert set(test["per_finding"]) == set(FINDINGS) and 100 <= test["images"] <= 200
    assert 0.5 < test["normal_vs_abnormal_auroc"]["noisy_or"] <= 1.0  # better than chance
    assert 0.5 < metrics["pneumoniamnist_test"]["auroc"] <= 1.0
    assert json.loads(capsys.readouterr().out) == metrics


def test_train_vision_command_line():
    args = build_parser().parse_args(["train-vision", "--out", "x", "--resume", "--epochs", "3"])
    assert (args.out, args.resume, args.epochs, args.pretrain_epochs) == ("x", True, 3, None)


def test_evaluate_vision_with_a_wrong_folder_is_one_error_line(tmp_path, capsys):
    assert main(["evaluate-vision", "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train-vision" in err and "\n" not in err
