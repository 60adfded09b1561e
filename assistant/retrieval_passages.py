"""Patient-education passages: MedQuAD answers (NIH sources, CC BY 4.0) searchable with citations.

`medquad_split` divides the records by question id (`qid`; a qid can repeat across records and
all of its records go to the same side) with a fixed seed, so an evaluation that asks test
questions never finds its own answer in an index built from `split.train`. Train records whose
answer text equals a test answer are dropped as well, since MedQuAD repeats some answers under
different qids.

Answers are split into passages of at most ~1,200 characters at paragraph or sentence ends
(MiniLM reads 256 word pieces, about 1,000 characters). Each hit carries its source name and URL
for citation. The texts are public consumer-health pages, not patient records, so they are not
PHI-masked (masking would damage eponyms and drug names in them).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .retrieval_io import CaseIndexError, read_jsonl, read_manifest, verified_files, write_folder, write_jsonl
from .retrieval_sources import TextEmbedder, embed_in_batches, shared_data_dir
from .retrieval_store import FlatStore, StoreParams, as_unit_rows, load_store

FORMAT, FORMAT_VERSION = "clinical-assistant/passage-index", 1
MEDQUAD_FILE = "medquad/medquad_qa_with_answers.jsonl.gz"


@dataclass(frozen=True)
class Passage:
    qid: str
    question: str
    focus: str
    source: str
    url: str
    text: str


@dataclass(frozen=True)
class PassageHit:
    passage: Passage
    score: float

    @property
    def citation(self) -> str:
        return f"{self.passage.source}: {self.passage.url}"


@dataclass(frozen=True)
class MedQuADSplit:
    train: tuple[dict, ...]
    test: tuple[dict, ...]
    test_qids: frozenset[str]
    seed: int
    dropped_duplicates: int


def load_medquad(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path else shared_data_dir() / MEDQUAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"MedQuAD not found at {path}: set ASSISTANT_SHARED_DATA to the data folder")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [row for line in handle if line.strip() and (row := json.loads(line)).get("answer", "").strip()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def medquad_split(records: Sequence[dict], test_fraction: float = 0.1, seed: int = 13) -> MedQuADSplit:
    """Deterministic split by qid: a qid is test when sha256(seed:qid) falls below the fraction."""
    def is_test(qid: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction

    test = tuple(r for r in records if is_test(r["qid"]))
    test_answers = {_norm(r["answer"]) for r in test}
    train_all = [r for r in records if not is_test(r["qid"])]
    train = tuple(r for r in train_all if _norm(r["answer"]) not in test_answers)
    return MedQuADSplit(train, test, frozenset(r["qid"] for r in test), seed, len(train_all) - len(train))


def chunk_text(text: str, max_chars: int = 1200) -> list[str]:
    """Paragraph- then sentence-aligned chunks of at most max_chars (a longer sentence is cut)."""
    units = [u for para in re.split(r"\n\s*\n|\n(?=\s*-)", text) for u in re.split(r"(?<=[.!?])\s+", para.strip())]
    chunks, current = [], ""
    for unit in (" ".join(u.split()) for u in units):
        for piece in (unit[i:i + max_chars] for i in range(0, len(unit), max_chars)):
            if current and len(current) + 1 + len(piece) > max_chars:
                chunks.append(current)
                current = ""
            current = f"{current} {piece}".strip()
    return chunks + ([current] if current else [])


def passages_from_records(records: Sequence[dict], max_chars: int = 1200) -> list[Passage]:
    return [Passage(r["qid"], r.get("question", ""), r.get("focus", ""), r.get("source", ""), r.get("url", ""), chunk)
            for r in records for chunk in chunk_text(r["answer"], max_chars)]


class PassageIndex:
    """Exact (flat) inner-product search over passage embeddings; ~20k passages need no ANN."""

    def __init__(self, embedder: str, version: str, dim: int):
        self.embedder, self.version, self.dim = embedder, version, dim
        self.store = FlatStore(dim)
        self.passages: list[Passage] = []

    def __len__(self) -> int:
        return len(self.passages)

    def add(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        vectors = as_unit_rows(vectors, self.dim, "passage vectors")
        if len(vectors) != len(passages):
            raise ValueError(f"{len(passages)} passages but {len(vectors)} vectors")
        start = len(self.passages)
        self.store.add(np.arange(start, start + len(passages)), vectors)
        self.passages.extend(passages)

    @classmethod
    def build(cls, records: Sequence[dict], embed_text: TextEmbedder, embedder: str, version: str,
              batch_size: int = 64) -> "PassageIndex":
        passages = passages_from_records(records)
        vectors = embed_in_batches(embed_text, [p.text for p in passages], batch_size)
        index = cls(embedder, version, vectors.shape[1])
        index.add(passages, vectors)
        return index

    def search(self, query_vector: np.ndarray, k: int = 3, min_similarity: float = 0.0,
               exclude_qids: frozenset[str] = frozenset()) -> list[PassageHit]:
        """Best passages, one per qid (the best chunk of an answer), above min_similarity."""
        query = as_unit_rows(query_vector, self.dim, "passage query")
        scores, ids = self.store.search(query, min(len(self), k * 8 + len(exclude_qids)))
        hits, seen = [], set()
        for score, pid in zip(scores[0], ids[0]):
            passage = self.passages[pid] if pid >= 0 else None
            if passage is None or passage.qid in seen or passage.qid in exclude_qids or score < min_similarity:
                continue
            seen.add(passage.qid)
            hits.append(PassageHit(passage, float(score)))
            if len(hits) == k:
                break
        return hits

    def save(self, folder: str | Path) -> Path:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "embedder": self.embedder,
                    "version": self.version, "dim": self.dim, "count": len(self)}
        writers = {"vectors": lambda prefix: self.store.save(prefix),
                   "passages": lambda prefix: {"passages": write_jsonl(prefix.with_suffix(".jsonl"),
                                                                       (asdict(p) for p in self.passages))}}
        return write_folder(folder, manifest, writers)

    @classmethod
    def load(cls, folder: str | Path, embedder: str | None = None, version: str | None = None) -> "PassageIndex":
        manifest = read_manifest(folder, FORMAT, FORMAT_VERSION, "build it with PassageIndex.build(...).save(DIR)")
        if embedder is not None and (manifest.get("embedder"), manifest.get("version")) != (embedder, version):
            raise CaseIndexError(f"passage index at {folder} was built with {manifest.get('embedder')} "
                                 f"({manifest.get('version')}), not {embedder} ({version}): rebuild it")
        files = verified_files(folder, manifest)
        index = cls(manifest["embedder"], manifest["version"], int(manifest["dim"]))
        try:
            index.store = load_store("flat", index.dim, StoreParams(kind="flat"), files["vectors"], {})
            index.passages = [Passage(**row) for row in read_jsonl(files["passages"]["passages"])]
        except (RuntimeError, TypeError, KeyError) as err:
            raise CaseIndexError(f"passage index at {folder} cannot be read ({err}): rebuild it") from None
        if len(index.store) != len(index.passages):
            raise CaseIndexError(f"passage index at {folder} is inconsistent: rebuild it")
        return index


def passages_context(hits: Sequence[PassageHit], max_chars: int = 1500) -> str:
    """Numbered passages with their sources, for an education prompt that must cite them."""
    parts, used = [], 0
    for n, hit in enumerate(hits, 1):
        entry = f"[{n}] {hit.passage.text} (Source: {hit.citation})"
        if used + len(entry) > max_chars:
            break
        parts.append(entry)
        used += len(entry) + 1
    return "\n".join(parts)
