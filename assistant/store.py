"""Crash-safe storage of chat sessions, report drafts and clinician-accepted reports (SQLite, WAL).

Privacy contract: the store keeps exactly what the caller passes, so callers must pass
de-identified text only (`assistant.phi.mask_phi` on anything a user typed or a model wrote, and
`Scan.study_key` pseudonyms, never a raw DICOM UID). `study_key` is checked to be UID-shaped so a
name or an accession number cannot be stored there by mistake; free text cannot be checked here.

Isolation: every call names the `user`; other users' rows are invisible. Another user's session
or draft raises the same PermissionError as a missing one, so ids cannot be probed.

Durability: WAL journal with `synchronous=FULL`, so every committed transaction survives a SIGKILL
and a power cut. One short-lived connection per operation keeps Gradio's worker threads apart
without sharing a connection across threads; SQLite's own locking (busy timeout) orders writers.
Accepted reports are append-only (enforced by triggers): accepting a draft again adds a version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from assistant.config import data_dir
from assistant.safety import DRAFT_LABEL

__all__ = ["Store", "StoreError", "Session", "Message", "Draft", "AcceptedReport", "ROLES", "report_diff"]

ROLES = ("user", "assistant", "system")
_NOT_YOURS = "no such {what} for this user"
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")
_MAX_USER = 256

# Migration i (1-based) brings the schema from version i-1 to i. Append new tuples; never edit old
# ones: databases in the field have already run them. DDL is transactional in SQLite, so each
# migration lands whole or not at all.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sessions (id INTEGER PRIMARY KEY, user TEXT NOT NULL, mode TEXT NOT NULL,
           title TEXT NOT NULL, created TEXT NOT NULL)""",
        "CREATE INDEX sessions_by_user ON sessions (user, mode, id)",
        """CREATE TABLE messages (id INTEGER PRIMARY KEY,
           session_id INTEGER NOT NULL REFERENCES sessions (id),
           role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
           content TEXT NOT NULL, created TEXT NOT NULL)""",
        "CREATE INDEX messages_by_session ON messages (session_id, id)",
        """CREATE TABLE drafts (id INTEGER PRIMARY KEY, session_id INTEGER REFERENCES sessions (id),
           user TEXT NOT NULL, study_key TEXT, text TEXT NOT NULL, metadata TEXT NOT NULL,
           created TEXT NOT NULL)""",
        "CREATE INDEX drafts_by_user ON drafts (user, id)",
        """CREATE TABLE accepted_reports (id INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE,
           draft_id INTEGER NOT NULL REFERENCES drafts (id), version INTEGER NOT NULL,
           replaces_uid TEXT, user TEXT NOT NULL, accepted_at TEXT NOT NULL,
           draft_text TEXT NOT NULL, final_text TEXT NOT NULL, diff TEXT NOT NULL,
           study_key TEXT, metadata TEXT NOT NULL, UNIQUE (draft_id, version))""",
        "CREATE INDEX accepted_by_user ON accepted_reports (user, id)",
        # The audit trail of what a clinician signed must not be rewritten in place.
        """CREATE TRIGGER accepted_reports_no_update BEFORE UPDATE ON accepted_reports
           BEGIN SELECT RAISE(ABORT, 'accepted reports are append-only'); END""",
        """CREATE TRIGGER accepted_reports_no_delete BEFORE DELETE ON accepted_reports
           BEGIN SELECT RAISE(ABORT, 'accepted reports are append-only'); END""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, no WAL support, corrupt file)."""


@dataclass(frozen=True)
class Session:
    id: int
    user: str
    mode: str  # "report", "chat", "triage", ...: free text so new modes need no migration
    title: str
    created: str  # UTC ISO 8601, like every timestamp here


@dataclass(frozen=True)
class Message:
    id: int
    session_id: int
    role: str  # one of ROLES
    content: str
    created: str


@dataclass(frozen=True)
class Draft:
    id: int
    session_id: int | None
    user: str
    study_key: str | None  # pseudonymised StudyInstanceUID ("2.25.<int>")
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created: str = ""


@dataclass(frozen=True)
class AcceptedReport:
    """One accepted version of a draft: what the clinician signed, and how it differs from the AI."""
    id: int
    uid: str  # UUID: stable identity for exports (FHIR id, DICOM UIDs are derived from it)
    draft_id: int
    version: int  # 1 for the first acceptance of a draft, then 2, 3, ...
    replaces_uid: str | None  # uid of the previous version, None for version 1
    user: str  # who accepted it
    accepted_at: str  # UTC ISO 8601
    draft_text: str  # the AI draft without the draft label
    final_text: str
    diff: str  # unified diff draft -> final
    study_key: str | None
    metadata: dict[str, Any] = field(default_factory=dict)  # see export.draft_metadata


def report_diff(draft: str, final: str) -> str:
    """Unified diff of the AI draft against the accepted text ("" when unchanged)."""
    lines = difflib.unified_diff(draft.splitlines(), final.splitlines(), "ai-draft", "accepted",
                                 lineterm="")
    return "\n".join(lines)


class Store:
    """Sessions, messages, drafts and accepted reports in one SQLite file.

    Nothing touches the disk until the first call (no I/O in constructors); `Store.open` does the
    first connection eagerly so start-up fails early on an unwritable data directory.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else data_dir() / "assistant.db"
        self.timeout = timeout  # seconds a writer waits for another writer's lock
        self._init_lock = threading.Lock()
        self._ready = False

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "Store":
        store = cls(path)
        store._ensure_ready()
        return store

    # ------------------------------------------------------------------ connections

    def _ensure_ready(self) -> None:
        with self._init_lock:
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            created = not self.path.exists()
            conn = self._connect()
            try:
                # WAL is a property of the file: set once, every later connection inherits it.
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"the database file system does not support WAL (mode {mode})")
                _migrate(conn)
            finally:
                conn.close()
            if created:
                os.chmod(self.path, 0o600)  # clinical text, even de-identified, is not world-readable
            self._ready = True

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun explicitly, never implicitly by the module.
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # per connection: fsync the WAL on every commit
        return conn

    @contextlib.contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection. Writes take the lock up front (IMMEDIATE) so
        read-then-write sequences (ownership checks, version numbers) cannot interleave with another
        writer; reads get one consistent snapshot."""
        self._ensure_ready()
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check`: "ok" for a sound file."""
        with self._transaction() as conn:
            return "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))

    def schema_version(self) -> int:
        with self._transaction() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # ------------------------------------------------------------------ sessions and messages

    def create_session(self, user: str, mode: str, title: str = "") -> int:
        user = _check_user(user)
        if not isinstance(mode, str) or not mode.strip():
            raise ValueError("mode must be a non-empty string")
        with self._transaction(write=True) as conn:
            cursor = conn.execute("INSERT INTO sessions (user, mode, title, created) VALUES (?, ?, ?, ?)",
                                  (user, mode.strip(), str(title or ""), _now()))
            return int(cursor.lastrowid)

    def add_message(self, session_id: int, user: str, role: str, content: str) -> int:
        user = _check_user(user)
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if not isinstance(content, str):
            raise TypeError("message content must be a str")
        with self._transaction(write=True) as conn:
            _require_session(conn, session_id, user)
            cursor = conn.execute("INSERT INTO messages (session_id, role, content, created) "
                                  "VALUES (?, ?, ?, ?)", (session_id, role, content, _now()))
            return int(cursor.lastrowid)

    def sessions(self, user: str, mode: str | None = None) -> list[Session]:
        """The user's sessions, newest first (optionally only one mode)."""
        user = _check_user(user)
        where, args = ("user = ?", (user,)) if mode is None else \
            ("user = ? AND mode = ?", (user, mode))
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT * FROM sessions WHERE {where} ORDER BY id DESC", args)
            return [Session(**dict(row)) for row in rows]

    def messages(self, session_id: int, user: str) -> list[Message]:
        """A session's messages in order; PermissionError if the session is not the user's."""
        user = _check_user(user)
        with self._transaction() as conn:
            _require_session(conn, session_id, user)
            rows = conn.execute("SELECT id, session_id, role, content, created FROM messages "
                                "WHERE session_id = ? ORDER BY id", (session_id,))
            return [Message(**dict(row)) for row in rows]

    # ------------------------------------------------------------------ drafts and reports

    def save_draft(self, session_id: int | None, user: str, text: str, *,
                   study_key: str | None = None, metadata: dict[str, Any] | None = None) -> int:
        """Keep an AI draft (masked text; `study_key` = `Scan.study_key`). Returns the draft id."""
        user = _check_user(user)
        if not isinstance(text, str):
            raise TypeError("draft text must be a str")
        meta, study_key = _dump_metadata(metadata), _check_study_key(study_key)
        with self._transaction(write=True) as conn:
            if session_id is not None:
                _require_session(conn, session_id, user)
            cursor = conn.execute(
                "INSERT INTO drafts (session_id, user, study_key, text, metadata, created) "
                "VALUES (?, ?, ?, ?, ?, ?)", (session_id, user, study_key, text, meta, _now()))
            return int(cursor.lastrowid)

    def get_draft(self, draft_id: int, user: str) -> Draft | None:
        """The user's draft, or None if it does not exist or belongs to someone else."""
        user = _check_user(user)
        with self._transaction() as conn:
            row = _owned_draft(conn, draft_id, user)
        return None if row is None else Draft(**{**dict(row), "metadata": json.loads(row["metadata"])})

    def accept_report(self, draft_id: int, user: str, final_text: str) -> AcceptedReport:
        """Record the clinician's accepted text for their draft, as a new version.

        The draft label is removed (an accepted report is no longer a draft); empty text is refused,
        as is accepting another user's draft. Returns only after the commit is on disk.
        """
        user = _check_user(user)
        final = _strip_label(final_text)
        if not final:
            raise ValueError("the accepted report text is empty")
        with self._transaction(write=True) as conn:
            draft = _owned_draft(conn, draft_id, user)
            if draft is None:
                raise PermissionError(_NOT_YOURS.format(what="draft"))
            previous = conn.execute("SELECT version, uid FROM accepted_reports WHERE draft_id = ? "
                                    "ORDER BY version DESC LIMIT 1", (draft_id,)).fetchone()
            draft_text = _strip_label(draft["text"])
            report = AcceptedReport(
                id=0, uid=str(uuid.uuid4()), draft_id=draft_id,
                version=previous["version"] + 1 if previous else 1,
                replaces_uid=previous["uid"] if previous else None, user=user, accepted_at=_now(),
                draft_text=draft_text, final_text=final, diff=report_diff(draft_text, final),
                study_key=draft["study_key"], metadata=json.loads(draft["metadata"]))
            row = dataclasses.asdict(report)
            row.pop("id")
            row["metadata"] = draft["metadata"]
            columns = ", ".join(row)
            cursor = conn.execute(f"INSERT INTO accepted_reports ({columns}) VALUES "
                                  f"({', '.join('?' * len(row))})", tuple(row.values()))
            return dataclasses.replace(report, id=int(cursor.lastrowid))

    def accepted_reports(self, user: str, *, draft_id: int | None = None) -> list[AcceptedReport]:
        """The user's accepted reports (every version), oldest first."""
        user = _check_user(user)
        where, args = ("user = ?", (user,)) if draft_id is None else \
            ("user = ? AND draft_id = ?", (user, draft_id))
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT * FROM accepted_reports WHERE {where} ORDER BY id", args)
            return [_accepted(row) for row in rows]

    def get_accepted(self, report_id: int, user: str) -> AcceptedReport | None:
        """One accepted report, or None if it does not exist or belongs to someone else."""
        user = _check_user(user)
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM accepted_reports WHERE id = ? AND user = ?",
                               (report_id, user)).fetchone()
        return None if row is None else _accepted(row)


# ---------------------------------------------------------------------- helpers


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file must not both migrate
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                     "(version INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(f"the database has schema version {current}, newer than this code "
                             f"({SCHEMA_VERSION}); upgrade the assistant")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version, _now()))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _require_session(conn: sqlite3.Connection, session_id: int, user: str) -> None:
    row = conn.execute("SELECT 1 FROM sessions WHERE id = ? AND user = ?", (session_id, user)).fetchone()
    if row is None:
        raise PermissionError(_NOT_YOURS.format(what="session"))


def _owned_draft(conn: sqlite3.Connection, draft_id: int, user: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM drafts WHERE id = ? AND user = ?", (draft_id, user)).fetchone()


def _accepted(row: sqlite3.Row) -> AcceptedReport:
    return AcceptedReport(**{**dict(row), "metadata": json.loads(row["metadata"])})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_user(user: str) -> str:
    if not isinstance(user, str) or not user.strip():
        raise ValueError("a user name is required")
    if len(user) > _MAX_USER:
        raise ValueError(f"user name longer than {_MAX_USER} characters")
    return user.strip()


def _check_study_key(study_key: str | None) -> str | None:
    # A UID shape rejects names, accession numbers and dates passed here by mistake.
    if study_key is not None and (not isinstance(study_key, str) or len(study_key) > 64
                                  or not _UID.fullmatch(study_key)):
        raise ValueError("study_key must be a pseudonymised UID such as Scan.study_key")
    return study_key


def _dump_metadata(metadata: dict[str, Any] | None) -> str:
    if not isinstance(metadata or {}, dict):
        raise TypeError("metadata must be a dict")
    return json.dumps(metadata or {}, sort_keys=True, allow_nan=False)  # TypeError if not JSON


def _strip_label(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError("report text must be a str")
    return text.replace(DRAFT_LABEL, "").strip()
