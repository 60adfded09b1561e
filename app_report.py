"""The 'Draft report' tab: upload a study, stream a draft, edit it, accept it, export it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from assistant.cli import user_message
from assistant.dialogue import as_text_turns
from assistant.dicom import ScanError, to_uint8
from assistant.pipeline import MAX_IMAGES_PER_STUDY, Assistant
from assistant.safety import DRAFT_LABEL
from assistant.workflow import EXPORT_FORMATS, Workflow

log = logging.getLogger("app")
LOCAL_USER = "local"  # the one user when sign-in is off
STOPPED = "⚠️ Generation stopped."


def current_user(request: gr.Request | None) -> str:
    return getattr(request, "username", None) or LOCAL_USER


def report_tab(assistant: Assistant, workflow: Workflow, queue: str) -> None:
    gr.Markdown("Upload the images of one chest radiograph study (DICOM, PNG or JPEG: frontal, lateral, "
                "optional prior), add the indication, and press *Draft report*. Then edit the draft, "
                "accept it, and export it.")
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Study images (DICOM, PNG, JPEG)", file_count="multiple", elem_id="study-files")
            indication = gr.Textbox(label="Indication (optional)", placeholder="e.g. cough and fever",
                                    elem_id="indication")
            run = gr.Button("Draft report", variant="primary", elem_id="draft-button")
            status = gr.Markdown(elem_id="status")
            gallery = gr.Gallery(label="Images (de-identified pixels)", columns=3, height=320, elem_id="viewer")
        with gr.Column(scale=3):
            chat = gr.Chatbot(label="Draft report", height=360, elem_id="chat")
            editor = gr.Textbox(label=f"Report editor ({DRAFT_LABEL} Edit before accepting.)", lines=10,
                                interactive=True, elem_id="report-editor")
            with gr.Row():
                accept = gr.Button("Accept report", variant="primary", elem_id="accept-button")
                fmt = gr.Radio(list(EXPORT_FORMATS), value="markdown", label="Export format", elem_id="export-format")
                export = gr.Button("Export", elem_id="export-button")
            accepted_status = gr.Markdown(elem_id="accept-status")
            download = gr.File(label="Exported report", interactive=False, elem_id="export-file")
    study = gr.State(None)  # the de-identified Scans of this browser session, in memory only
    draft_id, report_id = gr.State(None), gr.State(None)

    def on_draft(study_files, indication_text, history, scans):
        # A named generator function: Gradio streams only what it can see is a generator.
        yield from draft_events(assistant, study_files, indication_text, history, scans)

    def on_drafted(history, scans, request: gr.Request):
        return record_draft(workflow, current_user(request), history, scans)

    def on_accept(text, draft, request: gr.Request):
        return accept_draft(workflow, current_user(request), draft, text)

    def on_export(report, chosen, scans, request: gr.Request):
        return export_report(workflow, current_user(request), report, chosen, scans)

    run.click(on_draft, inputs=[files, indication, chat, study], outputs=[gallery, chat, status, files, study],
              api_name="draft_report", concurrency_id=queue, concurrency_limit=1
              ).then(on_drafted, inputs=[chat, study], outputs=[editor, draft_id, report_id], api_name=False)
    accept.click(on_accept, inputs=[editor, draft_id], outputs=[accepted_status, report_id], api_name="accept_report")
    export.click(on_export, inputs=[report_id, fmt, study], outputs=[download, accepted_status],
                 api_name="export_report")


def draft_events(assistant: Assistant, files, indication: str, history, study=None) -> Iterator[tuple]:
    """Generator behind the button: read the study, show it, stream the draft into the chat.

    Yields (gallery, chat, status, files, study). New uploads replace the session's study; with no
    new upload the last study is drafted again (e.g. after the indication was edited).
    """
    history = as_text_turns(history)  # Gradio sends content as lists of parts
    paths = [Path(getattr(f, "name", f)) for f in (files or [])]
    if len(paths) > MAX_IMAGES_PER_STUDY:
        yield _no_change(history, f"⚠️ At most {MAX_IMAGES_PER_STUDY} images per study ({len(paths)} uploaded).")
        return
    if paths:
        study, problem = read_uploads(assistant, paths)
        if problem:
            yield gr.skip(), history, problem, None, gr.skip()
            return
    if not study:
        yield _no_change(history, "⚠️ Upload at least one DICOM, PNG or JPEG image first.")
        return
    request = f"Draft a report for {len(study)} image(s)." + (f" Indication: {indication}" if indication else "")
    history += [{"role": "user", "content": request}, {"role": "assistant", "content": ""}]
    # The uploads are gone from disk once read: clear the file list so it offers no dead links.
    yield [to_uint8(scan) for scan in study], history, "Drafting…", None, study
    try:
        for draft in assistant.draft_report(study, indication=indication):
            history[-1] = {"role": "assistant", "content": draft}
            yield gr.skip(), history, "Drafting…", gr.skip(), gr.skip()
    except Exception as err:  # the session must stay usable after a model failure
        log.error("draft generation failed: %s", type(err).__name__)
        history[-1] = {"role": "assistant", "content": f"{history[-1]['content']}\n\n{STOPPED}"}
        message = f"⚠️ The model failed while drafting ({user_message(err)}). Please try again."
        yield gr.skip(), history, message, gr.skip(), gr.skip()
        return
    yield gr.skip(), history, "✅ Draft complete: edit it below, then accept.", gr.skip(), gr.skip()


def _no_change(history, status: str) -> tuple:
    return gr.skip(), history, status, gr.skip(), gr.skip()


def read_uploads(assistant: Assistant, paths: list[Path]):
    """Scans for every upload, or a user-facing message naming the first bad one by position.

    Uploads are deleted once read: the pixels live on in memory, the file (and its PHI-bearing
    header and file name) does not stay on disk.
    """
    scans = []
    try:
        for index, path in enumerate(paths, start=1):
            try:
                scans.append(assistant.read(path))
            except ScanError as err:
                return [], f"⚠️ Image {index} could not be used: {err}"
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return scans, ""


def record_draft(workflow: Workflow, user: str, history, scans):
    """After a completed draft: store it and open it in the editor; returns (editor, draft id, report id)."""
    last = (as_text_turns(history) or [{}])[-1]
    text = last.get("content") if last.get("role") == "assistant" else None
    if not text or not scans or not text.startswith(DRAFT_LABEL) or text.endswith(STOPPED):
        return gr.skip(), gr.skip(), gr.skip()
    body = text.replace(DRAFT_LABEL, "", 1).strip()
    return body, workflow.record_draft(user, scans, body), None


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
