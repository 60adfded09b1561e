"""Browser front end (Gradio): draft reports, triage, EHR summaries and patient education.

The only module that imports gradio. The model loads in `main()`, never at import, so tests can
build the app around any Assistant. PHI-safe defaults: bound to localhost, no share link, analytics
off, uploads kept in our own temp folder and deleted as soon as they are read.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Must be set before gradio is imported: it reads these at import/upload time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "clinical-assistant-uploads"))

import gradio as gr  # noqa: E402

from assistant.cli import add_model_options, config_from_args, user_message  # noqa: E402
from assistant.dicom import ScanError, to_uint8  # noqa: E402
from assistant.phi import PhiLogFilter  # noqa: E402
from assistant.pipeline import MAX_IMAGES_PER_STUDY, READING_LEVELS, Assistant  # noqa: E402
from assistant.safety import DRAFT_LABEL  # noqa: E402

log = logging.getLogger("app")

TITLE = "Clinical assistant"
BANNER = (
    f"**Research use only.** {DRAFT_LABEL} Emergencies: call your local emergency number; this tool "
    "does not replace one."
)
MAX_UPLOAD = "200mb"
MODEL_QUEUE = "model"  # every model-backed event shares one slot: one generation at a time on a CPU


def build_app(assistant: Assistant) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\n{BANNER}")
        with gr.Tabs():
            with gr.Tab("Draft report", id="report"):
                report_tab(assistant)
            with gr.Tab("Triage", id="triage"):
                chat_tab("triage", "Describe the symptoms (who, since when, how severe)…",
                         lambda history, message: assistant.triage(history, message))
            with gr.Tab("EHR summary", id="summary"):
                chat_tab("summarize", "Paste a clinical note or record…",
                         lambda history, message: assistant.summarize(message), lines=8)
            with gr.Tab("Patient education", id="educate"):
                level = gr.Dropdown(list(READING_LEVELS), value=READING_LEVELS[1], label="Reading level",
                                    elem_id="educate-level")
                chat_tab("educate", "Ask a health question, or paste a report to explain…",
                         lambda history, message, reading_level: assistant.educate(message, reading_level),
                         extra_inputs=[level])
    app.queue(max_size=32)
    return app


def report_tab(assistant: Assistant) -> None:
    gr.Markdown("Upload the images of one chest radiograph study (DICOM, PNG or JPEG: frontal, lateral, "
                "optional prior), add the indication, and press *Draft report*.")
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Study images (DICOM, PNG, JPEG)", file_count="multiple", elem_id="study-files")
            indication = gr.Textbox(label="Indication (optional)", placeholder="e.g. cough and fever",
                                    elem_id="indication")
            run = gr.Button("Draft report", variant="primary", elem_id="draft-button")
            status = gr.Markdown(elem_id="status")
            gallery = gr.Gallery(label="Images (de-identified pixels)", columns=3, height=320, elem_id="viewer")
        with gr.Column(scale=3):
            chat = gr.Chatbot(label="Draft report", height=560, elem_id="chat")
    study = gr.State(None)  # the de-identified Scans of this browser session, in memory only

    def on_draft(study_files, indication_text, history, scans):
        # A named generator function: Gradio streams only what it can see is a generator.
        yield from draft_events(assistant, study_files, indication_text, history, scans)

    run.click(on_draft, inputs=[files, indication, chat, study], outputs=[gallery, chat, status, files, study],
              api_name="draft_report", concurrency_id=MODEL_QUEUE, concurrency_limit=1)


def chat_tab(name: str, placeholder: str, stream, lines: int = 2, extra_inputs=()) -> None:
    """A chat for one text mode: history, a message box, streaming answers, a status line."""
    chat = gr.Chatbot(label="Conversation", height=480, elem_id=f"{name}-chat")
    message = gr.Textbox(label="Message", placeholder=placeholder, lines=lines, elem_id=f"{name}-message")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id=f"{name}-send")
        clear = gr.Button("New conversation", elem_id=f"{name}-clear")
    status = gr.Markdown(elem_id=f"{name}-status")

    def on_send(history, text, *extra):
        yield from chat_events(lambda h, m: stream(h, m, *extra), text, history)

    send.click(on_send, inputs=[chat, message, *extra_inputs], outputs=[chat, message, status],
               api_name=name, concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    clear.click(lambda: ([], "", ""), outputs=[chat, message, status], api_name=False)


def chat_events(stream, message: str, history) -> Iterator[tuple]:
    """Generator behind a chat's Send button; yields (chat, message box, status).

    Bad input keeps the user's text in the box (no lost work); a model failure ends that answer
    with a notice and leaves the conversation usable.
    """
    history = list(history or [])
    message = (message or "").strip()
    if not message:
        yield history, gr.skip(), "⚠️ Type a message first."
        return
    turns = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    try:
        for text in stream(history, message):
            turns[-1] = {"role": "assistant", "content": text}
            yield turns, "", "Answering…"
    except ValueError as err:  # input the pipeline refuses: explain, keep the text
        yield history, message, f"⚠️ {user_message(err)}"
        return
    except Exception as err:
        log.error("answer generation failed: %s", type(err).__name__)
        turns[-1] = {"role": "assistant", "content": turns[-1]["content"] + "\n\n⚠️ Generation stopped."}
        yield turns, "", f"⚠️ The model failed while answering ({user_message(err)}). Please try again."
        return
    yield turns, "", "✅ Done: a draft for review, not a diagnosis."


def draft_events(assistant: Assistant, files, indication: str, history, study=None) -> Iterator[tuple]:
    """Generator behind the button: read the study, show it, stream the draft into the chat.

    Yields (gallery, chat, status, files, study). New uploads replace the session's study; with no
    new upload the last study is drafted again (e.g. after the indication was edited).
    """
    history = list(history or [])
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
        history[-1] = {"role": "assistant", "content": history[-1]["content"] + "\n\n⚠️ Generation stopped."}
        message = f"⚠️ The model failed while drafting ({user_message(err)}). Please try again."
        yield gr.skip(), history, message, gr.skip(), gr.skip()
        return
    yield gr.skip(), history, "✅ Draft complete: review and edit before use.", gr.skip(), gr.skip()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the clinical assistant in the browser.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # handler-level: also covers child loggers' records
        handler.addFilter(PhiLogFilter())
    try:
        assistant = Assistant.from_config(config_from_args(args))
    except Exception as err:
        if args.debug:
            raise
        print(f"error: {user_message(err)}")
        return 2
    app = build_app(assistant)
    app.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=MAX_UPLOAD,
               ssr_mode=False, show_error=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
