"""The Gradio app's handlers with a tiny model (the browser test drives the real one)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import app
import app_report
from assistant.pipeline import Assistant
from assistant.safety import DRAFT_LABEL
from assistant.store import Store
from assistant.workflow import Workflow


@pytest.fixture
def assistant(tiny_vlm):
    return Assistant(tiny_vlm)


@pytest.fixture
def workflow(tmp_path):
    return Workflow(Store.open(tmp_path / "db.sqlite"), tmp_path / "exports")


def png(tmp_path, name="cxr.png"):
    path = tmp_path / name
    Image.fromarray((np.random.default_rng(1).random((90, 70)) * 255).astype(np.uint8)).save(path)
    return path


def test_app_builds_with_a_named_api_endpoint(assistant, workflow):
    blocks = app.build_app(assistant, workflow)
    assert "/draft_report" in {f"/{dep['api_name']}" for dep in blocks.config["dependencies"] if dep.get("api_name")}


def test_no_upload_asks_for_one(assistant):
    (_, history, status, _, _), = list(app_report.draft_events(assistant, [], "", []))
    assert "Upload at least one" in status and history == []


def test_non_dicom_upload_gets_a_clear_message_and_is_deleted(assistant, tmp_path):
    bogus = tmp_path / "JOHN_DOE_chest.dcm"  # uploaded file names can carry PHI
    bogus.write_bytes(b"%PDF-1.4 not an image")
    (_, _, status, files, _), = list(app_report.draft_events(assistant, [str(bogus)], "", []))
    assert status.startswith("⚠️ Image 1 could not be used:")
    assert "JOHN" not in status and "Traceback" not in status
    assert not bogus.exists() and files is None


def test_a_draft_streams_into_the_chat(assistant, tmp_path):
    upload = png(tmp_path)
    events = list(app_report.draft_events(assistant, [str(upload)], "cough", []))
    images, _, _, files, study = events[0]
    assert len(images) == 1 and images[0].dtype == np.uint8
    assert files is None and len(study) == 1  # uploads consumed; the study lives in session state
    final_history = events[-1][1]
    assert final_history[-2]["role"] == "user" and "cough" in final_history[-2]["content"]
    assert final_history[-1]["content"].startswith(DRAFT_LABEL)
    assert events[-1][2].startswith("✅")
    assert not upload.exists()


def test_redrafting_reuses_the_session_study(assistant, tmp_path):
    study = [assistant.read(png(tmp_path))]
    events = list(app_report.draft_events(assistant, [], "new indication", [], study))
    assert events[-1][2].startswith("✅")
    assert "new indication" in events[-1][1][-2]["content"]


def test_model_failure_ends_the_answer_and_keeps_the_session(assistant, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        yield "FINDINGS: partial"
        raise RuntimeError("out of memory")

    monkeypatch.setattr(assistant, "draft_report", broken)
    events = list(app_report.draft_events(assistant, [str(png(tmp_path))], "", [{"role": "user", "content": "hi"}]))
    history, status = events[-1][1], events[-1][2]
    assert "model failed" in status and "out of memory" in status
    assert history[0] == {"role": "user", "content": "hi"}  # earlier turns survive
    assert history[-1]["content"].endswith("Generation stopped.")


def test_every_mode_has_a_named_api_endpoint(assistant, workflow):
    blocks = app.build_app(assistant, workflow)
    names = {dep.get("api_name") for dep in blocks.config["dependencies"]}
    assert {"draft_report", "triage", "summarize", "educate", "accept_report", "export_report", "history"} <= names


def test_chat_streams_and_clears_the_box(assistant):
    events = list(app.chat_events(lambda h, m: assistant.triage(h, m), "sore throat for two days", []))
    history, box, status = events[-1]
    assert history[-2] == {"role": "user", "content": "sore throat for two days"}
    assert history[-1]["content"].startswith(DRAFT_LABEL) and box == "" and status.startswith("✅")


def test_emergency_banner_leads_the_triage_answer(assistant):
    events = list(app.chat_events(lambda h, m: assistant.triage(h, m), "I want to kill myself tonight", []))
    assert all(e[0][-1]["content"].startswith("🚨") for e in events if len(e[0]) == 2)


def test_refused_input_keeps_the_users_text(assistant):
    huge = "x " * 40_000
    (history, box, status), = list(app.chat_events(lambda h, m: assistant.summarize(m), huge, []))
    assert history == [] and box == huge.strip() and "at most 8,000" in status


def test_empty_message_is_refused(assistant):
    (_, _, status), = list(app.chat_events(lambda h, m: assistant.triage(h, m), "   ", []))
    assert "Type a message" in status


def test_chat_model_failure_keeps_the_conversation(assistant):
    def broken(history, message):
        yield "partial"
        raise RuntimeError("killed")

    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    history, _, status = list(app.chat_events(broken, "next", earlier))[-1]
    assert history[:2] == earlier and history[-1]["content"].endswith("Generation stopped.")
    assert "killed" in status


def test_completed_draft_opens_in_the_editor_and_can_be_accepted_and_exported(assistant, workflow, tmp_path):
    events = list(app_report.draft_events(assistant, [str(png(tmp_path))], "cough", []))
    history, study = events[-1][1], events[0][4]
    editor, draft_id, report_id = app_report.record_draft(workflow, "alice", history, study)
    assert not editor.startswith(DRAFT_LABEL) and "FINDINGS:" in editor and report_id is None
    status, report_id = app_report.accept_draft(workflow, "alice", draft_id, editor + "\nEdited by me.")
    assert "Accepted by **alice**" in status
    path, message = app_report.export_report(workflow, "alice", report_id, "markdown", study)
    assert "Edited by me." in open(path).read() and message.startswith("✅")


def test_stopped_drafts_are_not_offered_for_acceptance(workflow):
    history = [{"role": "assistant", "content": f"{DRAFT_LABEL}\n\nFINDINGS: x\n\n{app_report.STOPPED}"}]
    import gradio as gr

    result = app_report.record_draft(workflow, "alice", history, ["scan"])
    assert all(item == gr.skip() for item in result)  # nothing stored, nothing put in the editor


def test_accept_and_export_need_their_previous_step(workflow):
    assert app_report.accept_draft(workflow, "alice", None, "text")[0].startswith("⚠️ Draft a report first")
    assert app_report.export_report(workflow, "alice", None, "fhir", [])[1].startswith("⚠️ Accept")


def test_chat_turns_are_recorded_once_per_user(workflow):
    history = [{"role": "user", "content": "sore throat"}, {"role": "assistant", "content": "Urgency: routine"}]
    stored = app.record_chat(workflow, "alice", "triage", history, None)
    stored = app.record_chat(workflow, "alice", "triage", history, stored)  # refused input: nothing new
    history += [{"role": "user", "content": "and fever"}, {"role": "assistant", "content": "ok"}]
    stored = app.record_chat(workflow, "alice", "triage", history, stored)
    assert len(workflow.conversation("alice", stored[0])) == 4
    assert workflow.history("bob") == []


def test_red_flags_in_earlier_turns_escalate_with_gradio_shaped_history(assistant):
    earlier = [{"role": "user", "content": [{"type": "text", "text": "my face is drooping on one side"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "When did it start?"}]}]
    final = list(app.chat_events(lambda h, m: assistant.triage(h, m), "ten minutes ago", earlier))[-1]
    assert final[0][-1]["content"].startswith("🚨")
