"""Sign-in: a users file with scrypt-hashed passwords (never plain text), checked in constant time.

File format (JSON): {"users": {"alice": {"salt": hex, "hash": hex, "n": 16384, "r": 8, "p": 1}}}.
Location: `--users FILE` or ASSISTANT_USERS_FILE. Manage it with `python -m assistant users add NAME`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from pathlib import Path

SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # ~16 MB and ~50 ms per check: slows guessing, not sign-in
_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8


class AuthError(ValueError):
    """A bad users file, user name or password (one line, actionable)."""


def users_file_from_env() -> Path | None:
    env = os.environ.get("ASSISTANT_USERS_FILE")
    return Path(env) if env else None


def load_users(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(Path(path).read_text())
        users = data["users"]
    except FileNotFoundError as err:
        raise AuthError(f"users file {str(path)!r} does not exist: create it with `python -m assistant users add NAME`") from err
    except (ValueError, KeyError, TypeError) as err:
        raise AuthError(f"users file {str(path)!r} is not a valid users file") from err
    if not isinstance(users, dict):
        raise AuthError(f"users file {str(path)!r} is not a valid users file")
    return users


def hash_password(password: str, salt: bytes | None = None) -> dict:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT, dklen=32)
    return {"salt": salt.hex(), "hash": digest.hex(), **SCRYPT}


def verify_password(record: dict, password: str) -> bool:
    try:
        digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(record["salt"]), n=record["n"],
                                r=record["r"], p=record["p"], dklen=32)
        return hmac.compare_digest(digest.hex(), record["hash"])
    except (KeyError, ValueError, TypeError):
        return False


def add_user(path: Path, name: str, password: str) -> None:
    """Add or replace a user, writing the file atomically with owner-only permissions."""
    if not _USERNAME.match(name):
        raise AuthError("user names use letters, digits and _ . @ - (at most 64)")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"passwords need at least {MIN_PASSWORD} characters")
    path = Path(path)
    users = load_users(path) if path.exists() else {}
    users[name] = hash_password(password)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".users-") as handle:
        json.dump({"users": users}, handle, indent=2)
    os.chmod(handle.name, 0o600)
    os.replace(handle.name, path)


class Authenticator:
    """The callable Gradio's `auth=` takes: (username, password) -> bool."""

    def __init__(self, users: dict[str, dict]):
        self.users = users

    @classmethod
    def from_file(cls, path: Path) -> "Authenticator":
        return cls(load_users(path))

    def __call__(self, username: str, password: str) -> bool:
        record = self.users.get(username)
        if record is None:
            verify_password(hash_password("x" * MIN_PASSWORD), password)  # same cost: no user probing by timing
            return False
        return verify_password(record, password)
