"""The clinician's workflow around model output: drafts, acceptance, export and chat history.

Gradio-free so every step is testable and callable from scripts. Everything stored passes through
PHI masking first: the store keeps only what this module hands it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .dicom import Scan
from .export import draft_metadata, to_dicom_sr, to_fhir_bundle, to_markdown, write_sr
from .phi import mask_phi
from .store import AcceptedReport, Store

EXPORT_FORMATS = ("markdown", "fhir", "dicom-sr")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.@-]")


@dataclass(frozen=True)
class HistoryRow:
    kind: str  # "conversation" or "accepted report"
    mode: str
    when: str
    title: str


class Workflow:
    def __init__(self, store: Store, export_dir: Path, model_name: str = "clinical-assistant"):
        self.store = store
        self.export_dir = Path(export_dir)
        self.model_name = model_name

    # ---- report drafting ---------------------------------------------------------------------
    def record_draft(self, user: str, scans: Sequence[Scan], text: str, image_check: dict | None = None) -> int:
        """Save a finished draft (masked) with the study's pseudonymised key; returns its id.

        `image_check` (`guard.flag_summary`: flag kinds, findings, probabilities) is kept in the
        draft's metadata, so accepted versions carry it too.
        """
        study_key = next((scan.study_key for scan in scans if scan.study_key), None)
        metadata = draft_metadata(scans, model=self.model_name)
        if image_check is not None:
            metadata["image_check"] = image_check
        return self.store.save_draft(None, user, mask_phi(text), study_key=study_key, metadata=metadata)

    def accept(self, user: str, draft_id: int, final_text: str) -> AcceptedReport:
        final = mask_phi((final_text or "").strip())
        if not final:
            raise ValueError("the report is empty: write or keep the findings before accepting")
        return self.store.accept_report(draft_id, user, final)

    def export(self, user: str, report_id: int, fmt: str, scans: Sequence[Scan] = ()) -> Path:
        """Write one accepted report in one format under the user's export folder."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {EXPORT_FORMATS}")
        report = self.store.get_accepted(report_id, user)
        if report is None:
            raise ValueError("no such accepted report for this user")
        folder = self.export_dir / _SAFE_NAME.sub("_", user)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = f"report-{report.id}-v{report.version}"
        if fmt == "markdown":
            return _write(folder / f"{stem}.md", to_markdown(report, include_diff=True))
        if fmt == "fhir":
            return _write(folder / f"{stem}.fhir.json", json.dumps(to_fhir_bundle(report), indent=2))
        study = next((scan for scan in scans if scan.study_key == report.study_key), None)
        return write_sr(to_dicom_sr(report, study), folder / f"{stem}.dcm")

    # ---- chat history --------------------------------------------------------------------------
    def record_turn(self, user: str, mode: str, session_id: int | None, message: str, answer: str) -> int:
        """Store one question and its final answer (masked); opens a session on the first turn."""
        if session_id is None:
            session_id = self.store.create_session(user, mode, title=mask_phi(message)[:80])
        self.store.add_message(session_id, user, "user", mask_phi(message))
        self.store.add_message(session_id, user, "assistant", mask_phi(answer))
        return session_id

    def conversation(self, user: str, session_id: int) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.store.messages(session_id, user)]

    def history(self, user: str) -> list[HistoryRow]:
        """The user's conversations and accepted reports, newest first (only their own)."""
        rows = [HistoryRow("conversation", s.mode, s.created, s.title) for s in self.store.sessions(user)]
        rows += [HistoryRow("accepted report", "report", r.accepted_at, _first_line(r.final_text))
                 for r in self.store.accepted_reports(user)]
        return sorted(rows, key=lambda row: row.when, reverse=True)


def _write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:80]
