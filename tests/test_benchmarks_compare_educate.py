"""benchmarks/compare_educate.py: two educate evaluations paired question by question."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, load_benchmark


@pytest.fixture(scope="module")
def compare_educate():
    return load_benchmark("compare_educate")


def write_run(folder, name, rows):
    predictions = folder / f"{name}.predictions.jsonl"
    predictions.write_text("".join(json.dumps({"qid": q, "answer": a, "sources": []}) + "\n" for q, a in rows))
    result = folder / f"{name}.json"
    result.write_text(json.dumps({"task": "educate", "predictions_file": f"benchmarks/results/{predictions.name}"}))
    return result


def test_answers_pair_by_position_and_score_against_the_reference(compare_educate, tmp_path):
    references = [("q1", "Gout is a kind of arthritis that hurts the big toe."),
                  ("q1", "Ice and rest can ease the pain of gout."),  # MedQuAD repeats question ids
                  ("q2", "See a doctor if the joint is hot and red.")]
    new = compare_educate.load_answers(write_run(tmp_path, "new", [
        ("q1", "Gout is arthritis that hurts the big toe."), ("q1", "Ice and rest ease the pain."),
        ("q2", "See a doctor if the joint is hot.")]))
    old = compare_educate.load_answers(write_run(tmp_path, "old", [
        ("q1", "Hyperuricemia precipitates inflammatory arthropathy."), ("q1", "Ice and rest ease the pain."),
        ("q2", "Consult a physician regarding erythematous articulations.")]))
    result = compare_educate.compare(new, old, references)
    rouge, grade = result["ROUGE_L"], result["fk_grade"]
    assert result["questions"] == 3 and rouge["n"] == 3
    assert (rouge["new_higher"], rouge["new_lower"], rouge["ties"]) == (2, 0, 1)
    assert rouge["mean_difference"] == pytest.approx(rouge["mean_new"] - rouge["mean_old"]) and rouge["mean_difference"] > 0
    assert grade["new_lower"] == 2 and grade["mean_difference"] < 0  # the plain answers grade lower
    assert rouge["standard_error"] > 0


def test_runs_of_other_questions_are_refused(compare_educate):
    references = [("q1", "Gout hurts."), ("q2", "Ice helps.")]
    with pytest.raises(ValueError, match="same questions"):
        compare_educate.compare([("q1", "a"), ("q2", "b")], [("q2", "b"), ("q1", "a")], references)
    with pytest.raises(ValueError, match="cannot pair"):
        compare_educate.compare([], [("q1", "a")], references)


def test_a_missing_predictions_file_is_named(compare_educate, tmp_path):
    result = tmp_path / "run.json"
    result.write_text(json.dumps({"predictions_file": "benchmarks/results/gone.predictions.jsonl"}))
    with pytest.raises(FileNotFoundError, match="gone.predictions.jsonl"):
        compare_educate.load_answers(result)


def test_the_command_names_a_bad_input_instead_of_a_traceback(compare_educate, tmp_path, capsys):
    assert compare_educate.main([str(tmp_path / "absent.json"), str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
    foreign = tmp_path / "report.json"
    foreign.write_text(json.dumps({"task": "report"}))  # names no predictions file
    assert compare_educate.main([str(foreign), str(foreign)]) == 2
    assert "predictions_file" in capsys.readouterr().err
