"""CheXpert-style rule labeler for radiology report text.

Used by the clinical-efficacy metric (finding F1 between generated and reference reports) and by
the hallucination guard (a draft must not assert findings the image classifier does not support).
No model weights: CheXbert cannot be downloaded here, and rules are auditable.

Conventions follow the CheXpert labeler (Irvin et al., 2019): mention extraction from phrase lists,
then per mention, in this order, "pre-negation uncertainty" (cannot exclude, no new), negation,
then uncertainty (may, possible, X or Y, ...); per label 1 beats -1 beats 0 across mentions;
"chf"/"heart failure" also makes Cardiomegaly uncertain; No Finding is 1 only when no pathology
label (Support Devices excluded) and none of CheXpert's "other findings" (emphysema, granuloma,
calcification, ...) is positive or uncertain, else None (never 0). Scope is the clause: sentences
split at . ; ! ? and at "but/however/which/there is ...", with comma lists kept together.

Deliberate departures, so the labels stay sensible on short generated text:
- Bare anatomy ("heart size", "cardiac silhouette", "mediastinum") counts only with a descriptor:
  enlarged/prominent -> 1, normal -> 0, stable/unchanged -> -1, else not mentioned (CheXpert: 1).
- "likely", "unlikely" and "borderline" are uncertain; "blunting of the costophrenic angle" is an
  uncertain Pleural Effusion; "vascular congestion" is an uncertain Edema (as CheXpert).
- Empty text gives all None rather than No Finding = 1.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
_PATHOLOGIES = tuple(label for label in LABELS if label not in ("No Finding", "Support Devices"))

# CheXpert label -> NIH ChestX-ray14 label(s) it corresponds to (NIH spelling), for checking a draft
# against an image classifier's NIH-14 probabilities. Fracture, Support Devices, Enlarged
# Cardiomediastinum have no NIH counterpart; Emphysema, Fibrosis, Hernia have no CheXpert one.
NIH14_FROM_CHEXPERT: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("Cardiomegaly",),
    "Edema": ("Edema",),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Atelectasis": ("Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Pleural Effusion": ("Effusion",),
    "Lung Lesion": ("Mass", "Nodule"),
    "Lung Opacity": ("Infiltration",),
    "Pleural Other": ("Pleural_Thickening",),
}

_NEVER = re.compile(r"(?!)")
_MAX_CLAUSE = 600  # characters; longer clauses are cut at commas (see _chunks)
_OTHER = "_other"  # CheXpert's "other findings": they only veto No Finding
_KIND_RANK = {"finding": 0, "uncertain": 1, "descriptor": 2, "other": 3}


@dataclass(frozen=True)
class _Mention:
    label: str
    start: int
    end: int
    kind: str  # finding | uncertain (at most -1) | descriptor (needs a size word) | other
    text: str


@dataclass(frozen=True)
class _Rules:
    mentions: tuple[tuple[str, str, re.Pattern], ...]
    unmentions: Mapping[str, re.Pattern]
    triggers: Mapping[str, re.Pattern]  # e.g. "negation.pre", "uncertainty.post"
    misc: Mapping[str, re.Pattern]  # enlarged, stable, copula_tail, clause_breaks, ...


def _alt(patterns: Iterable[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


@functools.lru_cache(maxsize=1)
def _rules() -> _Rules:
    """Compile the phrase tables once, on first use (no I/O at import)."""
    raw = json.loads((Path(__file__).parent / "rules" / "chexpert_patterns.json").read_text(encoding="utf-8"))
    mentions = []
    for kind, table in (("finding", raw["mentions"]), ("uncertain", raw["uncertain_mentions"]),
                        ("descriptor", raw["descriptor_mentions"])):
        mentions += [(label, kind, re.compile(rf"\b(?:{'|'.join(pats)})")) for label, pats in table.items()]
    mentions.append((_OTHER, "other", re.compile(rf"\b(?:{'|'.join(raw['other_findings'])})")))
    triggers = {f"{family}.{where}": _alt(pats)
                for family in ("pre_negation_uncertainty", "negation", "uncertainty")
                for where, pats in raw[family].items()}
    misc = {key: re.compile(raw[key]) for key in ("enlarged", "stable", "copula_tail", "post_gap_blockers",
                                                  "clause_breaks", "coordinator", "list_breakers", "or_link")}
    unmentions = {label: _alt(pats) for label, pats in raw["unmentions"].items()}
    return _Rules(tuple(mentions), unmentions, triggers, misc)


def _normalise(text: str) -> str:
    text = text.lower()
    text = re.sub(r"x{3,}", " ", text)  # IU X-ray redactions ("XXXX") carry no finding
    text = re.sub(r"(?<=\d)\.(?=\d)", "p", text)  # "1.5 cm" must not end a sentence
    text = re.sub(r"\b(vs|e\.g|i\.e|dr|approx)\.", lambda m: m.group(1).replace(".", ""), text)
    return re.sub(r"[ \t]+", " ", text)


def _clauses(text: str) -> Iterable[tuple[str, bool]]:
    """Yield (clause, is_question): sentences split at scope-breaking words."""
    for sentence in re.split(r"[.!;\n]+|(?<=\?)", _normalise(text)):
        question = sentence.rstrip().endswith("?")
        for clause in _rules().misc["clause_breaks"].split(sentence):
            for chunk in _chunks(clause):
                if chunk.strip():
                    yield chunk, question


def _chunks(clause: str, limit: int = _MAX_CLAUSE) -> Iterable[str]:
    """Cut run-on clauses (a looping generator: "no effusion, no effusion, ...") at commas.

    Real scopes span a few hundred characters; the cut keeps scope work per clause bounded.
    """
    while len(clause) > limit:
        cut = clause.rfind(",", 0, limit)
        cut = cut if cut > 0 else (clause.rfind(" ", 0, limit) if clause.rfind(" ", 0, limit) > 0 else limit)
        yield clause[:cut]
        clause = clause[cut + 1:] if clause[cut:cut + 1] in ", " else clause[cut:]
    yield clause


def _find_mentions(clause: str) -> list[_Mention]:
    rules, found = _rules(), []
    for label, kind, pattern in rules.mentions:
        blocked = [m.span() for m in rules.unmentions[label].finditer(clause)] if label in rules.unmentions else []
        for m in pattern.finditer(clause):
            if not any(a < m.end() and m.start() < b for a, b in blocked):
                found.append(_Mention(label, m.start(), m.end(), kind, m.group()))
    # One label, overlapping spans ("cardiac enlargement" / "cardiac ..."): keep the most specific.
    found.sort(key=lambda m: (_KIND_RANK[m.kind], -(m.end - m.start)))
    kept: list[_Mention] = []
    for m in found:
        if not any(k.label == m.label and k.start < m.end and m.start < k.end for k in kept):
            kept.append(m)
    return sorted(kept, key=lambda m: m.start)


def _segments(clause: str) -> list[tuple[int, int]]:
    bounds = [-1] + [i for i, c in enumerate(clause) if c == ","] + [len(clause)]
    return [(a + 1, b) for a, b in zip(bounds, bounds[1:])]


def _segment_at(segments: list[tuple[int, int]], pos: int) -> int:
    return next(i for i, (a, b) in enumerate(segments) if a <= pos <= b)


def _forward_end(clause: str, segments: list[tuple[int, int]], pos: int, starts: set[int]) -> int:
    """Where a trigger's forward scope ends: its comma segment, or on through a comma list.

    The scope goes on while the next segment continues a list of findings ("no consolidation,
    pleural effusion, or pneumothorax"; a finding-free item is kept when a coordinator follows)
    and stops at an asserted finding ("no effusion, small pneumothorax").
    """
    i = _segment_at(segments, pos)
    coordinator = _rules().misc["coordinator"]
    end = segments[i][1]
    for j in range(i + 1, len(segments)):
        a, b = segments[j]
        neutral = not any(a <= s < b for s in starts) and any(
            coordinator.search(clause, *segments[k]) for k in range(j + 1, len(segments)))
        if not (neutral or _continues_list(clause, a, b, starts)):
            break
        end = b
    return end


def _continues_list(clause: str, a: int, b: int, starts: set[int]) -> bool:
    first = min((s for s in starts if a <= s < b), default=None)
    if first is None:
        return False
    lead = clause[a:first].split()
    lead = lead[1:] if lead and lead[0] in ("and", "or", "nor") else lead
    return len(lead) <= 3 and not (lead and _rules().misc["list_breakers"].match(lead[0]))


def _backward_start(clause: str, segments: list[tuple[int, int]], pos: int) -> int:
    """Where a trailing trigger's scope starts: its segment, or the whole list when it ends one."""
    i = _segment_at(segments, pos)
    a, b = segments[i]
    if i > 0 and re.match(r"\s*(?:and|or)\b", clause[a:b]):
        return 0
    return a


def _post_gap_ok(gap: str) -> bool:
    """Subject ... trigger: only list words and one linking verb may stand between them."""
    misc = _rules().misc
    tail = misc["copula_tail"].search(gap)
    core = gap[:tail.start()] if tail else gap
    return len(core.split()) <= 6 and not misc["post_gap_blockers"].search(core)


@dataclass(frozen=True)
class _Scopes:
    """One clause's trigger scopes, computed once per clause, as (lo, hi) character ranges per family."""

    pre: Mapping[str, list[tuple[int, int]]]  # a mention starting in [trigger end, scope end)
    window: Mapping[str, list[tuple[int, int]]]  # a mention a few words after the trigger
    post: Mapping[str, list[tuple[int, int]]]  # a mention inside [scope start, trigger start)


def _scopes(clause: str, starts: set[int]) -> _Scopes:
    rules, segments = _rules(), _segments(clause)
    pseudo = [p.span() for p in rules.triggers["negation.pseudo"].finditer(clause)]
    pre, window, post = {}, {}, {}
    for family in ("pre_negation_uncertainty", "negation", "uncertainty"):
        found = {where: list(rules.triggers.get(f"{family}.{where}", _NEVER).finditer(clause))
                 for where in ("pre", "window", "post")}
        if family == "negation":  # "no change in the effusion" asserts the effusion
            found = {k: [t for t in v if not any(a <= t.start() < b for a, b in pseudo)] for k, v in found.items()}
        pre[family] = [(t.end(), _forward_end(clause, segments, t.end(), starts)) for t in found["pre"]]
        window[family] = [t.span() for t in found["window"]]
        post[family] = [(_backward_start(clause, segments, t.start()), t.start()) for t in found["post"]]
    return _Scopes(pre, window, post)


def _triggered(clause: str, m: _Mention, family: str, scopes: _Scopes) -> bool:
    """Whether a trigger of `family` (e.g. "negation") has `m` in its scope."""
    if any(lo <= m.start < hi for lo, hi in scopes.pre[family]):
        return True
    for _, end in scopes.window[family]:
        gap = clause[end:m.start]
        if end <= m.start and "," not in gap and len(gap.split()) <= 3:
            return True
    return any(lo <= m.start and m.end <= hi and _post_gap_ok(clause[m.end:hi]) for lo, hi in scopes.post[family])


def _or_linked(clause: str, mentions: list[_Mention]) -> set[_Mention]:
    """Mentions in a list joined by "or"/"versus" ("atelectasis or pneumonia") are uncertain."""
    or_link, out = _rules().misc["or_link"], set()
    group: list[_Mention] = []
    end, linked = -1, False
    for m in mentions:
        if group and (m.start < end or _list_gap(clause[end:m.start])):
            linked |= m.start >= end and bool(or_link.search(clause, end, m.start))
            group.append(m)
            end = max(end, m.end)
            continue
        if linked:
            out.update(group)
        group, end, linked = [m], m.end, False
    return out | (set(group) if linked else set())


def _list_gap(gap: str) -> bool:
    return len(gap.replace(",", " ").split()) <= 4 and not _rules().misc["post_gap_blockers"].search(gap)


def _near(clause: str, m: _Mention, pattern: re.Pattern) -> bool:
    """A size/stability word right before ("enlarged heart") or after ("heart is enlarged")."""
    for d in pattern.finditer(clause):
        if d.end() <= m.start:
            gap = clause[d.end():m.start]
            if "," not in gap and len(gap.split()) <= 3 and not re.search(r"\b(?:with|without|and)\b", gap):
                return True
        elif d.start() >= m.end and "," not in clause[m.end:d.start()]:
            if _post_gap_ok(clause[m.end:d.start()]):
                return True
    return False


def _status(clause: str, m: _Mention, question: bool, scopes: _Scopes, or_linked: set[_Mention]) -> int | None:
    if _triggered(clause, m, "pre_negation_uncertainty", scopes):
        return -1
    if _triggered(clause, m, "negation", scopes):
        return 0
    if question or m in or_linked or m.kind == "uncertain" or _triggered(clause, m, "uncertainty", scopes):
        return -1
    if m.kind != "descriptor":
        return 1
    misc = _rules().misc
    if _near(clause, m, misc["enlarged"]):
        return 1
    return -1 if _near(clause, m, misc["stable"]) else None


def _clause_labels(clause: str, question: bool) -> list[tuple[_Mention, int | None]]:
    mentions = _find_mentions(clause)
    if not mentions:
        return []
    scopes = _scopes(clause, {m.start for m in mentions if m.kind != "descriptor"})
    linked = _or_linked(clause, mentions)
    return [(m, _status(clause, m, question, scopes, linked)) for m in mentions]


def _aggregate(values: list[int]) -> int:
    return 1 if 1 in values else (-1 if -1 in values else 0)


def label_report(text: str) -> dict[str, int | None]:
    """Per CheXpert label: 1 positive, 0 negative, -1 uncertain, None not mentioned."""
    out: dict[str, int | None] = dict.fromkeys(LABELS)
    if not text or not text.strip():
        return out
    votes: dict[str, list[int]] = {}
    other_finding = False
    for clause, question in _clauses(text):
        for m, status in _clause_labels(clause, question):
            if status is None:
                continue
            if m.label == _OTHER:
                other_finding |= status != 0
                continue
            votes.setdefault(m.label, []).append(status)
            if m.label == "Edema" and status != 0 and re.fullmatch(r"(?:congestive\s+)?heart\s+failure|chf", m.text):
                votes.setdefault("Cardiomegaly", []).append(-1)
    out.update({label: _aggregate(values) for label, values in votes.items()})
    found = other_finding or any(out[label] in (1, -1) for label in _PATHOLOGIES)
    out["No Finding"] = None if found else 1
    return out


def _binary(labels: Mapping[str, int | None], uncertain_as: int) -> list[int]:
    return [1 if labels.get(name) == 1 else (uncertain_as if labels.get(name) == -1 else 0) for name in LABELS]


def label_vector(text: str, uncertain_as: int = 1) -> list[int]:
    """Binary 0/1 per label in LABELS order; uncertain -> `uncertain_as`, not mentioned -> 0."""
    return _binary(label_report(text), uncertain_as)


def _ratio(num: int, den: int, zero_division: float) -> float:
    return num / den if den else zero_division


def finding_f1(refs: Sequence[str | Mapping[str, int | None]], hyps: Sequence[str | Mapping[str, int | None]],
               uncertain_as_positive: bool = False, zero_division: float = 0.0) -> dict:
    """Clinical-efficacy precision/recall/F1 over the 14 labels, R2Gen style.

    Items are report texts (labelled here) or label dicts. Positive means label 1; uncertain counts
    as positive only with `uncertain_as_positive` (R2Gen maps -1 to 0). Micro pools counts over all
    labels; macro averages per-label scores, labels with nothing to score giving `zero_division`
    (sklearn's convention, so absent labels pull macro scores down as in published tables).
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    u = int(uncertain_as_positive)
    ref_vecs = [_binary(label_report(r) if isinstance(r, str) else r, u) for r in refs]
    hyp_vecs = [_binary(label_report(h) if isinstance(h, str) else h, u) for h in hyps]
    per_label, totals = {}, [0, 0, 0]
    for i, name in enumerate(LABELS):
        tp = sum(r[i] and h[i] for r, h in zip(ref_vecs, hyp_vecs))
        fp = sum(h[i] and not r[i] for r, h in zip(ref_vecs, hyp_vecs))
        fn = sum(r[i] and not h[i] for r, h in zip(ref_vecs, hyp_vecs))
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
        per_label[name] = {"precision": _ratio(tp, tp + fp, zero_division),
                           "recall": _ratio(tp, tp + fn, zero_division),
                           "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero_division), "support": tp + fn}
    tp, fp, fn = totals
    return {
        "micro_precision": _ratio(tp, tp + fp, zero_division),
        "micro_recall": _ratio(tp, tp + fn, zero_division),
        "micro_f1": _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        **{f"macro_{k}": sum(s[k] for s in per_label.values()) / len(LABELS) for k in ("precision", "recall", "f1")},
        "per_label": per_label,
        "n": len(refs),
    }
