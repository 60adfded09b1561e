"""`python -m assistant users add NAME`: manage the app's sign-in file."""

from __future__ import annotations

import getpass
import os
from pathlib import Path


def add_commands(commands) -> None:
    users = commands.add_parser("users", help="manage sign-in users of the app (hashed passwords)")
    actions = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a user or change a password")
    add.add_argument("name")
    add.add_argument("--file", default=None, help="users file (default: $ASSISTANT_USERS_FILE)")
    add.add_argument("--password-env", default=None, metavar="VAR",
                     help="read the password from this environment variable instead of prompting")
    add.set_defaults(handler=run_add)


def run_add(args) -> int:
    from .auth import add_user, users_file_from_env

    path = Path(args.file) if args.file else users_file_from_env()
    if path is None:
        raise ValueError("name the users file with --file or ASSISTANT_USERS_FILE")
    password = os.environ.get(args.password_env, "") if args.password_env else getpass.getpass("Password: ")
    add_user(path, args.name, password)
    print(f"user {args.name!r} saved in {path}")
    return 0
