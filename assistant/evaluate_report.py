"""Report-generation evaluation on IU X-ray (R2Gen test split), with two baselines beside the model.

IU X-ray carries no images here, so the model drafts from the study's indication alone
(`Assistant.draft_report([], indication, text_only=True)`): a measure of the language side, never
of image reading. Two protocols: R2Gen (reference = findings, pycocoevalcap metrics) and ReXrank
(reference = "Findings: … Impression: …", mean BLEU-2), plus the rule labeler's finding F1.
Baselines: copy the findings of the training study whose indication is most similar (MiniLM
cosine), and one constant "most common normal report" from the training split.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .labeler import label_report
from .metrics import clinical_f1, coco_scores, rexrank_bleu2
from .pipeline import final_text, report_prompt
from .report import DraftReport, parse_continuation
from .safety import DRAFT_LABEL, label_draft

IU_FOLDER = "iu-xray"
ANNOTATION = "r2gen_iu_xray_annotation.json"
REPORTS_CSV = "indiana_reports.csv"
REXRANK_TEST = "rexrank/ReXRank_IUXray_test.json"
LEADERBOARD = "rexrank/result_iu_xray.csv"

# ReXrank's published columns and whether we can compute them here (no model weights can be fetched).
REXRANK_COLUMNS = {
    "BLEU": "computed: mean per-study BLEU-2 as CXR-Report-Metric defines it (fast_bleu, smoothing 1)",
    "BertScore": "not computed: needs distilroberta-base weights (BERTScorer), not downloadable here",
    "SembScore": "not computed: cosine of CheXbert embeddings, needs the CheXbert checkpoint",
    "RadGraph": "not computed: RadGraph entity/relation F1, needs the PhysioNet RadGraph checkpoint",
    "RadCliQ-v0": "not computed: regression over BLEU, BERTScore, SembScore and RadGraph (needs all)",
    "RadCliQ-v1": "not computed: regression over BLEU, BERTScore, SembScore and RadGraph (needs all)",
}
PROTOCOL_NOTES = [
    "R2Gen protocol: findings (the annotation's `report`) as reference; both sides cleaned with R2Gen's "
    "clean_report_iu_xray; pycocoevalcap Bleu(4) corpus score, METEOR 1.5, ROUGE_L, CIDEr-D.",
    "R2Gen itself also truncates references to 60 tokens and maps words seen < 3 times in training to "
    "<unk>; we score against the full cleaned findings.",
    "CIDEr's document frequencies come from the scored references: a --limit subset is not comparable "
    "with the full split.",
    "ReXrank protocol: reference 'Findings: {section_findings} Impression: {section_impression}' from "
    "ReXRank_IUXray_test.json; prediction 'Findings: {findings} Impression: {impression}'.",
    "Finding F1: the project's CheXpert-style rule labeler (not CheXbert); uncertain counts as negative.",
]


@dataclass(frozen=True)
class Study:
    id: str  # R2Gen/ReXrank id, e.g. CXR3030_IM-1405
    indication: str
    findings: str  # the R2Gen reference
    impression: str  # from indiana_reports.csv
    rexrank_reference: str = ""  # "Findings: … Impression: …" (test split only)


def shared_data_dir() -> Path:
    """`../shared/data` beside the repository (override with ASSISTANT_SHARED_DATA)."""
    env = os.environ.get("ASSISTANT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def iu_uid(study_id: str) -> int:
    """R2Gen id "CXR3030_IM-1405" -> Kaggle/Open-i uid 3030."""
    match = re.match(r"CXR(\d+)_", study_id)
    if not match:
        raise ValueError(f"not an IU X-ray study id: {study_id!r}")
    return int(match.group(1))


def load_studies(split: str, root: Path | None = None) -> list[Study]:
    """The R2Gen split in annotation order, joined to indiana_reports.csv (and ReXrank for test)."""
    folder = (root or shared_data_dir()) / IU_FOLDER
    if not (folder / ANNOTATION).is_file():
        raise FileNotFoundError(f"IU X-ray data not found at {folder}: set ASSISTANT_SHARED_DATA to the data folder")
    annotation = json.loads((folder / ANNOTATION).read_text(encoding="utf-8"))[split]
    with (folder / REPORTS_CSV).open(newline="", encoding="utf-8") as handle:
        rows = {int(row["uid"]): row for row in csv.DictReader(handle)}
    rexrank = json.loads((folder / REXRANK_TEST).read_text(encoding="utf-8")) if split == "test" else {}
    studies = []
    for item in annotation:
        row = rows[iu_uid(item["id"])]
        ref = rexrank.get(item["id"])
        studies.append(Study(
            id=item["id"], indication=(row["indication"] or "").strip(), findings=item["report"].strip(),
            impression=(row["impression"] or "").strip(),
            # Their evaluation script's exact string (a missing section prints as "None").
            rexrank_reference=f"Findings: {ref['section_findings']} Impression: {ref['section_impression']}"
            if ref else ""))
    return studies


def rexrank_text(findings: str, impression: str) -> str:
    return f"Findings: {findings} Impression: {impression}"


# ---- baselines ---------------------------------------------------------------------------------

def most_common_normal(train: Sequence[Study]) -> Study:
    """The training report written most often among those the labeler calls No Finding."""
    normal = [s for s in train if label_report(s.findings)["No Finding"] == 1]
    counts = Counter((s.findings, s.impression) for s in normal)
    # Most frequent, ties broken alphabetically so the baseline never depends on file order.
    (findings, impression), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Study(id="constant", indication="", findings=findings, impression=impression)


def nearest_neighbours(train: Sequence[Study], test: Sequence[Study], embedder) -> list[Study]:
    """For each test study, the training study whose indication embeds closest (cosine)."""
    def encode(texts: list[str]):
        return embedder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)

    train_vectors = encode([s.indication for s in train])  # (N_train, D), unit norm
    test_vectors = encode([s.indication for s in test])  # (N_test, D)
    best = (test_vectors @ train_vectors.T).argmax(axis=1)  # first maximum: deterministic
    return [train[int(i)] for i in best]


# ---- the model ---------------------------------------------------------------------------------

def _sections(draft: str) -> tuple[str, str]:
    body = draft.replace(DRAFT_LABEL, "").strip()
    match = re.match(r"FINDINGS:\n(.*?)(?:\n\nIMPRESSION:\n(.*))?$", body, re.DOTALL)
    return (match.group(1).strip(), (match.group(2) or "").strip()) if match else (body, "")


_PLACEHOLDERS = _sections(DraftReport("", "").to_text())  # what a draft says when a section is empty


def split_draft(draft: str) -> tuple[str, str]:
    """(findings, impression) of a labelled draft; report.py's "not generated" notes become ""."""
    findings, impression = _sections(draft)
    return ("" if findings == _PLACEHOLDERS[0] else findings, "" if impression == _PLACEHOLDERS[1] else impression)


def generate_drafts(assistant, studies: Sequence[Study], progress: bool = True, batch_size: int = 1,
                    similar: Sequence[Sequence] | None = None) -> tuple[list[tuple[str, str]], list[float]]:
    """Draft each study from its indication alone (and `similar[i]`'s prior reports as context);
    returns (findings, impression) and the seconds each draft took (a batch's time shared evenly).

    `batch_size` 1 streams through `Assistant.draft_report`, exactly the app's path; larger batches
    decode the same prompts together (`ClinicalVLM.generate_batch`), several times the throughput."""
    similar = similar if similar is not None else [()] * len(studies)
    drafts, seconds = [], []
    for first in range(0, len(studies), max(1, batch_size)):
        batch = list(zip(studies, similar))[first:first + max(1, batch_size)]
        start = time.perf_counter()
        batched = batch_size > 1 and assistant.config.backend.kind == "local"  # a server batches its own way
        finals = _draft_batch(assistant, batch) if batched else [_draft_one(assistant, *item) for item in batch]
        elapsed = time.perf_counter() - start
        seconds.extend([elapsed / len(batch)] * len(batch))
        drafts.extend(split_draft(final) for final in finals)
        if progress:
            print(f"  [{len(drafts)}/{len(studies)}] {elapsed:.1f} s", file=sys.stderr, flush=True)
    return drafts, seconds


def _draft_one(assistant, study: Study, similar: Sequence) -> str:
    return final_text(assistant.draft_report([], study.indication, text_only=True, similar=similar))


def _draft_batch(assistant, batch: Sequence[tuple[Study, Sequence]]) -> list[str]:
    prompts = [report_prompt([], study.indication, similar) for study, similar in batch]
    return [label_draft(parse_continuation(text).to_text()) for text in assistant.vlm.generate_batch(prompts)]


def similar_cases(finder, studies: Sequence[Study]) -> list[tuple]:
    """What the app's draft flow puts in the prompt before a draft exists: the top cases of the
    training-split index found by the indication, above the index's similarity threshold."""
    from .app_retrieval import find_similar

    return [find_similar(finder, indication=study.indication).cases for study in studies]


# ---- scoring -----------------------------------------------------------------------------------

def score_system(studies: Sequence[Study], drafts: Sequence[tuple[str, str]], meteor: bool = True) -> dict:
    refs = [s.findings for s in studies]
    hyps = [findings for findings, _ in drafts]
    rex_refs = [s.rexrank_reference for s in studies]
    rex_hyps = [rexrank_text(f, i) for f, i in drafts]
    return {
        "r2gen": {**coco_scores(refs, hyps, meteor=meteor), "finding_f1": clinical_f1(refs, hyps)},
        "rexrank": {"BLEU_2": rexrank_bleu2(rex_refs, rex_hyps), "finding_f1": clinical_f1(rex_refs, rex_hyps)},
        "empty_findings": sum(not f for f, _ in drafts),
    }


def leaderboard(root: Path | None = None) -> dict:
    """ReXrank's published IU X-ray test scores, read from the file (never typed in)."""
    path = (root or shared_data_dir()) / IU_FOLDER / LEADERBOARD
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [{k: (float(v) if k in REXRANK_COLUMNS else v) for k, v in row.items()} for row in csv.DictReader(handle)]
    return {"source": f"shared/data/{IU_FOLDER}/{LEADERBOARD}", "columns": REXRANK_COLUMNS, "rows": rows}


def run_report(assistant, limit: int | None, embedder_factory: Callable[[], object], meteor: bool = True,
               progress: bool = True, batch_size: int = 1, finder=None) -> dict:
    """Generate, build both baselines, score all three; the task-specific part of the result.
    With a case `finder` (an index of training-split reports), drafts are retrieval-augmented."""
    test_all = load_studies("test")
    test = test_all[:limit] if limit is not None else test_all
    train = load_studies("train")
    timings = {}
    start = time.perf_counter()
    similar = similar_cases(finder, test) if finder is not None else None
    timings["retrieval_s"] = time.perf_counter() - start
    start = time.perf_counter()
    drafts, seconds = generate_drafts(assistant, test, progress=progress, batch_size=batch_size, similar=similar)
    timings["generation_s"] = time.perf_counter() - start
    timings["batch_size"] = batch_size
    start = time.perf_counter()
    neighbours = nearest_neighbours(train, test, embedder_factory())
    constant = most_common_normal(train)
    timings["baselines_s"] = time.perf_counter() - start
    start = time.perf_counter()
    systems = {
        "model": drafts,
        "nearest_neighbour": [(s.findings, s.impression) for s in neighbours],
        "constant_normal": [(constant.findings, constant.impression)] * len(test),
    }
    metrics = {name: score_system(test, out, meteor=meteor) for name, out in systems.items()}
    timings["scoring_s"] = time.perf_counter() - start
    timings["seconds_per_study"] = sum(seconds) / len(seconds) if seconds else None
    return {
        "dataset": {"name": "IU X-ray (Indiana University chest X-ray reports)", "split": "test",
                    "split_source": f"R2Gen annotation ({ANNOTATION})", "order": "annotation order",
                    "n_split": len(test_all), "n_evaluated": len(test), "n_train": len(train), "limit": limit},
        "conditioning": "indication only, no image" + (", plus similar training-split reports" if finder else ""),
        "retrieval_augmented": _rag_summary(finder, similar),
        "reference": {"r2gen": "findings", "rexrank": "findings + impression (ReXrank's test file)"},
        "protocol": PROTOCOL_NOTES,
        "baselines": {"nearest_neighbour": "findings (and impression) of the train-split study with the most "
                                           "similar indication (MiniLM cosine)",
                      "constant_normal": {"description": "the most common No-Finding train report, for every study",
                                          "findings": constant.findings, "impression": constant.impression}},
        "metrics": metrics,
        "counts": {"studies": len(test), "with_indication": sum(bool(s.indication) for s in test),
                   "model_empty_findings": metrics["model"]["empty_findings"]},
        "timing": timings,
        "leaderboard": leaderboard(),
        "predictions": [{"id": s.id, "findings": f, "impression": i} for s, (f, i) in zip(test, drafts)],
    }


def _rag_summary(finder, similar: Sequence[Sequence] | None) -> dict | None:
    if finder is None or similar is None:
        return None
    counts = [len(cases) for cases in similar]
    return {"index": "IU X-ray R2Gen train split reports (the app's index-iu)",
            "query": "the indication (the app's first draft: no draft text yet, no IU images)",
            "min_similarity": finder.store.spec.min_similarity,
            "mean_cases_in_prompt": sum(counts) / len(counts) if counts else 0.0,
            "studies_without_close_case": sum(not n for n in counts)}
