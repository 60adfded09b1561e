"""Turning chat history into completion-style prompts, and trimming the model's turn.

The default base model is not instruction-tuned, so chat modes use dialogue transcripts
("Patient: ... / Nurse: ...") that the model continues; generation stops at the next speaker.
Every turn is PHI-masked and stripped of control tokens before it can reach a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from .phi import mask_phi
from .prompts import sanitise_field

MAX_TURNS = 6  # recent turns kept in the prompt: enough context, bounded prefill on a CPU
MAX_TURN_CHARS = 1200


def message_text(content) -> str:
    """The text of a chat message whose content is a string or a list of parts
    ([{"type": "text", "text": ...}, ...] as Gradio and OpenAI-style clients send it)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, (list, tuple)):
        return "\n".join(part.get("text", "") for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def as_text_turns(history: Sequence[dict]) -> list[dict]:
    """History as [{"role", "content": str}], dropping turns that carry no text (files, images)."""
    turns = []
    for turn in history or []:
        text = message_text(turn.get("content")) if isinstance(turn, dict) else ""
        if text and turn.get("role") in {"user", "assistant"}:
            turns.append({"role": turn["role"], "content": text})
    return turns


def clean_user_text(text: str, max_chars: int = MAX_TURN_CHARS) -> str:
    return sanitise_field(mask_phi(text or ""), max_chars=max_chars)


def render_history(history: Sequence[dict], user_label: str, assistant_label: str) -> str:
    """Recent turns as 'Label: text' lines; assistant turns lose banners and labels first."""
    lines = []
    for turn in as_text_turns(history)[-MAX_TURNS:]:  # files and images do not enter text prompts
        label = user_label if turn["role"] == "user" else assistant_label
        lines.append(f"{label}: {clean_user_text(_strip_safety_text(turn['content']))}")
    return "\n".join(lines)


def user_turns(history: Sequence[dict], message: str) -> str:
    """All the user's words in this conversation: red flags said earlier still count."""
    said = [turn["content"] for turn in as_text_turns(history) if turn["role"] == "user"]
    return "\n".join([*said, message])


def trim_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(stop) for stop in stops if stop in text), default=len(text))
    return text[:cut].strip()


def _strip_safety_text(content: str) -> str:
    # Banners and draft labels are ours, not the model's words: keep them out of the transcript.
    from .safety import DRAFT_LABEL

    kept = [line for line in content.splitlines() if DRAFT_LABEL not in line and not line.startswith(("🚨", "⚠️"))]
    return " ".join(kept)
