from __future__ import annotations

import json
import stat

import pytest

from assistant.auth import AuthError, Authenticator, add_user, load_users


def test_users_file_holds_only_salted_hashes(tmp_path):
    path = tmp_path / "users.json"
    add_user(path, "alice", "correct horse")
    add_user(path, "bob", "correct horse")
    text = path.read_text()
    assert "correct horse" not in text
    users = json.loads(text)["users"]
    assert users["alice"]["hash"] != users["bob"]["hash"]  # per-user salt
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_authenticator_accepts_only_the_right_password(tmp_path):
    path = tmp_path / "users.json"
    add_user(path, "alice", "correct horse")
    auth = Authenticator.from_file(path)
    assert auth("alice", "correct horse")
    assert not auth("alice", "wrong horse")
    assert not auth("mallory", "correct horse")


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(AuthError, match="at least 8"):
        add_user(tmp_path / "u.json", "alice", "short")
    with pytest.raises(AuthError, match="user names"):
        add_user(tmp_path / "u.json", "al ice", "long enough")
    with pytest.raises(AuthError, match="does not exist"):
        load_users(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AuthError, match="not a valid users file"):
        load_users(tmp_path / "bad.json")


def test_cli_adds_a_user_without_echoing_the_password(tmp_path, monkeypatch, capsys):
    from assistant.cli import main

    monkeypatch.setenv("NEW_PASSWORD", "a long passphrase")
    path = tmp_path / "users.json"
    assert main(["users", "add", "carol", "--file", str(path), "--password-env", "NEW_PASSWORD"]) == 0
    assert Authenticator.from_file(path)("carol", "a long passphrase")
    assert "a long passphrase" not in capsys.readouterr().out
