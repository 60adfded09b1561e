"""The Assistant: ties the stages together, in order, for each task.

read (dicom) -> prompt (prompts) -> model (ClinicalVLM: vision -> projector -> LLM) -> report
text -> safety labelling. Every yielded text is labelled as a draft for clinician review.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from .config import AssistantConfig
from .dicom import Scan, read_scan
from .model import IMAGE_MARKER, ClinicalVLM
from .phi import mask_phi
from .prompts import render, sanitise_field
from .report import parse_continuation
from .safety import label_draft

MAX_IMAGES_PER_STUDY = 3  # frontal + lateral + one prior: keeps the prompt within a CPU budget


class Assistant:
    def __init__(self, vlm: ClinicalVLM):
        self.vlm = vlm
        self.config: AssistantConfig = vlm.config

    @classmethod
    def from_config(cls, config: AssistantConfig | None = None, progress: bool = True) -> "Assistant":
        return cls(ClinicalVLM.from_config(config or AssistantConfig(), progress=progress))

    def read(self, path: str | Path) -> Scan:
        """A de-identified Scan from a DICOM/PNG/JPEG file (raises dicom.ScanError on bad input)."""
        return read_scan(path, self.config.dicom)

    def draft_report(self, scans: Sequence[Scan], indication: str = "", text_only: bool = False) -> Iterator[str]:
        """Stream the labelled draft report; each item is the whole draft so far.

        `text_only` drafts from the indication alone (the prompt says no image is available): used to
        evaluate on report datasets that carry no images, never silently when images are missing.
        """
        if not scans and not text_only:
            raise ValueError("a draft report needs at least one image")
        if len(scans) > MAX_IMAGES_PER_STUDY:
            raise ValueError(f"at most {MAX_IMAGES_PER_STUDY} images per study (got {len(scans)})")
        prompt = report_prompt(scans, indication)
        inputs = self.vlm.build_inputs(prompt, [scan.pixels for scan in scans])
        continuation = ""
        yield label_draft(parse_continuation(continuation).to_text(partial=True))
        for piece in self.vlm.stream(inputs):
            continuation += piece
            yield label_draft(parse_continuation(continuation).to_text(partial=True))
        yield label_draft(parse_continuation(continuation).to_text())


def report_prompt(scans: Sequence[Scan], indication: str = "") -> str:
    views = ", ".join(_view_name(scan) for scan in scans) or "views not available"
    return render(
        "draft_report",
        # PHI is masked before the text can reach a prompt (and through it any log or server).
        indication=sanitise_field(mask_phi(indication or "")) or "not given",
        views=views,
        images=" ".join(IMAGE_MARKER for _ in scans) or "not available",
    )


def _view_name(scan: Scan) -> str:
    view = (scan.view_position or "").upper()
    if view in {"PA", "AP"}:
        return f"{view} view"
    if view in {"LL", "RL", "LAT", "LATERAL"}:
        return "lateral view"
    return "view not stated"
