"""The Assistant: ties the stages together, in order, for each task.

read (dicom) -> prompt (prompts) -> model (ClinicalVLM: vision -> projector -> LLM) -> report
text -> safety labelling. Every yielded text is labelled as a draft for clinician review.
"""

from __future__ import annotations

import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import numpy as np

from .backend import BackendError, TextBackend, text_backend
from .config import AssistantConfig, GenerationConfig
from .dialogue import clean_user_text, render_history, trim_at_stop, user_turns
from .dicom import Scan, read_deidentified, read_scan
from .grounding import annotate
from .guard import GuardResult, check_draft, classifier_auroc, merge_probs
from .model import IMAGE_MARKER, VISION_FILE, ClinicalVLM, resolve_adapter
from .phi import mask_phi
from .prompts import render, sanitise_field, sanitise_multiline
from .readability import READING_LEVELS, level_name, plainest, reading_note, reads_within
from .report import parse_continuation
from .retrieval import SimilarCase
from .safety import escalation_message, find_red_flags, guard_answer, label_draft
from .triage import with_urgency
from .vision import HEAD_FILE, VisionEncoder, load_vision_encoder, resolve_weights, to_pixel_values
from .vision_heatmap import heatmap

MAX_IMAGES_PER_STUDY = 3  # frontal + lateral + one prior: keeps the prompt within a CPU budget
MAX_RECORD_CHARS = 8000  # about 2k tokens: the prefill stays within seconds on a CPU
TRIAGE_STOPS = ("\nPerson:", "\nNurse:")
EDUCATE_STOP = ("\nA patient asked:",)
REDRAFTING = "drafting plainer wording"  # the progress line of an education re-draft
MAX_CONTEXT_CHARS = 1200  # similar prior reports in a draft prompt: about 300 tokens of CPU prefill
MAX_CONTEXT_REPORT_CHARS = 600  # one long report must not crowd out the others


class Assistant:
    def __init__(self, vlm: ClinicalVLM, backend: TextBackend | None = None):
        self.vlm = vlm
        self.config: AssistantConfig = vlm.config
        # Text-only generation: the local model, or an OpenAI-compatible server (config.backend).
        self.backend = backend or text_backend(self.config, vlm)

    @classmethod
    def from_config(cls, config: AssistantConfig | None = None, progress: bool = True) -> "Assistant":
        return cls(ClinicalVLM.from_config(config or AssistantConfig(), progress=progress))

    def read(self, path: str | Path) -> Scan:
        """A de-identified Scan from a DICOM/PNG/JPEG file (raises dicom.ScanError on bad input)."""
        return read_scan(path, self.config.dicom)

    def draft_report(self, scans: Sequence[Scan], indication: str = "", text_only: bool = False,
                     similar: Sequence[SimilarCase] = ()) -> Iterator[str]:
        """Stream the labelled draft report; each item is the whole draft so far.

        `text_only` drafts from the indication alone (the prompt says no image is available): used to
        evaluate on report datasets that carry no images, never silently when images are missing.
        `similar` puts those prior cases' reports before the prompt (retrieval-augmented drafting).
        Drafts from images always run on the local VLM (a completions server takes no image
        tokens); text-only drafts run on the text backend (`config.backend`), like the chat modes.
        """
        if not scans and not text_only:
            raise ValueError("a draft report needs at least one image")
        if len(scans) > MAX_IMAGES_PER_STUDY:
            raise ValueError(f"at most {MAX_IMAGES_PER_STUDY} images per study (got {len(scans)})")
        prompt = report_prompt(scans, indication, similar)
        if scans:
            pieces = self.vlm.stream(self.vlm.build_inputs(prompt, [scan.pixels for scan in scans]))
        else:
            pieces = self.backend.stream(prompt, task="report")
        continuation = ""
        yield label_draft(parse_continuation(continuation).to_text(partial=True))
        for piece in pieces:
            continuation += piece
            yield label_draft(parse_continuation(continuation).to_text(partial=True))
        yield label_draft(parse_continuation(continuation).to_text())

    # ---- what the vision encoder says about an image (shown beside the draft) ----------------
    @cached_property
    def vision(self) -> VisionEncoder | None:
        """The finding encoder, built on first use (never in the constructor): see finding_encoder."""
        return finding_encoder(self.vlm)

    def findings(self, scan: Scan) -> list[tuple[str, float]]:
        """(finding, probability) for one image, most probable first; [] without a trained head."""
        if self.vision is None:
            return []
        probs = self.vision.encode(self._pixel_values([scan])).finding_probs[0].tolist()
        return sorted(zip(self.vision.findings, probs), key=lambda item: -item[1])

    def heatmap(self, scan: Scan, finding: str) -> np.ndarray:
        """(H, W) in [0, 1]: where the encoder looked for `finding` on the image as read."""
        if self.vision is None:
            raise ValueError("this vision model has no trained finding head, so there is no heatmap")
        return heatmap(self.vision, scan.pixels, finding)

    def study_vector(self, scans: Sequence[Scan]) -> np.ndarray | None:
        """One unit vector for the study (mean of its images' pooled vectors, renormalised: the same
        pooling `index add --from-folder` uses), to search image-indexed prior cases."""
        if self.vision is None or not scans:
            return None
        mean = self.vision.encode(self._pixel_values(scans)).pooled.mean(dim=0).numpy()
        return mean / max(float(np.linalg.norm(mean)), 1e-12)

    def check_draft(self, scans: Sequence[Scan], draft: str) -> GuardResult | None:
        """The draft's findings against the study's finding probabilities (assistant.guard: the
        largest probability over the study's images, `config.guard` thresholds, the classifier's
        held-out AUROC); None without a trained finding head to check with."""
        if self.vision is None or not scans:
            return None
        probs = self.vision.encode(self._pixel_values(scans)).finding_probs.float()  # (N, F)
        per_image = [dict(zip(self.vision.findings, row.tolist())) for row in probs]
        return check_draft(draft, merge_probs(per_image), self.config.guard, self._classifier_auroc)

    @cached_property
    def _classifier_auroc(self) -> dict[str, float | None] | None:
        folder = resolve_weights(self.config.vision)
        return (classifier_auroc(folder) or None) if folder is not None else None

    def needs_pixel_review(self, path: str | Path) -> bool:
        """Whether a DICOM file's pixels may carry burned-in patient text (assistant.deid flags it,
        never removes it), so a person must look before the images are shared."""
        return read_deidentified(path, self.config.dicom).needs_pixel_review

    def _pixel_values(self, scans: Sequence[Scan]):
        tower = self.vision.tower.config
        return to_pixel_values([scan.pixels for scan in scans], tower.image_size, tower.num_channels)


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
        for text in self._continue(prompt, TRIAGE_STOPS, "triage"):
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
        for text in self._continue(render("summarize", record=record), ("\nClinical record:",), "summary"):
            yield guard_answer("", label_draft("Problems:\n" + text))
        yield guard_answer("", label_draft(annotate("Problems:\n" + text, record)))

    def educate(self, question: str, reading_level: str = READING_LEVELS[1],
                passages: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        """Plain-language answer grounded in retrieved (text, source URL) passages, cited at the end,
        then a line on how it reads against the level asked for (`readability.reading_note`). An
        answer above that level is re-drafted first (`_plainer_answer`)."""
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
        for text in self._continue(prompt, EDUCATE_STOP, "educate"):
            yield guard_answer(question, label_draft(text))
        text = yield from self._plainer_answer(question, prompt, text, reading_level)
        note = reading_note(text, reading_level)  # after the Sources list: not part of the answer
        yield guard_answer(question, label_draft(f"{text}\n\n{citations}" + (f"\n\n{note}" if note else "")))

    def _plainer_answer(self, question: str, prompt: str, answer: str, level: str) -> Generator[str, None, str]:
        """Yields progress while it re-drafts an `answer` that reads above `level`; returns the
        first re-draft that reads within it, else the plainest of all (`config.education`). A
        failing server ends the re-drafts and keeps what was drafted: the answer is never lost."""
        settings = self.config.education
        drafts = [answer]
        for attempt in range(1, settings.plain_redrafts + 1):
            if reads_within(drafts[-1], level):
                break
            yield guard_answer(question, label_draft(
                f"{answer}\n\n(This reads above the {level_name(level)} level asked for: {REDRAFTING}, "
                f"{attempt} of {settings.plain_redrafts}.)"))
            generation = replace(self.config.generation, temperature=settings.redraft_temperature,
                                 seed=redraft_seed(question, attempt))
            try:
                drafts.append(final_text(self._continue(prompt, EDUCATE_STOP, "educate", generation)))
            except BackendError:
                break
        return plainest(drafts)

    def _continue(self, prompt: str, stop: tuple[str, ...], task: str,
                  generation: GenerationConfig | None = None) -> Iterator[str]:
        """The text backend's continuation of a (PHI-masked) prompt with `task`'s adapter, cumulative
        and trimmed at the stop strings (a server may already have cut them; the local model leaves them in)."""
        text = ""
        for piece in self.backend.stream(prompt, stop, task=task, generation=generation):
            text += piece
            yield trim_at_stop(text, stop)


def red_flag_text(mode: str, history: Sequence[dict], message: str) -> str:
    """The user text a mode checks for red flags, exactly as its answers do: every user turn in
    triage, the question in education; '' for summaries (a pasted record is not the user's own
    account; its summary is still guarded). Rules only, no model: a UI shows the banner from it
    (`safety.escalation_message(find_red_flags(...))`) before any generation is queued."""
    if mode == "triage":
        return user_turns(history, (message or "").strip())
    if mode == "educate":
        return clean_user_text(message)
    return ""


def redraft_seed(question: str, attempt: int) -> int:
    """The sampling seed of a question's re-draft `attempt`: the same answer every time it is asked."""
    return zlib.crc32(f"{attempt}|{question}".encode())


def final_text(items: Iterator[str]) -> str:
    """The last item of a cumulative stream, the whole text ('' when it yields nothing)."""
    text = ""
    for text in items:
        pass
    return text


def _citations(passages: Sequence[tuple[str, str]]) -> str:
    if not passages:
        return "Sources: no trusted source was found for this question; ask a clinician."
    return "Sources:\n" + "\n".join(f"[{i}] {url}" for i, (_, url) in enumerate(passages, start=1))


def finding_encoder(vlm: ClinicalVLM) -> VisionEncoder | None:
    """The finding head on the VLM's own vision tower, or None when no trained head fits the tower.

    Sharing the tower keeps one copy in memory, and the probabilities then describe the very
    features the LLM is given. An adapter that brings its own tower weights breaks the pairing the
    head was trained and evaluated with, so then the shipped tower and head load on their own (6 MB).
    """
    folder = resolve_weights(vlm.config.vision)
    if folder is None or not (folder / HEAD_FILE).is_file():
        return None
    adapter = resolve_adapter(vlm.config)
    if adapter is not None and (adapter / VISION_FILE).is_file():
        return load_vision_encoder(vlm.config.vision)
    from safetensors.torch import load_file

    base = vlm.hf.get_base_model() if hasattr(vlm.hf, "get_base_model") else vlm.hf  # under peft's wrapper
    tower = base.model.vision_tower
    encoder = VisionEncoder(tower)
    encoder.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return encoder.to(next(tower.parameters()).dtype).eval()


def report_prompt(scans: Sequence[Scan], indication: str = "", similar: Sequence[SimilarCase] = ()) -> str:
    views = ", ".join(view_name(scan) for scan in scans) or "views not available"
    return similar_context(similar) + render(
        "draft_report",
        # PHI is masked before the text can reach a prompt (and through it any log or server).
        indication=sanitise_field(mask_phi(indication or "")) or "not given",
        views=views,
        images=" ".join(IMAGE_MARKER for _ in scans) or "not available",
    )


def similar_context(cases: Sequence[SimilarCase], max_chars: int = MAX_CONTEXT_CHARS) -> str:
    """The prior reports as a prompt preamble ('' for none). Index text is masked at indexing, and
    masked and sanitised again here: a report from a user's folder is untrusted text, so it can
    carry neither identifiers nor control tokens or image markers into the prompt."""
    lines, used = [], 0
    for rank, case in enumerate(cases, start=1):
        line = f"[{rank}] {sanitise_field(mask_phi(case.report), MAX_CONTEXT_REPORT_CHARS)}"
        if used + len(line) > max_chars:
            break
        lines.append(line)
        used += len(line) + 1
    return render("draft_context", reports="\n".join(lines)) if lines else ""


def view_name(scan: Scan) -> str:
    view = (scan.view_position or "").upper()
    if view in {"PA", "AP"}:
        return f"{view} view"
    if view in {"LL", "RL", "LAT", "LATERAL"}:
        return "lateral view"
    return "view not stated"
