"""Draft -> accept -> export, chat history and per-user isolation (no model needed)."""

from __future__ import annotations

import json

import pydicom
import pytest

from assistant.dicom import read_scan
from assistant.store import Store
from assistant.workflow import Workflow
from conftest import CHEST_DICOM

DRAFT = "FINDINGS:\nHeart size normal. Lungs clear.\n\nIMPRESSION:\nNo acute disease."


@pytest.fixture
def workflow(tmp_path):
    return Workflow(Store.open(tmp_path / "db.sqlite"), tmp_path / "exports")


@pytest.fixture(scope="module")
def chest():
    return read_scan(CHEST_DICOM)


def test_draft_edit_accept_export_in_every_format(workflow, chest):
    draft_id = workflow.record_draft("alice", [chest], DRAFT)
    report = workflow.accept("alice", draft_id, DRAFT.replace("Lungs clear.", "Small left effusion."))
    assert report.user == "alice" and "+Heart size normal. Small left effusion." in report.diff
    md = workflow.export("alice", report.id, "markdown", [chest]).read_text()
    assert "alice" in md and "Small left effusion" in md
    bundle = json.loads(workflow.export("alice", report.id, "fhir", [chest]).read_text())
    assert bundle["resourceType"] == "Bundle"
    sr = pydicom.dcmread(workflow.export("alice", report.id, "dicom-sr", [chest]))
    assert sr.StudyInstanceUID == chest.study_key


def test_accepting_empty_text_is_refused(workflow, chest):
    draft_id = workflow.record_draft("alice", [chest], DRAFT)
    with pytest.raises(ValueError, match="empty"):
        workflow.accept("alice", draft_id, "   ")


def test_phi_typed_into_the_editor_is_masked_before_storage(workflow, chest):
    draft_id = workflow.record_draft("alice", [chest], DRAFT)
    report = workflow.accept("alice", draft_id, DRAFT + "\nDiscussed with Mr. John Smith, MRN: 55501234.")
    assert "Smith" not in report.final_text and "55501234" not in report.final_text


def test_users_see_only_their_own_history_and_exports(workflow, chest):
    session = workflow.record_turn("alice", "triage", None, "sore throat", "Urgency: routine")
    workflow.record_turn("alice", "triage", session, "and a cough", "ok")
    report = workflow.accept("alice", workflow.record_draft("alice", [chest], DRAFT), DRAFT)
    assert len(workflow.conversation("alice", session)) == 4
    assert {row.kind for row in workflow.history("alice")} == {"conversation", "accepted report"}
    assert workflow.history("bob") == []
    with pytest.raises(PermissionError):
        workflow.conversation("bob", session)
    with pytest.raises(ValueError, match="no such accepted report"):
        workflow.export("bob", report.id, "markdown")


def test_history_survives_a_restart(tmp_path, chest):
    first = Workflow(Store.open(tmp_path / "db.sqlite"), tmp_path / "exports")
    first.record_turn("alice", "educate", None, "what is asthma", "An airway disease.")
    again = Workflow(Store.open(tmp_path / "db.sqlite"), tmp_path / "exports")
    assert [row.title for row in again.history("alice")] == ["what is asthma"]


def test_unknown_export_format_is_a_clear_error(workflow):
    with pytest.raises(ValueError, match="export format"):
        workflow.export("alice", 1, "pdf")
