"""Paired comparison of two patient-education evaluations on the same held-out questions.

`evaluate --task educate` scores each system's mean ROUGE-L and Flesch-Kincaid grade; a difference
of means over 60 questions says little without the per-question pairing. This reads both runs'
predictions files, pairs the answers question by question (both runs take the held-out questions
in the same seeded order; MedQuAD repeats some question ids, so pairing is by position and the ids
are checked), scores each against the MedQuAD reference and reports how often the new run scores
higher, lower or the same and the mean paired difference with its standard error, for ROUGE-L and
for the FK grade (lower is plainer).

    .venv/bin/python benchmarks/compare_educate.py NEW.json OLD.json [--out result.json]

NEW.json and OLD.json are `evaluate --task educate` results (each names its predictions file).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant.evaluate import write_atomic  # noqa: E402
from assistant.metrics import flesch_kincaid_grade, rouge_l  # noqa: E402


def load_answers(result_path: Path) -> list[tuple[str, str]]:
    """(qid, scored answer text) of one evaluation in its order (its predictions file, beside it or under ROOT)."""
    result = json.loads(result_path.read_text(encoding="utf-8"))
    name = Path(result["predictions_file"])
    path = next((p for p in (result_path.parent / name.name, ROOT / name) if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{result_path} names predictions file {name}, which is not there")
    return [(row["qid"], row["answer"]) for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if row]


def paired(new: list[float], old: list[float]) -> dict:
    """How often new scores higher, lower or the same, and the mean difference new - old with its standard error."""
    diffs = [a - b for a, b in zip(new, old)]
    spread = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"n": len(diffs), "new_higher": sum(d > 0 for d in diffs), "new_lower": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs), "mean_new": statistics.fmean(new), "mean_old": statistics.fmean(old),
            "mean_difference": statistics.fmean(diffs), "standard_error": spread}


def compare(new: list[tuple[str, str]], old: list[tuple[str, str]], references: list[tuple[str, str]]) -> dict:
    """Per-question ROUGE-L and FK grade over the questions both runs answered (the shorter run's
    count); answers without words have no grade and leave the grade pairing."""
    count = min(len(new), len(old))
    if count == 0 or len(references) < count:
        raise ValueError(f"cannot pair {len(new)} and {len(old)} answers with {len(references)} references")
    rows = list(zip(new[:count], old[:count], references[:count]))
    if any(not (a == b == r) for (a, _), (b, _), (r, _) in rows):
        raise ValueError("the two evaluations did not answer the same questions in the same order")
    rouge = paired([rouge_l(ref, a) for (_, a), _, (_, ref) in rows], [rouge_l(ref, b) for _, (_, b), (_, ref) in rows])
    graded = [(g, h) for g, h in ((flesch_kincaid_grade(a), flesch_kincaid_grade(b)) for (_, a), (_, b), _ in rows)
              if g is not None and h is not None]
    grade = paired([g for g, _ in graded], [h for _, h in graded])
    return {"questions": count, "ROUGE_L": rouge, "fk_grade": grade}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("new", type=Path, help="evaluate --task educate result of the system under test")
    parser.add_argument("old", type=Path, help="evaluate --task educate result to compare against")
    parser.add_argument("--out", type=Path, default=None, help="write the comparison JSON here")
    args = parser.parse_args(argv)
    from assistant.evaluate_educate import held_out_questions
    from assistant.retrieval_passages import load_medquad

    try:
        new, old = load_answers(args.new), load_answers(args.old)
        _, questions = held_out_questions(load_medquad())
        result = {"new": str(args.new), "old": str(args.old),
                  **compare(new, old, [(q["qid"], q["answer"]) for q in questions])}
    except (OSError, ValueError, KeyError) as error:  # a missing or foreign file, runs of other questions
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
