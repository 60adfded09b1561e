"""Patient-education evaluation on held-out MedQuAD questions, with the top retrieved passage as baseline.

Questions: the test part of `retrieval_passages.medquad_split` (seed 13, split by question id),
in sha256(seed:qid) order so `--limit N` is a fixed seeded sample across MedQuAD's sources.
Passages: a PassageIndex of the *train* part only (a test question never finds its own answer),
MiniLM embeddings, cached under .cache/eval-educate/ keyed by embedder and split. For each question
the top 3 passages go to `Assistant.educate` at the "general (about age 14)" reading level (or
the one `--reading-level` names), exactly as the app passes retrieved passages.

Measures: retrieval hit@1 / hit@3 (a retrieved passage comes from the question's own source
document, i.e. the same URL: other questions of that page are in the train part);
ROUGE-L (LCS F-measure, beta 1.2) of the answer against the reference answer; Flesch-Kincaid
grade (0.39 x words/sentence + 11.8 x syllables/word - 15.59, syllables by rule:
`metrics.flesch_kincaid_grade`); citation listed (the output ends with a Sources list holding a
URL) and cited in text (the answer body refers to a source as [n]). The answer scored is the
text between the draft label and the Sources list. Baseline row: the top retrieved passage itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .metrics import flesch_kincaid_grade, rouge_l
from .pipeline import REDRAFTING
from .readability import READING_LEVELS
from .retrieval_passages import PassageHit, PassageIndex, load_medquad, medquad_split, passages_from_records

SEED, K = 13, 3
SYSTEM_NAMES = {"model": "model (Assistant.educate, top 3 passages)", "top_passage": "baseline: top retrieved passage"}
Embed = Callable[[Sequence[str]], np.ndarray]


def held_out_questions(records: Sequence[dict], limit: int | None = None, seed: int = SEED):
    """(split, the test questions in seeded order, first `limit` of them)."""
    split = medquad_split(records, seed=seed)
    order = sorted(split.test, key=lambda r: hashlib.sha256(f"{seed}:{r['qid']}".encode()).hexdigest())
    return split, order[:limit] if limit is not None else order


def passage_index(train: Sequence[dict], embed: Embed, embedder: tuple[str, str], cache: Path | None) -> PassageIndex:
    """The train passages' index, loaded from `cache` when it was built with the same embedder."""
    name, version = embedder
    if cache is not None and (cache / "manifest.json").is_file():
        index = PassageIndex.load(cache, embedder=name, version=version)
        if len(index.passages) and {p.qid for p in index.passages} <= {r["qid"] for r in train}:
            return index
    index = PassageIndex.build(train, embed, name, version)
    if cache is not None:
        index.save(cache)
    return index


def with_progress(embed: Embed, total: int, label: str, every: int = 2000) -> Embed:
    """`embed` that reports on stderr how many of `total` texts it has embedded (the index build is long)."""
    done = [0]

    def counted(texts):
        out = embed(texts)
        before, done[0] = done[0], done[0] + len(texts)
        if done[0] // every > before // every or done[0] == total:
            print(f"  {label}: {done[0]:,}/{total:,}", file=sys.stderr, flush=True)
        return out
    return counted


def cache_folder(root: Path, embedder: tuple[str, str]) -> Path:
    """Where the train passages' index for this embedder is kept (`passage_index` checks its contents)."""
    key = hashlib.sha256(f"{embedder[0]}|{embedder[1]}|seed{SEED}".encode()).hexdigest()[:12]
    return root / f"medquad-train-{key}"


def answer_parts(output: str) -> tuple[str, bool]:
    """(the answer without banner, draft label and Sources list; whether a Sources list names a URL)."""
    from .safety import DRAFT_LABEL

    body = output.split(DRAFT_LABEL, 1)[-1]
    cut = body.rfind("\n\nSources:")
    sources = body[cut:] if cut >= 0 else ""
    return (body[:cut] if cut >= 0 else body).strip(), bool(re.search(r"https?://", sources))


def cites_in_text(answer: str, k: int = K) -> bool:
    return any(1 <= int(n) <= k for n in re.findall(r"\[(\d{1,2})\]", answer))


def score_system(references: Sequence[str], answers: Sequence[str], listed: Sequence[bool],
                 in_text: Sequence[bool]) -> dict:
    grades = [g for g in map(flesch_kincaid_grade, answers) if g is not None]
    n = len(answers)
    return {"ROUGE_L": sum(map(rouge_l, references, answers)) / n if n else None,
            "fk_grade_mean": sum(grades) / len(grades) if grades else None,
            "citation_listed": sum(listed) / n if n else None, "cited_in_text": sum(in_text) / n if n else None,
            "mean_words": sum(len(a.split()) for a in answers) / n if n else None,
            "empty_answers": sum(not a.strip() for a in answers)}


def by_site(questions: Sequence[dict], answers: Sequence[str]) -> dict:
    """The model's scores per source site of the questions (rare-disease pages such as GHR and
    GARD read far above the other NIH sites), with the references' grade beside them."""
    groups: dict[str, list[int]] = {}
    for index, question in enumerate(questions):
        site = urlparse(question.get("url") or "").netloc.removeprefix("www.") or "unknown"
        groups.setdefault(site, []).append(index)
    out = {}
    for site, indices in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        scores = score_system([questions[i]["answer"] for i in indices], [answers[i] for i in indices],
                              [False] * len(indices), [False] * len(indices))
        grades = [g for g in (flesch_kincaid_grade(questions[i]["answer"]) for i in indices) if g is not None]
        out[site] = {"n": len(indices), "ROUGE_L": scores["ROUGE_L"], "fk_grade_mean": scores["fk_grade_mean"],
                     "reference_fk_grade_mean": sum(grades) / len(grades) if grades else None}
    return out


def retrieval_hits(questions: Sequence[dict], hits: Sequence[Sequence[PassageHit]], index: PassageIndex) -> dict:
    urls = {p.url for p in index.passages}
    first = [bool(h) and h[0].passage.url == q["url"] for q, h in zip(questions, hits)]
    any_k = [any(x.passage.url == q["url"] for x in h) for q, h in zip(questions, hits)]
    n = len(questions)
    return {"hit_at_1": sum(first) / n if n else None, f"hit_at_{K}": sum(any_k) / n if n else None,
            "answerable": sum(q["url"] in urls for q in questions) / n if n else None,
            "criterion": "a retrieved passage has the question's own source URL"}


def generate_answers(assistant, questions: Sequence[dict], hits: Sequence[Sequence[PassageHit]],
                     progress: bool = True, reading_level: str = READING_LEVELS[1]
                     ) -> tuple[list[str], list[float], list[bool]]:
    """(final outputs, seconds each, whether each answer was re-drafted for a plainer reading level)."""
    outputs, seconds, redrafted = [], [], []
    for index, (question, found) in enumerate(zip(questions, hits), 1):
        start, final, redrafts = time.perf_counter(), "", False
        passages = [(h.passage.text, h.passage.url) for h in found]
        for final in assistant.educate(question["question"], reading_level, passages):
            redrafts = redrafts or REDRAFTING in final  # cumulative; the last item carries the Sources list
        seconds.append(time.perf_counter() - start)
        redrafted.append(redrafts)
        outputs.append(final)
        if progress:
            print(f"  [{index}/{len(questions)}] {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
    return outputs, seconds, redrafted


def run_educate(assistant, limit: int | None, embed: Embed, embedder: tuple[str, str], cache: Path | None = None,
                records: Sequence[dict] | None = None, progress: bool = True,
                reading_level: str = READING_LEVELS[1]) -> dict:
    """Retrieve, answer and score the held-out questions; `records` replaces MedQuAD in tests."""
    timings, start = {}, time.perf_counter()
    split, questions = held_out_questions(records if records is not None else load_medquad(), limit)
    total = len(passages_from_records(split.train))
    index = passage_index(split.train, with_progress(embed, total, "passages") if progress else embed, embedder, cache)
    timings["index_s"] = round(time.perf_counter() - start, 2)
    vectors = np.asarray(embed([q["question"] for q in questions]), np.float32)
    hits = [index.search(v, k=K) for v in vectors]
    start = time.perf_counter()
    outputs, seconds, redrafted = generate_answers(assistant, questions, hits, progress, reading_level)
    timings["generation_s"] = round(time.perf_counter() - start, 2)
    timings["seconds_per_question"] = round(sum(seconds) / len(seconds), 2) if seconds else None
    parts = [answer_parts(o) for o in outputs]
    references = [q["answer"] for q in questions]
    top = [h[0].passage.text if h else "" for h in hits]
    metrics = {"model": score_system(references, [a for a, _ in parts], [s for _, s in parts],
                                     [cites_in_text(a) for a, _ in parts]),
               "top_passage": score_system(references, top, [bool(h) for h in hits], [False] * len(hits))}
    grades = [g for g in map(flesch_kincaid_grade, references) if g is not None]
    return {
        "dataset": {"name": "MedQuAD (NIH consumer-health Q&A, answered subset)", "split": "test",
                    "split_rule": f"medquad_split: sha256(seed:qid) < 0.1, seed {SEED}; train answers equal to a "
                                  "test answer dropped", "order": "seeded hash order", "n_split": len(split.test),
                    "n_train_records": len(split.train), "n_passages": len(index.passages),
                    "n_evaluated": len(questions), "limit": limit},
        "systems": SYSTEM_NAMES, "protocol": __doc__.split("Measures: ", 1)[1].strip(), "k": K,
        "reading_level": reading_level,
        # Answers above the level asked for are re-drafted (pipeline.Assistant._plainer_answer).
        "plain_redrafts": {**dataclasses.asdict(assistant.config.education), "answers_redrafted": sum(redrafted)},
        "retrieval": retrieval_hits(questions, hits, index), "metrics": metrics,
        "model_by_site": by_site(questions, [a for a, _ in parts]),
        "reference_fk_grade_mean": sum(grades) / len(grades) if grades else None,
        "timing": timings,
        "predictions": [{"qid": q["qid"], "answer": a, "sources": [h.passage.url for h in found]}
                        for q, (a, _), found in zip(questions, parts, hits)],
    }
