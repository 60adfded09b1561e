"""Effect of retrieval-augmented drafting on the held-out report metrics (issue: similar prior cases).

Compares two evaluation runs of the same model on the same IU X-ray test studies: with similar
training-split reports in the prompt (`evaluate --task report --rag`) and without (`evaluate --task
report`), scoring both sets of stored predictions with the evaluation's own scorer. It also splits
the studies by whether retrieval put any case into the prompt (the app's threshold drops cases
below it), since only those prompts differ (the others can still differ a little: a batch of other
prompts rounds differently in bf16). No generation happens here: a few minutes of scoring.

    .venv/bin/python benchmarks/rag_effect.py [--rag benchmarks/results/eval-report-rag.json]
                                              [--plain benchmarks/results/eval-report.json]

Writes benchmarks/results/rag-effect.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, installed or not

from assistant.evaluate import write_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def predictions(result_path: Path) -> dict[str, tuple[str, str]]:
    result = json.loads(result_path.read_text(encoding="utf-8"))
    side = ROOT / result["predictions_file"]
    rows = [json.loads(line) for line in side.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["id"]: (row["findings"], row["impression"]) for row in rows}


def with_context(studies) -> set[str]:
    """Ids of the studies whose prompt got at least one case (retrieval rerun: it is deterministic)."""
    from assistant.config import AssistantConfig
    from assistant.evaluate import case_finder
    from assistant.evaluate_report import similar_cases

    finder = case_finder(AssistantConfig())
    return {study.id for study, cases in zip(studies, similar_cases(finder, studies)) if cases}


def score(studies, drafts: dict[str, tuple[str, str]]) -> dict:
    from assistant.evaluate_report import score_system

    metrics = score_system(studies, [drafts[s.id] for s in studies])
    r2gen = metrics["r2gen"]
    return {"n": len(studies), **{k: r2gen[k] for k in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")},
            "finding_f1_micro": r2gen["finding_f1"]["micro_f1"], "finding_f1_macro": r2gen["finding_f1"]["macro_f1"],
            "rexrank_BLEU_2": metrics["rexrank"]["BLEU_2"]}


def main(argv: list[str] | None = None) -> int:
    from assistant.evaluate_report import load_studies

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rag", type=Path, default=RESULTS / "eval-report-rag.json")
    parser.add_argument("--plain", type=Path, default=RESULTS / "eval-report.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "rag-effect.json")
    args = parser.parse_args(argv)
    rag, plain = predictions(args.rag), predictions(args.plain)
    studies = [s for s in load_studies("test") if s.id in rag and s.id in plain]
    if not studies:
        print("error: the two runs share no study", file=sys.stderr)
        return 2
    given = with_context(studies)
    subsets = {"all": studies, "with_context": [s for s in studies if s.id in given],
               "without_context": [s for s in studies if s.id not in given]}
    result = {
        "benchmark": "rag_effect",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/rag_effect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": {"rag": str(args.rag.relative_to(ROOT)), "plain": str(args.plain.relative_to(ROOT))},
        "rag_settings": json.loads(args.rag.read_text(encoding="utf-8")).get("retrieval_augmented"),
        "scores": {name: {"rag": score(subset, rag), "plain": score(subset, plain)}
                   for name, subset in subsets.items() if subset},
        "identical_drafts": sum(rag[s.id] == plain[s.id] for s in studies),
    }
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["scores"], indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
