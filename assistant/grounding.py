"""Traceability: link each statement of a generated summary to the source sentence that supports it.

Lexical, deterministic and explainable: a statement is supported when enough of its content words
occur in one source sentence. Unsupported statements are flagged for the clinician instead of
being silently shown as fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*")
_STOP = frozenset("""a an and are as at be by for from has have in is it of on or the to was were with
    this that these those patient pt his her their no not none""".split())
SUPPORT_THRESHOLD = 0.6  # share of a statement's content words found in one source sentence


@dataclass(frozen=True)
class Grounding:
    statement: str
    source: str | None  # the best supporting source sentence, None if unsupported
    line: int | None  # 1-based line of that sentence in the source text
    score: float


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1}


def source_sentences(source: str) -> list[tuple[int, str]]:
    out = []
    for number, line in enumerate(source.splitlines(), start=1):
        out += [(number, part.strip()) for part in re.split(r"(?<=[.;])\s+", line) if part.strip()]
    return out


def ground(statement: str, sentences: list[tuple[int, str]]) -> Grounding:
    words = content_words(statement)
    if not words:
        return Grounding(statement, None, None, 0.0)
    best = max(sentences, key=lambda item: len(words & content_words(item[1])), default=None)
    score = len(words & content_words(best[1])) / len(words) if best else 0.0
    if best is None or score < SUPPORT_THRESHOLD:
        return Grounding(statement, None, None, score)
    return Grounding(statement, best[1], best[0], score)


def ground_summary(summary: str, source: str) -> list[Grounding]:
    """One Grounding per non-heading line of the summary."""
    sentences = source_sentences(source)
    statements = [line.strip(" -*•\t") for line in summary.splitlines()]
    return [ground(s, sentences) for s in statements if s and not s.rstrip().endswith(":")]


def annotate(summary: str, source: str) -> str:
    """The summary followed by a 'Source check' list: each statement with its source line or a flag."""
    checks = ground_summary(summary, source)
    if not checks:
        return summary
    lines = [summary.rstrip(), "", "Source check:"]
    for check in checks:
        where = f"source line {check.line}" if check.line else "⚠️ not found in the source: verify"
        lines.append(f"- {check.statement[:80]} → {where}")
    return "\n".join(lines)
