"""The 'Draft report' tab: upload a study, view it, stream a draft beside similar prior cases,
edit it, accept it, export it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from app_viewer import image_choices, render_view, viewer_panel, wire_viewer
from assistant.app_retrieval import CASE_HEADERS, NO_INDEX, CaseFinder, CaseLookup, find_similar
from assistant.cli import user_message
from assistant.dialogue import as_text_turns
from assistant.dicom import ScanError
from assistant.guard import flag_summary
from assistant.pipeline import MAX_IMAGES_PER_STUDY, Assistant
from assistant.safety import DRAFT_LABEL
from assistant.workflow import EXPORT_FORMATS, Workflow

log = logging.getLogger("app")
LOCAL_USER = "local"  # the one user when sign-in is off
STOPPED = "⚠️ Generation stopped."
# What draft_events yields, in this order (gr.skip() leaves a component as it is). The API
# returns all but the session states (study, checked).
DRAFT_OUTPUTS = ("chat", "status", "files", "study", "cases_note", "cases_table", "image_check", "pixel_note",
                 "checked")
IMAGE_CHECK_OFF = "Image check: not available (this model has no trained finding classifier)."
IMAGE_CHECK_CLEAR = ("Image check: the image classifier raised nothing to verify in this draft (a weak classifier: "
                     "still read the image).")


def current_user(request: gr.Request | None) -> str:
    return getattr(request, "username", None) or LOCAL_USER


def report_tab(assistant: Assistant, workflow: Workflow, queue: str, cases: CaseFinder | None = None) -> None:
    gr.Markdown("Upload the images of one chest radiograph study together (DICOM, PNG or JPEG: frontal, lateral, "
                "optional prior; a new upload replaces the study), look at them, add the indication, and press "
                "*Draft report*. Then edit the draft, accept it, and export it.")
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Study images (DICOM, PNG, JPEG)", file_count="multiple", elem_id="study-files")
            indication = gr.Textbox(label="Indication (optional)", placeholder="e.g. cough and fever",
                                    elem_id="indication")
            use_cases = gr.Checkbox(label="Use similar cases as context", value=False, interactive=cases is not None,
                                    info="Put the retrieved prior reports into the draft prompt.", elem_id="use-cases")
            pixel_note = gr.Markdown(elem_id="pixel-review")
            run = gr.Button("Draft report", variant="primary", elem_id="draft-button")
            status = gr.Markdown(elem_id="status")
            viewer = viewer_panel(assistant)
        with gr.Column(scale=3):
            chat = gr.Chatbot(label="Draft report", height=360, elem_id="chat")
            image_check = gr.Markdown(elem_id="image-check")
            editor = gr.Textbox(label=f"Report editor ({DRAFT_LABEL} Edit before accepting.)", lines=10,
                                interactive=True, elem_id="report-editor")
            with gr.Row():
                accept = gr.Button("Accept report", variant="primary", elem_id="accept-button")
                fmt = gr.Radio(list(EXPORT_FORMATS), value="markdown", label="Export format", elem_id="export-format")
                export = gr.Button("Export", elem_id="export-button")
            accepted_status = gr.Markdown(elem_id="accept-status")
            download = gr.File(label="Exported report", interactive=False, elem_id="export-file")
        with gr.Column(scale=3):
            gr.Markdown("### Similar prior cases")
            cases_note = gr.Markdown("Shown after a draft (or before it, with *use similar cases as context*)."
                                     if cases is not None else NO_INDEX, elem_id="similar-note")
            cases_table = gr.Dataframe(headers=CASE_HEADERS, interactive=False, wrap=True, max_height=720,
                                       column_widths=["24%", "13%", "18%", "45%"], elem_id="similar-cases")
    study = gr.State(None)  # the de-identified Scans of this browser session, in memory only
    draft_id, report_id = gr.State(None), gr.State(None)
    checked = gr.State(None)  # the image check's flags (kinds, findings, probabilities), stored with the draft
    limit = assistant.config.app.max_concurrent_generations  # shared by every event in `queue`: a global cap
    wire_viewer(viewer, assistant, study)
    shared = SharedUploads()  # one per app: sessions that upload the same file share its read

    def on_upload(study_files, scans, window, finding):
        return upload_events(assistant, study_files, scans, window, finding, shared)

    def on_draft(study_files, indication_text, context, history, scans):
        # A named generator function: Gradio streams only what it can see is a generator.
        yield from draft_events(assistant, study_files, indication_text, history, scans, context, cases, shared)

    def on_drafted(history, scans, flags, request: gr.Request):
        return record_draft(workflow, current_user(request), history, scans, flags)

    def on_accept(text, draft, request: gr.Request):
        return accept_draft(workflow, current_user(request), draft, text)

    def on_export(report, chosen, scans, request: gr.Request):
        return export_report(workflow, current_user(request), report, chosen, scans)

    # Reading an upload joins the model queue so that a Draft click right after it waits for it.
    files.upload(on_upload, inputs=[files, study, viewer.window, viewer.finding],
                 outputs=[files, study, status, viewer.image_choice, *viewer.outputs, pixel_note], api_name=False,
                 concurrency_id=queue, concurrency_limit=limit)
    run.click(on_draft, inputs=[files, indication, use_cases, chat, study],
              outputs=[chat, status, files, study, cases_note, cases_table, image_check, pixel_note, checked],
              api_name="draft_report", concurrency_id=queue, concurrency_limit=limit
              ).then(on_drafted, inputs=[chat, study, checked], outputs=[editor, draft_id, report_id], api_name=False)
    accept.click(on_accept, inputs=[editor, draft_id], outputs=[accepted_status, report_id], api_name="accept_report")
    export.click(on_export, inputs=[report_id, fmt, study], outputs=[download, accepted_status],
                 api_name="export_report")


def upload_events(assistant: Assistant, files, study, window: str, finding: str,
                  shared: SharedUploads | None = None) -> tuple:
    """New uploads: read them into the session's study and show the first image.

    Returns (files, study, status, image selector, *viewer outputs, pixel-review note); a bad
    upload keeps the last study and says which image (by position) could not be used.
    """
    paths = [Path(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        return (gr.skip(),) * 9
    if len(paths) > MAX_IMAGES_PER_STUDY:
        for path in paths:
            path.unlink(missing_ok=True)
        return None, gr.skip(), f"⚠️ At most {MAX_IMAGES_PER_STUDY} images per study ({len(paths)} uploaded).", \
            *(gr.skip(),) * 6
    scans, problem, review = read_uploads(assistant, paths, shared)
    if problem:
        return None, gr.skip(), problem, *(gr.skip(),) * 6
    shown = render_view(assistant, scans, 0, window, finding)
    # One upload is one study: appending would risk mixing two patients' images in one draft.
    return None, scans, f"Study of {len(scans)} image(s) ready: add the indication and press *Draft report*.", \
        image_choices(scans), *shown, review


def draft_events(assistant: Assistant, files, indication: str, history, study=None, use_cases: bool = False,
                 cases: CaseFinder | None = None, shared: SharedUploads | None = None) -> Iterator[tuple]:
    """Generator behind the button: read any new uploads, stream the draft into the chat, and show
    similar prior cases (before the draft when they go into its prompt, after it otherwise).

    Yields tuples in DRAFT_OUTPUTS order. New uploads replace the session's study; with no new
    upload the last study is drafted again (e.g. after the indication was edited).
    """
    history = as_text_turns(history)  # Gradio sends content as lists of parts
    paths = [Path(getattr(f, "name", f)) for f in (files or [])]
    if study and paths and not any(path.exists() for path in paths):
        paths = []  # a Draft click raced the upload event, which has already read (and deleted) them
    if len(paths) > MAX_IMAGES_PER_STUDY:
        for path in paths:
            path.unlink(missing_ok=True)  # refused uploads leave no PHI on disk either
        yield _step(chat=history, status=f"⚠️ At most {MAX_IMAGES_PER_STUDY} images per study ({len(paths)} uploaded).",
                    files=None)
        return
    review = gr.skip()  # the pixel-review note of the study already read stays as it is
    if paths:
        study, problem, review = read_uploads(assistant, paths, shared)
        if problem:
            yield _step(chat=history, status=problem, files=None)
            return
    if not study:
        yield _step(chat=history, status="⚠️ Upload at least one DICOM, PNG or JPEG image first.")
        return
    request = f"Draft a report for {len(study)} image(s)." + (f" Indication: {indication}" if indication else "")
    history += [{"role": "user", "content": request}, {"role": "assistant", "content": ""}]
    # The uploads are gone from disk once read: clear the file list so it offers no dead links.
    yield _step(chat=history, status="Drafting…", files=None, study=study, image_check="", pixel_note=review,
                checked=None)
    similar = ()
    if use_cases:
        lookup = lookup_cases(assistant, cases, study, indication)
        similar = lookup.cases
        yield _step(cases_note=lookup.note, cases_table=lookup.rows)
    try:
        for draft in assistant.draft_report(study, indication=indication, similar=similar):
            history[-1] = {"role": "assistant", "content": draft}
            yield _step(chat=history, status="Drafting…")
    except Exception as err:  # the session must stay usable after a model failure
        log.error("draft generation failed: %s", type(err).__name__)
        history[-1] = {"role": "assistant", "content": f"{history[-1]['content']}\n\n{STOPPED}"}
        yield _step(chat=history, status=f"⚠️ The model failed while drafting ({user_message(err)}). Please try again.")
        return
    body = history[-1]["content"].replace(DRAFT_LABEL, "", 1)
    note, flags = image_check(assistant, study, body)
    done = dict(chat=history, status="✅ Draft complete: edit it below, then accept.", image_check=note, checked=flags,
                pixel_note=review)  # repeated so an API caller gets it with the finished draft
    if not use_cases:
        lookup = lookup_cases(assistant, cases, study, indication, body)
        done.update(cases_note=lookup.note, cases_table=lookup.rows)
    yield _step(**done)


def image_check(assistant: Assistant, study, draft: str) -> tuple[str, dict | None]:
    """(the note shown under the draft, the flags to store with it). A failed check is one line
    and never stops the draft."""
    try:
        result = assistant.check_draft(study, draft)
    except Exception as err:
        log.error("image check failed: %s", type(err).__name__)
        return f"⚠️ Image check failed ({user_message(err)}): verify the findings on the image.", None
    if result is None:
        return IMAGE_CHECK_OFF, None
    return result.note or IMAGE_CHECK_CLEAR, flag_summary(result)


def lookup_cases(assistant: Assistant, cases: CaseFinder | None, study, indication: str, draft: str = "") -> CaseLookup:
    """Similar cases for the panel; a failed search is one line there and never stops the draft."""
    try:
        return find_similar(cases, indication, draft, lambda: assistant.study_vector(study))
    except Exception as err:
        log.error("similar-case search failed: %s", type(err).__name__)
        return CaseLookup((), f"⚠️ Similar-case search failed ({user_message(err)}).", [])


def _step(**values) -> tuple:
    unknown = set(values) - set(DRAFT_OUTPUTS)
    if unknown:
        raise TypeError(f"not a draft output: {sorted(unknown)}")
    return tuple(values[name] if name in values else gr.skip() for name in DRAFT_OUTPUTS)


class SharedUploads:
    """Reads of uploads whose file an identical upload's read has already deleted.

    Gradio files an upload at <temp dir>/<hash of its bytes>/<file name>, so sessions uploading the
    same file (one study fetched by two clinicians, a demo image) are handed one path, and the first
    read deletes it. A later read of that path takes the first one's result instead of failing with
    "file not found": the same bytes give the same de-identified Scan. References are weak: an entry
    lives only while some session's study still holds that Scan, so nothing is kept for its own sake.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scans: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # path -> Scan
        self._review: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Scan -> pixel-review flag

    def keep(self, path: Path, scan, review: bool) -> None:
        with self._lock:
            self._scans[str(path)] = scan
            self._review[scan] = review

    def find(self, path: Path):
        """(scan, pixel-review flag) of an earlier read of `path`, or None."""
        with self._lock:
            scan = self._scans.get(str(path))
            return None if scan is None else (scan, self._review.get(scan, True))


def read_uploads(assistant: Assistant, paths: list[Path], shared: SharedUploads | None = None):
    """(scans for every upload, a message naming the first bad one by position, a one-line
    warning for DICOM files whose pixels may show burned-in patient text) with "" for no message.

    Uploads are deleted once read: the pixels live on in memory, the file (and its PHI-bearing
    header and file name) does not stay on disk.
    """
    scans, review = [], []
    try:
        for index, path in enumerate(paths, start=1):
            try:
                scan, flagged = _read_upload(assistant, path, shared)
            except ScanError as err:
                return [], f"⚠️ Image {index} could not be used: {err}", ""
            except Exception as err:  # a reader bug must not become a traceback in the browser
                log.error("reading an upload failed: %s", type(err).__name__)
                return [], f"⚠️ Image {index} could not be read ({type(err).__name__}); try another export of it.", ""
            scans.append(scan)
            if flagged:
                review.append(str(index))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return scans, "", pixel_review_note(review)


def _read_upload(assistant: Assistant, path: Path, shared: SharedUploads | None):
    """(scan, needs pixel review) of one upload, or of the identical upload read before it."""
    try:
        scan = assistant.read(path)
    except ScanError:
        earlier = shared.find(path) if shared is not None and not path.exists() else None
        if earlier is None:
            raise
        return earlier
    flagged = scan.source_format == "dicom" and _needs_pixel_review(assistant, path)
    if shared is not None:
        shared.keep(path, scan, flagged)
    return scan, flagged


def _needs_pixel_review(assistant: Assistant, path: Path) -> bool:
    try:
        return assistant.needs_pixel_review(path)
    except Exception as err:  # unknown counts as "look": the check must never block a draft
        log.error("burned-in text check failed: %s", type(err).__name__)
        return True


def pixel_review_note(images: list[str]) -> str:
    if not images:
        return ""
    return (f"⚠️ Image {', '.join(images)}: the DICOM may show patient text burned into the pixels (it is flagged, "
            "not removed) — check the image before sharing or exporting it.")


def record_draft(workflow: Workflow, user: str, history, scans, image_check: dict | None = None):
    """After a completed draft: store it (with the image check's flags) and open it in the editor;
    returns (editor, draft id, report id)."""
    last = (as_text_turns(history) or [{}])[-1]
    text = last.get("content") if last.get("role") == "assistant" else None
    if not text or not scans or not text.startswith(DRAFT_LABEL) or text.endswith(STOPPED):
        return gr.skip(), gr.skip(), gr.skip()
    body = text.replace(DRAFT_LABEL, "", 1).strip()
    return body, workflow.record_draft(user, scans, body, image_check), None


def accept_draft(workflow: Workflow, user: str, draft_id, text: str):
    if draft_id is None:
        return "⚠️ Draft a report first.", gr.skip()
    try:
        report = workflow.accept(user, draft_id, text)
    except (ValueError, PermissionError) as err:
        return f"⚠️ {user_message(err)}", gr.skip()
    return (f"✅ Accepted by **{report.user}** at {report.accepted_at} (version {report.version}). "
            "Choose a format and export."), report.id


def export_report(workflow: Workflow, user: str, report_id, fmt: str, scans):
    if report_id is None:
        return None, "⚠️ Accept the report before exporting it."
    try:
        path = workflow.export(user, report_id, fmt, scans or [])
    except (ValueError, PermissionError) as err:
        return None, f"⚠️ {user_message(err)}"
    return _download_copy(path), f"✅ Exported as {fmt}: {path.name}"


def _download_copy(path: Path) -> str:
    """A copy in a fresh folder of Gradio's temp dir: the per-user export folder itself is never
    made servable (that would let one signed-in user fetch another's files by path)."""
    folder = Path(tempfile.mkdtemp(dir=os.environ.get("GRADIO_TEMP_DIR")))
    return str(shutil.copy2(path, folder / path.name))
