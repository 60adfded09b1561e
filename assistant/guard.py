"""Hallucination guard for drafts: findings the image classifier does not support.

The draft is labelled with the CheXpert-style rule labeler (`labeler.label_report`), its labels
are mapped to the NIH ChestX-ray14 findings the vision head scores (`labeler.NIH14_FROM_CHEXPERT`;
"Lung Lesion" takes the larger of Mass and Nodule) and compared with the head's probabilities:

- unsupported: the draft states a finding (label 1) whose probability is below
  `GuardConfig.unsupported_below`;
- unmentioned: the probability is at least `GuardConfig.unmentioned_above` and the draft does not
  mention the finding or rules it out (label None or 0). A hedged statement ("possible effusion",
  label -1) counts as mentioned and is never flagged: the draft is already uncertain.

The classifier is weak (normal-vs-abnormal AUROC about 0.64; several findings were never validated,
adapters/vision-nih14/README.md), so every flag says "uncertain ... verify", never "wrong": it is
a prompt to look at the image again, not a verdict. Findings the classifier does not score
(fracture, support devices, enlarged cardiomediastinum) are reported as not checked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from assistant.config import GuardConfig
from assistant.labeler import LABELS, NIH14_FROM_CHEXPERT, label_report

__all__ = ["GuardFlag", "GuardResult", "check_draft", "merge_probs", "classifier_auroc", "flag_summary",
           "NOTE_HEADER"]

NOTE_HEADER = ("Image check — a weak classifier (AUROC about 0.64), so these are prompts to look "
               "again, not verdicts:")
_NOT_SCORED = tuple(label for label in LABELS if label not in NIH14_FROM_CHEXPERT and label != "No Finding")


@dataclass(frozen=True)
class GuardFlag:
    kind: str  # "unsupported" (stated, little image support) | "unmentioned" (image suggests it)
    finding: str  # the CheXpert label, e.g. "Pleural Effusion"
    nih_findings: tuple[str, ...]  # the classifier outputs it was compared with
    probability: float
    draft_status: int | None  # the draft's label: 1 stated, 0 ruled out, None not mentioned
    validated: bool | None  # the classifier had a measured test AUROC for it (None: unknown)
    message: str


@dataclass(frozen=True)
class GuardResult:
    flags: tuple[GuardFlag, ...]
    unchecked: tuple[str, ...]  # stated findings the classifier does not score
    note: str  # "" when there is nothing to say


def check_draft(draft: str, finding_probs: Mapping[str, float], config: GuardConfig = GuardConfig(),
                auroc: Mapping[str, float | None] | None = None) -> GuardResult:
    """Compare a draft's findings with the image's finding probabilities (keyed by NIH name).

    `auroc` (from `classifier_auroc`) marks findings the classifier was never validated on.
    """
    probs = _checked_probs(finding_probs)
    labels = label_report(draft or "")
    flags = []
    for finding, nih in NIH14_FROM_CHEXPERT.items():
        scored = tuple(name for name in nih if name in probs)
        if not scored:
            continue
        probability = max(probs[name] for name in scored)
        validated = _validated(scored, auroc)
        kind = _kind(labels.get(finding), probability, config)
        if kind:
            flags.append(GuardFlag(kind, finding, scored, probability, labels.get(finding), validated,
                                   _message(kind, finding, probability, labels.get(finding), validated)))
    unchecked = tuple(label for label in _NOT_SCORED if labels.get(label) == 1)
    unchecked += tuple(f for f, nih in NIH14_FROM_CHEXPERT.items()
                       if labels.get(f) == 1 and not any(name in probs for name in nih))
    return GuardResult(tuple(flags), unchecked, _note(flags, unchecked))


def _kind(status: int | None, probability: float, config: GuardConfig) -> str | None:
    if status == 1 and probability < config.unsupported_below:
        return "unsupported"
    if config.flag_unmentioned and status in (None, 0) and probability >= config.unmentioned_above:
        return "unmentioned"
    return None


def _message(kind: str, finding: str, probability: float, status: int | None, validated: bool | None) -> str:
    name = finding.lower()
    if kind == "unsupported":
        text = f"uncertain: the image evidence does not support '{name}' (p={probability:.2f})"
    else:
        said = "rules it out" if status == 0 else "does not mention it"
        text = f"uncertain: the image classifier suggests possible '{name}' (p={probability:.2f}); the draft {said}"
    if validated is False:
        text += "; the classifier was not validated for this finding"
    return text + " — verify on the image."


def _note(flags: Sequence[GuardFlag], unchecked: Sequence[str]) -> str:
    if not flags:
        return ""
    lines = [NOTE_HEADER, *(f"- {flag.message}" for flag in flags)]
    if unchecked:
        lines.append("- not checked against the image (no classifier output): "
                     + ", ".join(name.lower() for name in unchecked) + ".")
    return "\n".join(lines)


def _validated(names: Iterable[str], auroc: Mapping[str, float | None] | None) -> bool | None:
    if auroc is None:
        return None
    return any(auroc.get(name) is not None for name in names)


def _checked_probs(finding_probs: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(finding_probs, Mapping):
        raise ValueError("finding_probs must map NIH finding names to probabilities")
    probs = {}
    for name, value in finding_probs.items():
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"the probability for {name} must be a number between 0 and 1")
        probs[str(name)] = value
    return probs


def merge_probs(per_image: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One probability per finding for a study: the largest over its images (a finding may show on
    one view only)."""
    merged: dict[str, float] = {}
    for probs in per_image:
        for name, value in _checked_probs(probs).items():
            merged[name] = max(merged.get(name, 0.0), value)
    return merged


def classifier_auroc(weights: str | Path) -> dict[str, float | None]:
    """Per-finding test AUROC from a vision weights folder's metadata.json ({} when absent);
    None marks a finding with too few test positives to measure."""
    path = Path(weights) / "metadata.json"
    try:
        per_finding = json.loads(path.read_text())["metrics"]["nih_test"]["per_finding"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: (entry or {}).get("auroc") for name, entry in per_finding.items()}


def flag_summary(result: GuardResult) -> dict:
    """What to keep with a stored draft: flag kinds, findings and probabilities (no text from the
    draft, no identifiers), e.g. for auditing how often the image check fired."""
    return {
        "flags": [{"kind": flag.kind, "finding": flag.finding, "nih_findings": list(flag.nih_findings),
                   "probability": round(flag.probability, 4), "validated": flag.validated}
                  for flag in result.flags],
        "unchecked": list(result.unchecked),
    }
