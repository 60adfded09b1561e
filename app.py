"""Browser front end (Gradio): draft reports, triage, EHR summaries and patient education.

The only modules that import gradio are this one, `app_report.py` (the report tab) and
`app_viewer.py` (its image viewer); the library stays gradio-free. Retrieval indexes are opened
here (`--index`, `--passages`) and never built: `python -m assistant prepare` builds them once.
The model loads in `main()`, never at import, so tests build the app around any Assistant.
PHI-safe defaults: bound to localhost, no share link, analytics off, uploads kept in our own temp
folder and deleted once read, PHI-masking log filter, sign-in from a hashed users file.
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
from assistant.app_retrieval import CASE_INDEX, PASSAGE_INDEX, Retrieval, default_index, open_retrieval  # noqa: E402
from assistant.auth import Authenticator, users_file_from_env  # noqa: E402
from assistant.backend import BackendError  # noqa: E402
from assistant.cli import add_model_options, config_from_args, user_message  # noqa: E402
from assistant.config import data_dir  # noqa: E402
from assistant.dialogue import as_text_turns  # noqa: E402
from assistant.ehr_records import RecordError, record_from_upload  # noqa: E402
from assistant.phi import PhiLogFilter  # noqa: E402
from assistant.pipeline import Assistant, red_flag_text  # noqa: E402
from assistant.readability import READING_LEVELS  # noqa: E402
from assistant.safety import DRAFT_LABEL, escalation_message, find_red_flags, guard_answer  # noqa: E402
from assistant.store import Store  # noqa: E402
from assistant.workflow import Workflow  # noqa: E402

log = logging.getLogger("app")

TITLE = "Clinical assistant"
BANNER = (
    f"**Research use only.** {DRAFT_LABEL} Emergencies: call your local emergency number; this tool "
    "does not replace one."
)
MAX_UPLOAD = "200mb"
# Every model-backed event shares this concurrency group, so config.app.max_concurrent_generations
# caps generations across all tabs together (one at a time on a CPU).
MODEL_QUEUE = "model"


def build_app(assistant: Assistant, workflow: Workflow, retrieval: Retrieval = Retrieval()) -> gr.Blocks:
    limit = assistant.config.app.max_concurrent_generations
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\n{BANNER}")
        with gr.Tabs():
            with gr.Tab("Draft report", id="report"):
                report_tab(assistant, workflow, MODEL_QUEUE, retrieval.cases)
            with gr.Tab("Triage", id="triage"):
                chat_tab(workflow, "triage", "Describe the symptoms (who, since when, how severe)…",
                         lambda history, message: assistant.triage(history, message), limit=limit)
            with gr.Tab("EHR summary", id="summary"):
                ehr_tab(assistant, workflow, limit)
            with gr.Tab("Patient education", id="educate"):
                education_tab(assistant, workflow, retrieval)
            with gr.Tab("History", id="history"):
                history_tab(workflow, app)
    # Bounded: waiting users see their place in line; past max_queue_size they get "busy" at once.
    app.queue(max_size=assistant.config.app.max_queue_size)
    return app


def ehr_tab(assistant: Assistant, workflow: Workflow, limit: int) -> None:
    """Summaries of a pasted note, or of an uploaded FHIR R4 Bundle / Synthea CSV record rendered to text."""
    record = gr.File(label="Or upload a record: FHIR R4 Bundle (.json), Synthea CSV table(s) or a .zip of them",
                     file_count="multiple", file_types=[".json", ".csv", ".zip"], elem_id="summarize-upload")
    message, status = chat_tab(workflow, "summarize", "Paste a clinical note or record…",
                               lambda history, text: assistant.summarize(text), lines=8, limit=limit)
    record.upload(record_text_from_upload, inputs=[record], outputs=[record, message, status], api_name=False)


def record_text_from_upload(files) -> tuple:
    """(cleared file box, de-identified record text for the message box, status line).

    The rendered text carries ages instead of dates and no names or addresses, so what the
    clinician sends (and what is stored) is already de-identified; the upload is deleted once read.
    """
    paths = [Path(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        return gr.skip(), gr.skip(), gr.skip()
    try:
        record = record_from_upload(paths)
    except RecordError as err:
        return None, gr.skip(), f"⚠️ {err}"
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return None, record.text, "Record loaded (de-identified: ages instead of dates, no names). Press *Send* to summarise."


def education_tab(assistant: Assistant, workflow: Workflow, retrieval: Retrieval) -> None:
    """Plain-language answers grounded in MedQuAD passages, whose sources are cited under the answer."""
    find = retrieval.passages.find if retrieval.passages is not None else (lambda question: [])
    gr.Markdown("Answers draw on trusted NIH consumer-health pages (MedQuAD) and cite them under the answer."
                if retrieval.passages is not None else f"⚠️ Answers cite no sources. {' '.join(retrieval.notes)}",
                elem_id="educate-note")
    level = gr.Dropdown(list(READING_LEVELS), value=READING_LEVELS[1], label="Reading level", elem_id="educate-level")
    chat_tab(workflow, "educate", "Ask a health question, or paste a report to explain…",
             lambda history, message, reading_level: assistant.educate(message, reading_level, passages=find(message)),
             extra_inputs=[level], limit=assistant.config.app.max_concurrent_generations)


def chat_tab(workflow: Workflow, name: str, placeholder: str, stream, lines: int = 2, extra_inputs=(),
             limit: int = 1) -> tuple[gr.Textbox, gr.Markdown]:
    """A chat for one text mode: history, a message box, streaming answers, a status line.

    Send first shows any red-flag escalation (fixed rules, no model) outside the queue, so an
    emergency is never kept waiting behind other users' generations; the model's answer follows
    in the shared model queue (at most `limit` at once) and keeps the banner first. Each completed
    answer is stored (masked) in the user's history; 'New conversation' starts a new stored session.
    """
    chat = gr.Chatbot(label="Conversation", height=480, elem_id=f"{name}-chat")
    message = gr.Textbox(label="Message", placeholder=placeholder, lines=lines, elem_id=f"{name}-message")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id=f"{name}-send")
        clear = gr.Button("New conversation", elem_id=f"{name}-clear")
    status = gr.Markdown(elem_id=f"{name}-status")
    session = gr.State(None)  # (stored session id, number of turns already stored)

    def flags_in(history, text):
        return red_flag_text(name, history, text)

    def on_flags(history, text):
        return red_flags_first(flags_in, text, history)

    def on_send(history, text, *extra):
        yield from chat_events(lambda h, m: stream(h, m, *extra), text, history, flags_in)

    def on_done(history, stored, request: gr.Request):
        return record_chat(workflow, current_user(request), name, history, stored)

    send.click(on_flags, inputs=[chat, message], outputs=[chat, status], queue=False, api_name=False
               ).then(on_send, inputs=[chat, message, *extra_inputs], outputs=[chat, message, status],
                      api_name=name, concurrency_id=MODEL_QUEUE, concurrency_limit=limit
                      ).then(on_done, inputs=[chat, session], outputs=[session], api_name=False)
    clear.click(lambda: ([], "", "", None), outputs=[chat, message, status, session], api_name=False)
    return message, status


def red_flags_first(flags_in, message: str, history) -> tuple:
    """The unqueued first step of Send: (chat with the user's message and the escalation banner,
    status), or skips when the message raises no red flag. Rules only: the model is not touched."""
    history = as_text_turns(history)
    message = (message or "").strip()
    said = flags_in(history, message) if message else ""
    banner = escalation_message(find_red_flags(said)) if said else ""
    if not banner:
        return gr.skip(), gr.skip()
    return history + _pending(message, banner), "🚨 Safety notice above. The assistant's answer follows…"


def _pending(message: str, banner: str) -> list[dict]:
    return [{"role": "user", "content": message}, {"role": "assistant", "content": banner}]


def chat_events(stream, message: str, history, flags_in=None) -> Iterator[tuple]:
    """Generator behind a chat's Send button; yields (chat, message box, status).

    `flags_in(history, message)` gives the user text checked for red flags: its banner (which
    `red_flags_first` may already have shown, and which is then replaced, not repeated) leads every
    yielded answer, whatever the model says or whether it fails. Bad input keeps the user's text in
    the box (no lost work); a model failure ends that answer with a notice and leaves the
    conversation usable.
    """
    history = as_text_turns(history)  # Gradio sends content as lists of parts
    message = (message or "").strip()
    if not message:
        yield history, gr.skip(), "⚠️ Type a message first."
        return
    said = flags_in(history, message) if flags_in else ""
    banner = escalation_message(find_red_flags(said)) if said else ""
    if banner and history[-2:] == _pending(message, banner):
        history = history[:-2]  # shown by red_flags_first: the answer below takes its place

    def keep_banner(text: str) -> str:
        return guard_answer(said, text) if banner else text

    turns = history + [{"role": "user", "content": message}, {"role": "assistant", "content": banner}]
    try:
        for text in stream(history, message):
            turns[-1] = {"role": "assistant", "content": keep_banner(text)}
            yield turns, "", "Answering…"
    except ValueError as err:  # input the pipeline refuses: explain, keep the text (and any banner)
        yield (turns if banner else history), message, f"⚠️ {user_message(err)}"
        return
    except Exception as err:
        log.error("answer generation failed: %s", type(err).__name__)
        # A model server's failure (down, timed out, refused) is said where the answer was due.
        notice = user_message(err)
        why = f" {notice[:1].upper()}{notice[1:]}." if isinstance(err, BackendError) else ""
        turns[-1] = {"role": "assistant", "content": turns[-1]["content"] + f"\n\n⚠️{why} Generation stopped."}
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
    parser.add_argument("--index", default=None, help=f"similar-case index (default: DATA_DIR/{CASE_INDEX} if built)")
    parser.add_argument("--passages", default=None,
                        help=f"patient-education passage index (default: DATA_DIR/{PASSAGE_INDEX} if built)")
    # DEBUG also lets every library's records through (the PHI log filter below still sees them all).
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log verbosity on stderr (default: INFO)")
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # handler-level: also covers child loggers' records
        handler.addFilter(PhiLogFilter())
    import faiss

    faiss.omp_set_num_threads(1)  # single queries run 5-13x slower when a second thread waits for a busy core
    try:
        auth = _authenticator(args.users)
        folder = Path(args.data_dir) if args.data_dir else data_dir()
        workflow = Workflow(Store.open(folder / "assistant.db"), folder / "exports")
        config = config_from_args(args)
        retrieval = open_retrieval(config, args.index or default_index(folder, CASE_INDEX),
                                   args.passages or default_index(folder, PASSAGE_INDEX))
        assistant = Assistant.from_config(config)
        if config.generation.fast_decode:
            assistant.vlm.start_fast_decoding()  # background compile; generate() serves until it is ready
    except Exception as err:
        if args.debug:
            raise
        print(f"error: {user_message(err)}")
        return 2
    for note in retrieval.notes:
        log.warning("%s", note)
    app = build_app(assistant, workflow, retrieval)
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
