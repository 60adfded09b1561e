"""Browser front end (Gradio): draft reports, triage, EHR summaries and patient education.

The only module that imports gradio (with `app_report.py`, the report tab); the library stays
gradio-free. The model loads in `main()`, never at import, so tests build the app around any
Assistant. PHI-safe defaults: bound to localhost, no share link, analytics off, uploads kept in our
own temp folder and deleted once read, PHI-masking log filter, sign-in from a hashed users file.
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

from app_report import current_user, report_tab  # noqa: E402
from assistant.auth import Authenticator, users_file_from_env  # noqa: E402
from assistant.cli import add_model_options, config_from_args, user_message  # noqa: E402
from assistant.config import data_dir  # noqa: E402
from assistant.dialogue import as_text_turns  # noqa: E402
from assistant.phi import PhiLogFilter  # noqa: E402
from assistant.pipeline import READING_LEVELS, Assistant  # noqa: E402
from assistant.safety import DRAFT_LABEL  # noqa: E402
from assistant.store import Store  # noqa: E402
from assistant.workflow import Workflow  # noqa: E402

log = logging.getLogger("app")

TITLE = "Clinical assistant"
BANNER = (
    f"**Research use only.** {DRAFT_LABEL} Emergencies: call your local emergency number; this tool "
    "does not replace one."
)
MAX_UPLOAD = "200mb"
MODEL_QUEUE = "model"  # every model-backed event shares one slot: one generation at a time on a CPU


def build_app(assistant: Assistant, workflow: Workflow) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\n{BANNER}")
        with gr.Tabs():
            with gr.Tab("Draft report", id="report"):
                report_tab(assistant, workflow, MODEL_QUEUE)
            with gr.Tab("Triage", id="triage"):
                chat_tab(workflow, "triage", "Describe the symptoms (who, since when, how severe)…",
                         lambda history, message: assistant.triage(history, message))
            with gr.Tab("EHR summary", id="summary"):
                chat_tab(workflow, "summarize", "Paste a clinical note or record…",
                         lambda history, message: assistant.summarize(message), lines=8)
            with gr.Tab("Patient education", id="educate"):
                level = gr.Dropdown(list(READING_LEVELS), value=READING_LEVELS[1], label="Reading level",
                                    elem_id="educate-level")
                chat_tab(workflow, "educate", "Ask a health question, or paste a report to explain…",
                         lambda history, message, reading_level: assistant.educate(message, reading_level),
                         extra_inputs=[level])
            with gr.Tab("History", id="history"):
                history_tab(workflow, app)
    app.queue(max_size=32)
    return app


def chat_tab(workflow: Workflow, name: str, placeholder: str, stream, lines: int = 2, extra_inputs=()) -> None:
    """A chat for one text mode: history, a message box, streaming answers, a status line.

    Each completed answer is stored (masked) in the user's history; 'New conversation' starts a
    new stored session.
    """
    chat = gr.Chatbot(label="Conversation", height=480, elem_id=f"{name}-chat")
    message = gr.Textbox(label="Message", placeholder=placeholder, lines=lines, elem_id=f"{name}-message")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id=f"{name}-send")
        clear = gr.Button("New conversation", elem_id=f"{name}-clear")
    status = gr.Markdown(elem_id=f"{name}-status")
    session = gr.State(None)  # (stored session id, number of turns already stored)

    def on_send(history, text, *extra):
        yield from chat_events(lambda h, m: stream(h, m, *extra), text, history)

    def on_done(history, stored, request: gr.Request):
        return record_chat(workflow, current_user(request), name, history, stored)

    send.click(on_send, inputs=[chat, message, *extra_inputs], outputs=[chat, message, status],
               api_name=name, concurrency_id=MODEL_QUEUE, concurrency_limit=1
               ).then(on_done, inputs=[chat, session], outputs=[session], api_name=False)
    clear.click(lambda: ([], "", "", None), outputs=[chat, message, status, session], api_name=False)


def chat_events(stream, message: str, history) -> Iterator[tuple]:
    """Generator behind a chat's Send button; yields (chat, message box, status).

    Bad input keeps the user's text in the box (no lost work); a model failure ends that answer
    with a notice and leaves the conversation usable.
    """
    history = as_text_turns(history)  # Gradio sends content as lists of parts
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


def record_chat(workflow: Workflow, user: str, mode: str, history, stored):
    """Store the turns added since the last call; returns the new (session id, stored count)."""
    session_id, count = stored or (None, 0)
    history = as_text_turns(history)
    if len(history) < count:  # the conversation was cleared or replaced: a new session
        session_id, count = None, 0
    for index in range(count, len(history) - 1, 2):
        question, answer = history[index], history[index + 1]
        if question.get("role") == "user" and answer.get("role") == "assistant":
            session_id = workflow.record_turn(user, mode, session_id, question["content"], answer["content"])
    return session_id, len(history) - len(history) % 2


def history_tab(workflow: Workflow, app: gr.Blocks) -> None:
    gr.Markdown("Your conversations and accepted reports (only yours), newest first.")
    table = gr.Dataframe(headers=["kind", "mode", "when (UTC)", "title"], interactive=False,
                         elem_id="history-table")
    refresh = gr.Button("Refresh", elem_id="history-refresh")

    def rows(request: gr.Request):
        return [[r.kind, r.mode, r.when, r.title] for r in workflow.history(current_user(request))]

    refresh.click(rows, outputs=[table], api_name="history")
    app.load(rows, outputs=[table], api_name=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the clinical assistant in the browser.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--users", default=None, help="users file for sign-in (default: $ASSISTANT_USERS_FILE)")
    parser.add_argument("--data-dir", default=None, help="history and exports (default: $ASSISTANT_DATA_DIR)")
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # handler-level: also covers child loggers' records
        handler.addFilter(PhiLogFilter())
    import faiss

    faiss.omp_set_num_threads(1)  # single queries run 5-13x slower when a second thread waits for a busy core
    try:
        auth = _authenticator(args.users)
        folder = Path(args.data_dir) if args.data_dir else data_dir()
        workflow = Workflow(Store.open(folder / "assistant.db"), folder / "exports")
        assistant = Assistant.from_config(config_from_args(args))
    except Exception as err:
        if args.debug:
            raise
        print(f"error: {user_message(err)}")
        return 2
    app = build_app(assistant, workflow)
    app.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=MAX_UPLOAD,
               ssr_mode=False, show_error=False, auth=auth, auth_message="Sign in (research use only)")
    return 0


def _authenticator(users: str | None):
    path = Path(users) if users else users_file_from_env()
    if path is None:
        log.warning("sign-in is off (no users file): everyone shares the local history")
        return None
    return Authenticator.from_file(path)


if __name__ == "__main__":
    raise SystemExit(main())
