"""The output-vocabulary shortlist for fast greedy decoding: the token ids our domain's text uses.

Gemma 3's output matrix has 262,144 rows (168M of the model's 268M parameters); clinical English
uses a small part of them. `assistant.fast_decode` drafts greedy tokens scoring only these rows
and checks every draft against the whole vocabulary, so the shortlist decides speed, never output.

Built from the training split of every task's examples (prompts and targets: IU X-ray reports,
Synthea records and summaries, MedQuAD questions, answers and passages, the prompt templates),
never from held-out text, so its coverage of held-out targets is an honest estimate of how often
a draft falls outside it. The model's end-of-sequence tokens are always in it.

    python -m assistant build-shortlist --out adapters/vocab-shortlist
"""

from __future__ import annotations

import collections
import datetime
import json
from collections.abc import Iterable
from pathlib import Path

import torch

IDS_FILE = "token_ids.safetensors"
META_FILE = "metadata.json"
MIN_COUNT = 1  # a token seen once in our text may be drafted; the check catches the rest


class ShortlistError(ValueError):
    """A shortlist folder that is missing, malformed or made for another tokenizer."""


def training_texts(root: Path | None = None) -> Iterable[str]:
    """Every training example's prompt and target, task by task (held-out splits never)."""
    from .train_data import build_examples

    for task in ("report", "summary", "educate"):
        for example in build_examples(task, "lora", root=root):
            yield example.prompt
            yield example.target


def held_out_targets(root: Path | None = None) -> Iterable[str]:
    """The held-out targets the coverage figure is measured on."""
    from .train_data import report_examples
    from .train_data_text import educate_examples, summary_examples

    for examples in (report_examples("test", root=root), summary_examples("test", root), educate_examples("test", root)):
        for example in examples:
            yield example.target


def token_counts(tokenizer, texts: Iterable[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return counts


def build(tokenizer, vocab_size: int, eos_ids: Iterable[int], root: Path | None = None,
          min_count: int = MIN_COUNT) -> tuple[torch.Tensor, dict]:
    """(sorted token ids, metadata with counts and held-out coverage) for a model whose output
    matrix has `vocab_size` rows."""
    counts = token_counts(tokenizer, training_texts(root))
    ids = sorted({token for token, count in counts.items() if count >= min_count} | set(eos_ids))
    held_out = token_counts(tokenizer, held_out_targets(root))
    chosen = set(ids)
    covered = sum(count for token, count in held_out.items() if token in chosen)
    meta = {
        "purpose": "output rows scored by fast greedy drafting (assistant.fast_decode); every draft is "
                   "checked against the whole vocabulary, so this list changes speed, never output",
        "tokens": len(ids), "vocab_size": vocab_size,
        "training_token_occurrences": sum(counts.values()), "min_count": min_count,
        "data": "training split of every task (IU X-ray reports, Synthea records and summaries, MedQuAD "
                "questions, answers and passages; prompts and targets)",
        "held_out_coverage": {"target_tokens": sum(held_out.values()), "in_shortlist": covered,
                              "fraction": round(covered / max(1, sum(held_out.values())), 5)},
        "eos_ids": sorted(set(eos_ids)), "command": "python -m assistant build-shortlist --out adapters/vocab-shortlist",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return torch.tensor(ids, dtype=torch.int32), meta


def save(folder: Path, ids: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids}, str(folder / IDS_FILE))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load(folder: Path, vocab_size: int) -> torch.Tensor:
    """The shortlist's token ids, refused (ShortlistError) when they cannot belong to a tokenizer
    of `vocab_size` tokens."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / IDS_FILE
    if not path.is_file():
        raise ShortlistError(f"no vocabulary shortlist at {path}")
    try:
        ids = load_file(str(path)).get("ids")
        meta = json.loads((Path(folder) / META_FILE).read_text())
    except (SafetensorError, OSError, ValueError) as err:
        raise ShortlistError(f"unreadable vocabulary shortlist {folder}: {err}") from err
    if ids is None or ids.ndim != 1 or not len(ids):
        raise ShortlistError(f"vocabulary shortlist {folder} holds no token ids")
    if meta.get("vocab_size") != vocab_size or int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise ShortlistError(f"vocabulary shortlist {folder} was built for a vocabulary of "
                             f"{meta.get('vocab_size')} tokens, not this model's {vocab_size}")
    return ids.to(torch.long)
