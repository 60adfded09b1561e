"""Urgency level for triage answers: fixed rules first, the model's own assessment second.

Levels: emergency / urgent / routine / self-care. Red flags found by assistant.safety set the
level and the model can never lower it; without red flags the model's "Urgency:" line is used,
and without one the answer says plainly that no level was determined.
"""

from __future__ import annotations

import re

from .safety import RedFlag

LEVELS = ("emergency", "urgent", "routine", "self-care")
_URGENCY_LINE = re.compile(r"^\s*urgency\s*[:\-]\s*(.*)$", re.IGNORECASE | re.MULTILINE)


def model_level(text: str) -> str | None:
    """The first level named on the model's 'Urgency:' line, if any."""
    for match in _URGENCY_LINE.finditer(text):
        for level in LEVELS:
            if re.search(rf"\b{re.escape(level)}\b", match.group(1), re.IGNORECASE):
                return level
    return None


def assess(flags: list[RedFlag], model_text: str) -> tuple[str, str]:
    """(level, reason) for the answer's closing line."""
    if flags:
        top = "emergency" if any(f.urgency == "emergency" for f in flags) else "urgent"
        categories = "; ".join(dict.fromkeys(f.category for f in flags if f.urgency == top))
        return top, f"red flags recognised by fixed safety rules: {categories}"
    level = model_level(model_text)
    if level:
        return level, "suggested by the AI from this conversation: confirm with a clinician"
    return "not determined", "the assistant could not judge the urgency: ask a clinician or call your local advice line"


def with_urgency(model_text: str, flags: list[RedFlag]) -> str:
    """The model's answer with its own Urgency line replaced by the assessed one."""
    level, reason = assess(flags, model_text)
    body = _URGENCY_LINE.sub("", model_text).strip()
    return f"{body}\n\nUrgency: {level} ({reason})."
