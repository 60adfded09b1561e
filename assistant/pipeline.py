"""The Assistant: ties the stages together, in order, for each task.

read (dicom) -> prompt (prompts) -> model (ClinicalVLM: vision -> projector -> LLM) -> report
text -> safety labelling. Every yielded text is labelled as a draft for clinician review.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from .config import AssistantConfig
from .dialogue import clean_user_text, render_history, trim_at_stop, user_turns
from .dicom import Scan, read_scan
from .grounding import annotate
from .model import IMAGE_MARKER, ClinicalVLM
from .phi import mask_phi
from .prompts import render, sanitise_field, sanitise_multiline
from .report import parse_continuation
from .safety import escalation_message, find_red_flags, guard_answer, label_draft
from .triage import with_urgency

MAX_IMAGES_PER_STUDY = 3  # frontal + lateral + one prior: keeps the prompt within a CPU budget
MAX_RECORD_CHARS = 8000  # about 2k tokens: the prefill stays within seconds on a CPU
READING_LEVELS = ("simple (about age 10)", "general (about age 14)", "detailed (adult)")
TRIAGE_STOPS = ("\nPerson:", "\nNurse:")


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


    def triage(self, history: Sequence[dict], message: str) -> Iterator[str]:
        """Triage chat turn: the red-flag banner comes before any model text and stays first."""
        message = (message or "").strip()
        if not message:
            raise ValueError("describe the symptoms first")
        said = user_turns(history, message)
        flags = find_red_flags(said)
        if flags:
            yield escalation_message(flags)  # shown at once, before the model has said anything
        prompt = render("triage", history=render_history(history, "Person", "Nurse"),
                        message=clean_user_text(message))
        text = ""
        for text in self._continue(prompt, TRIAGE_STOPS):
            yield guard_answer(said, label_draft(text))
        yield guard_answer(said, label_draft(with_urgency(text, flags)))

    def summarize(self, record_text: str) -> Iterator[str]:
        """Structured summary of a note or record, each statement checked against the source."""
        if len(record_text or "") > 4 * MAX_RECORD_CHARS:
            raise ValueError(f"the record has {len(record_text):,} characters; paste at most "
                             f"{MAX_RECORD_CHARS:,} (the relevant part)")
        record = sanitise_multiline(mask_phi(record_text or ""), MAX_RECORD_CHARS)
        if not record:
            raise ValueError("paste a note or upload a record first")
        text = ""
        for text in self._continue(render("summarize", record=record), ("\nClinical record:",)):
            yield guard_answer("", label_draft("Problems:\n" + text))
        yield guard_answer("", label_draft(annotate("Problems:\n" + text, record)))

    def educate(self, question: str, reading_level: str = READING_LEVELS[1],
                passages: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        """Plain-language answer grounded in retrieved (text, source URL) passages, cited at the end."""
        question = clean_user_text(question)
        if not question:
            raise ValueError("type a question first")
        if reading_level not in READING_LEVELS:
            raise ValueError(f"reading level must be one of {READING_LEVELS}")
        sources = "\n".join(f"[{i}] {text}" for i, (text, _) in enumerate(passages, start=1))
        prompt = render("educate", question=question, reading_level=reading_level,
                        sources=sources or "(none found)")
        citations = _citations(passages)
        text = ""
        for text in self._continue(prompt, ("\nA patient asked:",)):
            yield guard_answer(question, label_draft(text))
        yield guard_answer(question, label_draft(f"{text}\n\n{citations}"))

    def _continue(self, prompt: str, stop: tuple[str, ...]) -> Iterator[str]:
        """The model's continuation of a text prompt, cumulative and trimmed at the stop strings."""
        text = ""
        for piece in self.vlm.stream(self.vlm.build_inputs(prompt), stop=stop):
            text += piece
            yield trim_at_stop(text, stop)


def _citations(passages: Sequence[tuple[str, str]]) -> str:
    if not passages:
        return "Sources: no trusted source was found for this question; ask a clinician."
    return "Sources:\n" + "\n".join(f"[{i}] {url}" for i, (_, url) in enumerate(passages, start=1))


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
