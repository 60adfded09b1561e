"""EHR summarisation evaluation on held-out Synthea patients, with two reference rows beside the model.

Records are rendered by `ehr_records` (de-identified text plus facts); the held-out patients are
`synthea_split().test` (seed 13, a quarter of the patients that have any condition or
medication), in its seeded order, so `--limit N` takes a fixed sample. The model summarises
through `Assistant.summarize`, exactly as the app does; the measured summary is its text between
the draft label and the appended "Source check".

Measures, summed over patients (micro averages):
- section coverage: of the record's active problems, current medications, allergies, 5 most
  recent results and follow-ups, the share the summary mentions (fuzzy whole-word match of the item's
  short name, e.g. "lisinopril" for "lisinopril 10 MG Oral Tablet"; a result also needs its value);
- grounding precision: of the summary's statements (lines with content words, headings excluded),
  the share that `grounding.ground_summary` links to a record sentence: the app's source check;
- hallucinated facts: condition, medication and allergy names from the vocabulary of every
  Synthea export here that the summary mentions but the patient's record does not contain, and
  the share of named items that the record supports (issue 4's >= 95% figure).
Rows: the model; "baseline: first record entries" (the record's first 8 entries copied, an
extractive lead baseline); "reference: grounded target" (`ehr_records.reference_summary`, the
training target: an upper bound that checks the measures reach 1.0, 1.0 and 0).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence

from .ehr_records import (
    SECTIONS, SUMMARY_RESULTS, PatientRef, RecordText, reference_summary, short_key, synthea_dirs, synthea_split,
)
from .grounding import content_words, ground_summary
from .metrics import items_match, mentioned_items, normalise_item
from .phi import mask_phi
from .pipeline import final_text

SPLIT = {"test_fraction": 0.25, "seed": 13}
LEAD_ENTRIES = 8
SYSTEM_NAMES = {"model": "model (Assistant.summarize)", "lead": f"baseline: first {LEAD_ENTRIES} record entries",
                "reference": "reference: grounded target (upper bound)"}


def held_out_records(limit: int | None = None) -> tuple[list[tuple[PatientRef, RecordText]], dict]:
    """The seeded held-out patients rendered as text, and a description of the split."""
    from .ehr_synthea import SyntheaExport

    split = synthea_split(**SPLIT)
    refs = split.test[:limit] if limit is not None else split.test
    exports = {folder: SyntheaExport.load(folder) for folder in {r.export for r in refs}}
    records = [(ref, exports[ref.export].render(ref.patient_id)) for ref in refs]
    return records, {"name": "Synthea CSV exports (synthetic patients)", "exports": list(split.folders),
                     "split": "test", "split_rule": f"sha256(seed:patient id) < {SPLIT['test_fraction']}, "
                     f"seed {SPLIT['seed']}, patients with a condition or medication", "order": "seeded hash order",
                     "n_split": len(split.test), "n_train": len(split.train), "excluded_empty": split.excluded_empty,
                     "n_evaluated": len(records), "limit": limit}


def vocabulary() -> list[str]:
    """Every condition, medication (and its short name) and allergy named in the Synthea exports."""
    from .ehr_synthea import SyntheaExport, patient_record

    names: set[str] = set()
    for folder in synthea_dirs():
        export = SyntheaExport.load(folder)
        for pid in export.patient_ids():
            record = patient_record(export.people[pid], export.rows.get(pid, {}))
            names |= {short_key("problems", e.name) for e in (*record.conditions, *record.allergies)}
            keys = {short_key("medications", e.name): e.name for e in record.medications}
            names |= {*keys.values(), *keys, *(k.split()[0] for k in keys)}  # "Penicillin V" is also "penicillin"
    return sorted(n for n in names if len(normalise_item(n)) > 3)


# ---- scoring -------------------------------------------------------------------------------------

def summary_body(output: str) -> str:
    """The summary as shown, without the banner, the draft label and the appended source check."""
    from .safety import DRAFT_LABEL

    body = output.split(DRAFT_LABEL, 1)[-1]
    cut = body.rfind("\nSource check:\n")
    return (body[:cut] if cut >= 0 else body).strip()


def lead_summary(record: RecordText, entries: int = LEAD_ENTRIES) -> str:
    """The record's first entries, copied: what a reader gets by skimming the top of the record."""
    bullets = [line for line in record.text.splitlines() if line.startswith("- ") and line != "- None recorded."]
    return "\n".join(bullets[:entries])


def _covered(summary: str, fact) -> bool:
    if not mentioned_items(summary, [fact.key]):
        return False
    if fact.section != "results":
        return True
    number = re.match(r"-?\d+(?:\.\d+)?", fact.value)
    return (number.group(0) in re.findall(r"-?\d+(?:\.\d+)?", summary) if number
            else bool(mentioned_items(summary, [fact.value])))


def expected_facts(record: RecordText, section: str) -> tuple:
    """The facts a summary should carry: all of a section, but only the most recent results."""
    facts = record.section(section)
    return facts[:SUMMARY_RESULTS] if section == "results" else facts


def _longest(named: list[str]) -> list[str]:
    """Named items without those inside another ("Warfarin" within "Warfarin Sodium 5 MG Oral Tablet")."""
    norm = {n: f" {normalise_item(n)} " for n in named}
    return [n for n in named if not any(m != n and norm[n] in norm[m] for m in named)]


def score_summary(summary: str, record: RecordText, lexicon: Sequence[str]) -> dict:
    """Coverage per section, grounded statements and hallucinated names for one summary."""
    coverage = {s: [sum(_covered(summary, f) for f in expected_facts(record, s)), len(expected_facts(record, s))]
                for s in SECTIONS}
    checks = [c for c in ground_summary(summary, mask_phi(record.text)) if content_words(c.statement)]
    known = [*record.item_names(), *(f.key for f in record.facts)]
    named = _longest(mentioned_items(summary, lexicon))
    text = f" {normalise_item(record.text)} "
    hallucinated = [n for n in named if not any(items_match(n, k) for k in known)
                    and f" {normalise_item(n)} " not in text]
    return {"coverage": coverage, "statements": len(checks), "supported": sum(c.source is not None for c in checks),
            "named": len(named), "hallucinated": hallucinated, "words": len(summary.split())}


def aggregate(scores: Sequence[dict]) -> dict:
    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    totals = {s: [sum(x["coverage"][s][i] for x in scores) for i in (0, 1)] for s in SECTIONS}
    statements, supported = sum(x["statements"] for x in scores), sum(x["supported"] for x in scores)
    named, bad = sum(x["named"] for x in scores), sum(len(x["hallucinated"]) for x in scores)
    return {
        "coverage": {s: ratio(*totals[s]) for s in SECTIONS},
        "coverage_all": ratio(sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())),
        "facts": {s: totals[s][1] for s in SECTIONS},
        "grounding_precision": ratio(supported, statements), "statements": statements,
        "hallucinated_facts": bad, "named_items": named, "named_supported_fraction": ratio(named - bad, named),
        "mean_words": ratio(sum(x["words"] for x in scores), len(scores)),
        "empty_summaries": sum(x["words"] == 0 for x in scores),
    }


# ---- the run -------------------------------------------------------------------------------------

def generate_summaries(assistant, records: Sequence[RecordText],
                       progress: bool = True) -> tuple[list[str], list[float]]:
    summaries, seconds = [], []
    for index, record in enumerate(records, 1):
        start = time.perf_counter()
        final = final_text(assistant.summarize(record.text))  # the last item carries the source check
        seconds.append(time.perf_counter() - start)
        summaries.append(summary_body(final))
        if progress:
            print(f"  [{index}/{len(records)}] {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
    return summaries, seconds


def run_summary(assistant, limit: int | None, progress: bool = True) -> dict:
    """Summarise the held-out patients, build both reference rows, score all three."""
    pairs, dataset = held_out_records(limit)
    records = [record for _, record in pairs]
    start = time.perf_counter()
    summaries, seconds = generate_summaries(assistant, records, progress)
    generation_s = time.perf_counter() - start
    lexicon = vocabulary()
    systems = {"model": summaries, "lead": [lead_summary(r) for r in records],
               "reference": [reference_summary(r) for r in records]}
    per_patient = {name: [score_summary(s, r, lexicon) for s, r in zip(texts, records)]
                   for name, texts in systems.items()}
    return {
        "dataset": dataset, "systems": SYSTEM_NAMES, "protocol": __doc__.split("Measures, ", 1)[1].strip(),
        "metrics": {name: aggregate(scores) for name, scores in per_patient.items()},
        "vocabulary_size": len(lexicon),
        "timing": {"generation_s": round(generation_s, 2),
                   "seconds_per_patient": round(sum(seconds) / len(seconds), 2) if seconds else None},
        "predictions": [{"patient": ref.key, "export": ref.export.name, "summary": s,
                         "hallucinated": score["hallucinated"]}
                        for (ref, _), s, score in zip(pairs, summaries, per_patient["model"])],
    }
