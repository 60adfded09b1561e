"""Draft report text: split the model's continuation into Findings / Impression and label it.

Pure string handling so it can be tested without a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_IMPRESSION = re.compile(r"\n?\s*IMPRESSION\s*:\s*", re.IGNORECASE)
# A base model may run past the report into a new document; these mark where to stop.
_RUNOFF = re.compile(r"\n\s*(EXAMINATION|INDICATION|COMPARISON|TECHNIQUE|HISTORY)\s*:|\n{3,}", re.IGNORECASE)


@dataclass(frozen=True)
class DraftReport:
    findings: str
    impression: str

    def to_text(self, partial: bool = False) -> str:
        """The report text. While streaming (`partial`), sections not yet written are left out so
        each update extends the previous one."""
        if partial:
            text = f"FINDINGS:\n{self.findings}"
            return f"{text}\n\nIMPRESSION:\n{self.impression}" if self.impression else text
        impression = self.impression or "(not generated; derive from the findings on review)"
        return f"FINDINGS:\n{self.findings or '(none generated)'}\n\nIMPRESSION:\n{impression}"


def parse_continuation(text: str) -> DraftReport:
    """The model continues after 'FINDINGS:'; cut run-off, then split at 'IMPRESSION:'."""
    body = _RUNOFF.split(text, maxsplit=1)[0]
    parts = _IMPRESSION.split(body, maxsplit=1)
    findings = _tidy(parts[0])
    impression = _tidy(parts[1]) if len(parts) > 1 else ""
    return DraftReport(findings=findings, impression=impression)


def _tidy(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text).strip()
