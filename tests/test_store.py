"""The SQLite store: round trips, per-user isolation, accepted-report versions, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from assistant.safety import DRAFT_LABEL, label_draft
from assistant.store import SCHEMA_VERSION, Store, StoreError

ROOT = Path(__file__).resolve().parents[1]
STUDY = "2.25.123456789012345678901234567890"
DRAFT = "FINDINGS:\nThe lungs are clear.\n\nIMPRESSION:\nNo acute disease."
FINAL = "FINDINGS:\nThe lungs are clear. Small left effusion.\n\nIMPRESSION:\nSmall left effusion."


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "data" / "assistant.db")


def _draft(store: Store, user: str = "alice", text: str = DRAFT) -> int:
    session = store.create_session(user, "report", "chest x-ray")
    return store.save_draft(session, user, label_draft(text), study_key=STUDY,
                            metadata={"modality": ["CR"], "views": ["PA", "LL"], "model": "tiny"})


def test_constructor_does_no_io_and_open_creates_a_private_wal_database(tmp_path):
    path = tmp_path / "nested" / "assistant.db"
    Store(path)
    assert not path.parent.exists()  # no I/O in constructors
    store = Store.open(path)
    assert path.exists() and (path.stat().st_mode & 0o077) == 0
    assert store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_path_is_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ASSISTANT_DATA_DIR", str(tmp_path))
    assert Store().path == tmp_path / "assistant.db"


def test_session_and_message_round_trip(store):
    session = store.create_session("alice", "chat", "cough question")
    store.add_message(session, "alice", "user", "What does a dry cough mean?")
    store.add_message(session, "alice", "assistant", "Usually a viral infection.")
    [listed] = store.sessions("alice")
    assert (listed.id, listed.user, listed.mode, listed.title) == (session, "alice", "chat", "cough question")
    messages = store.messages(session, "alice")
    assert [(m.role, m.content) for m in messages] == [
        ("user", "What does a dry cough mean?"), ("assistant", "Usually a viral infection.")]
    assert messages[0].created.endswith("+00:00")  # UTC


def test_sessions_filter_by_mode_newest_first(store):
    first = store.create_session("alice", "chat")
    report = store.create_session("alice", "report")
    last = store.create_session("alice", "chat")
    assert [s.id for s in store.sessions("alice")] == [last, report, first]
    assert [s.id for s in store.sessions("alice", mode="chat")] == [last, first]


def test_history_is_isolated_between_users(store):
    alice = store.create_session("alice", "chat", "alice's question")
    store.add_message(alice, "alice", "user", "alice's private question")
    bob = store.create_session("bob", "chat")
    assert [s.id for s in store.sessions("bob")] == [bob]
    with pytest.raises(PermissionError):
        store.messages(alice, "bob")
    with pytest.raises(PermissionError):
        store.add_message(alice, "bob", "user", "injected")
    # A missing session looks exactly like someone else's: ids cannot be probed.
    with pytest.raises(PermissionError, match="no such session for this user"):
        store.messages(9999, "bob")
    assert [m.content for m in store.messages(alice, "alice")] == ["alice's private question"]


def test_drafts_and_reports_are_isolated_between_users(store):
    draft = _draft(store, "alice")
    assert store.get_draft(draft, "bob") is None
    with pytest.raises(PermissionError):
        store.accept_report(draft, "bob", FINAL)
    report = store.accept_report(draft, "alice", FINAL)
    assert store.get_accepted(report.id, "bob") is None
    assert store.accepted_reports("bob") == []
    with pytest.raises(PermissionError):
        store.save_draft(store.sessions("alice")[0].id, "bob", "text")


def test_invalid_input_is_refused(store):
    with pytest.raises(ValueError):
        store.create_session("", "chat")
    with pytest.raises(ValueError):
        store.create_session("alice", " ")
    session = store.create_session("alice", "chat")
    with pytest.raises(ValueError):
        store.add_message(session, "alice", "tool", "x")
    with pytest.raises(ValueError, match="pseudonymised UID"):
        store.save_draft(session, "alice", "text", study_key="DOE^JOHN")  # a name, not a pseudonym
    with pytest.raises(TypeError):
        store.save_draft(session, "alice", "text", metadata={"not json": object()})


def test_draft_accept_stores_text_diff_and_metadata(store):
    draft_id = _draft(store)
    draft = store.get_draft(draft_id, "alice")
    assert draft.text.startswith(DRAFT_LABEL) and draft.study_key == STUDY
    report = store.accept_report(draft_id, "alice", FINAL)
    assert report.version == 1 and report.replaces_uid is None
    assert report.user == "alice" and report.accepted_at.endswith("+00:00")
    assert report.draft_text == DRAFT  # the label marks drafts; it is not part of the report
    assert report.final_text == FINAL and report.study_key == STUDY
    assert "-The lungs are clear.\n+The lungs are clear. Small left effusion." in report.diff
    assert report.metadata["views"] == ["PA", "LL"]
    assert store.get_accepted(report.id, "alice") == report


def test_accepting_again_adds_a_version_and_keeps_history(store):
    draft = _draft(store)
    first = store.accept_report(draft, "alice", FINAL)
    second = store.accept_report(draft, "alice", FINAL + "\nRecommend follow-up.")
    assert (second.version, second.replaces_uid) == (2, first.uid)
    assert [r.final_text for r in store.accepted_reports("alice", draft_id=draft)] == [
        FINAL, FINAL + "\nRecommend follow-up."]
    assert store.get_accepted(first.id, "alice").final_text == FINAL


def test_accepted_reports_are_append_only(store):
    report = store.accept_report(_draft(store), "alice", FINAL)
    with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE accepted_reports SET final_text = 'forged' WHERE id = ?", (report.id,))
    with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM accepted_reports")


@pytest.mark.parametrize("text", ["", "   \n", DRAFT_LABEL, f"{DRAFT_LABEL}\n\n"])
def test_empty_final_text_is_refused(store, text):
    draft = _draft(store)
    with pytest.raises(ValueError, match="empty"):
        store.accept_report(draft, "alice", text)
    assert store.accepted_reports("alice") == []


def test_a_new_store_on_the_same_file_sees_the_history(tmp_path):
    path = tmp_path / "assistant.db"
    first = Store(path)
    session = first.create_session("alice", "chat", "kept")
    first.add_message(session, "alice", "user", "hello")
    report = first.accept_report(_draft(first), "alice", FINAL)
    again = Store(path)
    assert [s.title for s in again.sessions("alice", mode="chat")] == ["kept"]
    assert [m.content for m in again.messages(session, "alice")] == ["hello"]
    assert again.get_accepted(report.id, "alice") == report


def test_a_database_from_newer_code_is_refused(tmp_path):
    path = tmp_path / "assistant.db"
    Store.open(path)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version (version, applied) VALUES (?, 'later')", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer"):
        Store(path).sessions("alice")


def test_concurrent_writers_from_threads(store):
    # Gradio serves requests from worker threads; each call must stand alone.
    sessions = {user: store.create_session(user, "chat") for user in ("a", "b", "c", "d")}
    errors: list[BaseException] = []

    def write(user: str) -> None:
        try:
            for i in range(15):
                store.add_message(sessions[user], user, "user", f"{user}-{i}")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(user,)) for user in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for user, session in sessions.items():
        assert [m.content for m in store.messages(session, user)] == [f"{user}-{i}" for i in range(15)]


_CHILD = textwrap.dedent("""
    import sys
    from assistant.store import Store
    store = Store(sys.argv[1])
    session = store.create_session("alice", "report")
    i = 0
    while True:  # accept, announce, keep writing: the parent kills us somewhere in here
        store.add_message(session, "alice", "user", "x" * 2000)
        draft = store.save_draft(session, "alice", "draft %d" % i, study_key="2.25.42")
        report = store.accept_report(draft, "alice", "final report %d" % i)
        print(report.id, report.final_text, flush=True)
        i += 1
""")


def test_sigkill_loses_no_accepted_report(tmp_path):
    path = tmp_path / "assistant.db"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    accepted: dict[int, str] = {}
    deadline = time.monotonic() + 60
    try:
        while len(accepted) < 25 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            report_id, text = line.rstrip("\n").split(" ", 1)
            accepted[int(report_id)] = text
    finally:
        os.kill(child.pid, signal.SIGKILL)  # mid-way through further writes
        _, stderr = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(accepted) >= 25, stderr

    store = Store(path)
    assert store.integrity_check() == "ok"
    for report_id, text in accepted.items():
        report = store.get_accepted(report_id, "alice")
        assert report is not None and report.final_text == text
        assert report.diff.startswith("--- ai-draft")
    assert len(store.accepted_reports("alice")) >= len(accepted)
