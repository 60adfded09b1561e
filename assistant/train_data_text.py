"""Text-only training examples: EHR summaries from Synthea records and MedQuAD patient education.

Summary: each Synthea patient of the evaluation's train split (`ehr_records.synthea_split` with
`evaluate_summary.SPLIT`, so held-out patients are never trained on) is rendered by the app's own
renderer (`SyntheaExport.render`: ages, never dates or identifiers), put into
`prompts/summarize.md` exactly as `Assistant.summarize` does (PHI masking, sanitising, length cap),
and the target is `ehr_records.reference_summary`: every line copied from the record, in the
summary's sections, without the "Problems:" line the prompt already ends with.

Education: MedQuAD question -> answer in `prompts/educate.md`, with the first passages of other
answers about the same focus as the retrieved trusted information (never the answer itself, which
would teach copying), the reading level in the prompt the one whose grade band holds the target's
Flesch-Kincaid grade (`reading_level_of`), the target the answer without page furniture (a heading repeating the
question, "Key Points -") cut at a sentence end. Lists of further resources, symptom-table
boilerplate and answers under 25 words are skipped: the first adapter, trained on them, echoed
headings and wrote one-line answers. Split by question id with the evaluation's seed
(`medquad_split`, seed 13), so its held-out questions are never trained on.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from .dialogue import clean_user_text
from .phi import mask_phi
from .pipeline import MAX_RECORD_CHARS
from .prompts import render, sanitise_multiline
from .readability import READING_LEVELS, reading_level_of
from .retrieval_passages import chunk_text, load_medquad, medquad_split
from .retrieval_sources import shared_data_dir
from .train_data import Example

MAX_ANSWER_CHARS = 800  # education targets: a few sentences (about 130 words), the length a CPU answer can afford
MIN_TARGET_WORDS = 25  # shorter targets taught the first adapter one-line answers
MEDQUAD_SEED = 13  # evaluate_educate's seed: its held-out questions stay held out


def summary_prompt(record_text: str) -> str:
    """The prompt exactly as Assistant.summarize builds it (PHI masking, sanitising, length cap)."""
    return render("summarize", record=sanitise_multiline(mask_phi(record_text), MAX_RECORD_CHARS))


def summary_examples(split: str = "train", root: Path | None = None) -> list[Example]:
    from .ehr_records import reference_summary, synthea_split
    from .ehr_synthea import SyntheaExport
    from .evaluate_summary import SPLIT

    if split not in ("train", "test"):
        raise ValueError(f"Synthea patients are split into train and test, not {split!r}")
    refs = getattr(synthea_split((root or shared_data_dir()) / "synthea", **SPLIT), split)
    exports = {folder: SyntheaExport.load(folder) for folder in {ref.export for ref in refs}}
    examples = []
    for ref in refs:
        record = exports[ref.export].render(ref.patient_id)
        target = reference_summary(record).removeprefix("Problems:\n")
        examples.append(Example(summary_prompt(record.text), target, source=ref.key))  # a pseudonym
    return examples


# Answers that teach nothing a patient can use, or teach the wrong shape of answer: lists of
# further resources ("These resources address the diagnosis or management of X: - GeneReview...")
# and the boilerplate in front of a symptom table that MedQuAD keeps without the table.
RESOURCE_LIST = re.compile(r"^(these resources address|you can find information|the human phenotype ontology provides)", re.I)
# Page furniture in front of the answer proper: NCI's "Key Points -" banner and a heading that
# repeats the question ("What are the signs and symptoms of X?"), which the first adapter learned
# to echo instead of answering.
LEADING_FURNITURE = re.compile(r"^\s*(key points\s*-?\s*|(what|how|who|is|are|do|does|can|which|when|why)\b[^?]{0,200}\?\s+)", re.I)


def short_answer(answer: str, max_chars: int = MAX_ANSWER_CHARS) -> str:
    """The answer's leading sentences, at most max_chars (at least its first sentence piece)."""
    chunks = chunk_text(answer, max_chars)
    return chunks[0] if chunks else ""


def education_target(answer: str, max_chars: int = MAX_ANSWER_CHARS) -> str:
    """What the model should learn to write: the answer without page furniture, cut at a sentence
    end; "" for a list of further resources (no answer to learn from)."""
    text = " ".join(answer.split())
    while (stripped := LEADING_FURNITURE.sub("", text, count=1)) != text:
        text = stripped
    return "" if RESOURCE_LIST.match(text) else short_answer(text, max_chars)


def related_passages(records, count: int = 2) -> list[list[str]]:
    """For each record, in order, the first passages of up to `count` other answers about the same
    focus (disease, drug...): the related trusted text a retriever finds. Never the record's own
    answer, so the model learns to answer from sources instead of copying the target out of its
    prompt. A list by position, not a dict by qid: MedQuAD gives one qid to the answers of several
    diseases on one page (41% of the train split), and keyed by qid a question got the passages
    of whichever disease came last."""
    by_focus: dict[str, list[dict]] = {}
    for record in records:
        by_focus.setdefault((record.get("focus") or "").lower(), []).append(record)
    related = []
    for record in records:
        others = [r for r in by_focus[(record.get("focus") or "").lower()]
                  if r["qid"] != record["qid"] and _norm(r["answer"]) != _norm(record["answer"])]
        related.append([chunk_text(r["answer"])[0] for r in others[:count] if chunk_text(r["answer"])])
    return related


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def educate_prompt(question: str, passages: list[str], reading_level: str = READING_LEVELS[1]) -> str:
    """The prompt as Assistant.educate builds it for retrieved passages at `reading_level`."""
    sources = "\n".join(f"[{i}] {text}" for i, text in enumerate(passages, start=1))
    return render("educate", question=clean_user_text(question), reading_level=reading_level,
                  sources=sources or "(none found)")


def educate_examples(split: str = "train", root: Path | None = None, balance_levels: bool = False,
                     seed: int = 0) -> list[Example]:
    """Questions with related passages of the same split (a held-out question never sees train text
    and vice versa); questions whose focus has no other answer are skipped. `balance_levels`: as
    many examples of each reading level as of the rarest (a seeded draw, order kept)."""
    if split not in ("train", "test"):
        raise ValueError(f"MedQuAD is split into train and test, not {split!r}")
    path = (root or shared_data_dir()) / "medquad" / "medquad_qa_with_answers.jsonl.gz"
    records = [r for r in getattr(medquad_split(load_medquad(path), seed=MEDQUAD_SEED), split) if r.get("question")]
    related = related_passages(records)
    examples, levels = [], []
    for position, record in enumerate(records):
        target = education_target(record["answer"])
        if not related[position] or len(target.split()) < MIN_TARGET_WORDS:
            continue
        # The answers are NIH pages (median grade 11.8): trained at one level the adapter wrote at
        # grade 12; labelled by the grade of their target, the examples teach what each level means.
        levels.append(reading_level_of(target))
        examples.append(Example(educate_prompt(record["question"], related[position], levels[-1]),
                                target, source=record["qid"]))
    return _balanced(examples, levels, seed) if balance_levels else examples


# NIH answers are mostly adult-level (train split: 532 simple, 3,162 general, 5,926 detailed), so
# a run drawing 1,600 of them saw ~90 simple targets and wrote at grade 11 whatever level was asked
# for; equal shares let the level in the prompt steer the adapter.
def _balanced(examples: list[Example], levels: list[str], seed: int) -> list[Example]:
    """As many examples of each level as of the rarest level, drawn with `seed`, in their order."""
    by_level: dict[str, list[int]] = {}
    for index, level in enumerate(levels):
        by_level.setdefault(level, []).append(index)
    if len(by_level) < len(READING_LEVELS):
        return examples  # a level has no example: balancing would leave nothing
    share = min(len(indices) for indices in by_level.values())
    rng = random.Random(seed)
    kept = sorted(i for level in READING_LEVELS for i in rng.sample(by_level[level], share))
    return [examples[i] for i in kept]
