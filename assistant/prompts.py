"""Prompt templates: one markdown file per task in the top-level `prompts/` folder.

A template is the file's text with its leading `<!-- ... -->` comment (notes for reviewers) removed.
User-supplied text is sanitised before it is placed into a template: it can neither add image
placeholders nor reserved control tokens.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_COMMENT = re.compile(r"\A\s*<!--.*?-->\s*", re.DOTALL)
# Angle-bracket control tokens (<image>, <unused0>, <start_of_turn>, <bos> ...) never come from users.
_CONTROL_TOKEN = re.compile(r"<\s*/?\s*[A-Za-z_][A-Za-z0-9_|]*\s*>")
MAX_FIELD_CHARS = 2000


class PromptError(ValueError):
    """A missing or malformed prompt template."""


def prompts_dir() -> Path:
    env = os.environ.get("ASSISTANT_PROMPTS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "prompts"


def load_template(name: str) -> str:
    path = prompts_dir() / f"{name}.md"
    if not path.is_file():
        raise PromptError(f"prompt template {name!r} not found in {prompts_dir()}")
    return _COMMENT.sub("", path.read_text(encoding="utf-8"), count=1)


def sanitise_field(text: str | None, max_chars: int = MAX_FIELD_CHARS) -> str:
    """User text as plain, single-spaced text without control tokens, capped in length."""
    cleaned = _CONTROL_TOKEN.sub(" ", text or "")
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    return cleaned[:max_chars]


def sanitise_multiline(text: str | None, max_chars: int) -> str:
    """Like sanitise_field but keeps line structure (records and notes are line-oriented)."""
    lines = [re.sub(r"[ \t]+", " ", _CONTROL_TOKEN.sub(" ", line)).strip() for line in (text or "").splitlines()]
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return cleaned[:max_chars]


def render(name: str, **fields: str) -> str:
    template = load_template(name)
    try:
        return template.format(**fields)
    except KeyError as err:
        raise PromptError(f"prompt template {name!r} needs field {err.args[0]!r}") from err
