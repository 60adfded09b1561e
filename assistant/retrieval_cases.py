"""Cases, specs and results of the similar-case index, and the fused search every backend shares.

`CaseStoreBase` holds what does not depend on the vector engine: PHI masking and labelling of
reports on the way in, the metadata whitelist, id bookkeeping rules, and score fusion. Backends
(`retrieval.CaseIndex` on FAISS, `retrieval_qdrant.QdrantCaseStore`) supply a few primitives:
per-modality top-k search, exact similarities for given ids, and record storage.

Fusion: ``w_text * cos_text + w_image * cos_image``, weights (default 0.5 / 0.5) renormalised over
the modalities that the query and the index both have. Candidates are the union of each
modality's top max(4k, 50); their missing per-modality scores are computed exactly, and a case
that lacks a modality scores 0 for it (unknown is not similar). numpy only; no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

import numpy as np

from .labeler import LABELS, label_report
from .phi import mask_phi
from .retrieval_io import CaseIndexError
from .retrieval_store import StoreParams, as_unit_rows

MODALITIES = ("text", "image")
# Metadata that may enter the index. Anything else (names, dates, UIDs, paths) is refused.
SAFE_METADATA_KEYS = frozenset({"source", "split", "modality", "body_part", "view_position", "views",
                                "n_images", "indication", "mesh"})
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class EmbedderSpec:
    """Which model made a modality's vectors; an index refuses queries from any other."""

    name: str
    version: str
    dim: int


@dataclass(frozen=True)
class IndexSpec:
    text: EmbedderSpec | None
    image: EmbedderSpec | None = None
    store: StoreParams = field(default_factory=StoreParams)
    # Below this fused cosine: "no close prior case". 0.6 separates off-topic from chest queries with
    # MiniLM on IU reports (off-topic probes 0.23-0.52, chest probes 0.68-0.88); recalibrate per embedder.
    min_similarity: float = 0.6
    text_weight: float = 0.5  # image weight is 1 - text_weight

    def modality(self, name: str) -> EmbedderSpec | None:
        return self.text if name == "text" else self.image


@dataclass(frozen=True)
class RetrievalConfig:
    """Backend selection. faiss: an index folder. qdrant: `location` is a folder (local mode),
    ":memory:", or an http(s) URL of a Qdrant server/cluster (distributed deployments)."""

    backend: Literal["faiss", "qdrant"] = "faiss"
    location: str | None = None
    collection: str = "cases"
    kind: str = "auto"


@dataclass(frozen=True, eq=False)
class Case:
    """One study to index. `report` is masked on the way in; `labels` default to label_report."""

    case_id: str
    report: str = ""
    text_vector: np.ndarray | None = None
    image_vector: np.ndarray | None = None
    labels: Mapping[str, int | None] | None = None
    metadata: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SimilarCase:
    case_id: str
    similarity: float  # fused cosine score used for ranking
    text_similarity: float | None
    image_similarity: float | None
    snippet: str
    findings: tuple[str, ...]  # positive labels
    report: str
    metadata: Mapping[str, object]


@dataclass(frozen=True)
class SearchResults:
    cases: tuple[SimilarCase, ...]
    threshold: float
    best_similarity: float | None  # best score before thresholding (None: empty index)
    modalities: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def __iter__(self):
        return iter(self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def found(self) -> bool:
        return bool(self.cases)

    @property
    def message(self) -> str:
        if self.cases:
            return f"{len(self.cases)} similar prior case(s) at similarity >= {self.threshold:.2f}"
        if self.best_similarity is None:
            return "No close prior case: the index is empty."
        return (f"No close prior case: the most similar scores {self.best_similarity:.2f}, "
                f"below the {self.threshold:.2f} threshold.")


@dataclass(frozen=True)
class _Record:
    vid: int
    case_id: str
    report: str
    labels: Mapping[str, int | None]
    metadata: Mapping[str, object]
    modalities: tuple[str, ...]

    def row(self) -> dict:
        return {"id": self.vid, "case_id": self.case_id, "report": self.report, "labels": dict(self.labels),
                "metadata": dict(self.metadata), "modalities": list(self.modalities)}


def clean_metadata(metadata: Mapping[str, object]) -> dict:
    """Whitelisted keys only; strings are PHI-masked and capped (they are shown and stored)."""
    out = {}
    for key, value in metadata.items():
        if key not in SAFE_METADATA_KEYS:
            raise ValueError(f"metadata {key!r} may not enter the case index (allowed: "
                             f"{', '.join(sorted(SAFE_METADATA_KEYS))})")
        if isinstance(value, str):
            value = mask_phi(value)[:500]
        elif isinstance(value, (list, tuple)):
            value = [mask_phi(str(v))[:200] for v in value][:50]
        elif value is not None and not isinstance(value, (int, float, bool)):
            raise ValueError(f"metadata {key!r} must be text, a number or a list of text")
        out[key] = value
    return out


def positive_findings(labels: Mapping[str, int | None]) -> tuple[str, ...]:
    # LABELS order, not dict order: a loaded index (JSON keys sorted) lists findings the same way.
    order = [*LABELS, *sorted(set(labels) - set(LABELS))]
    return tuple(name for name in order if labels.get(name) == 1)


def snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "…"


class CaseStoreBase:
    """Case bookkeeping and fused search over per-modality primitives (faiss or Qdrant).

    Subclasses implement: __len__, _new_id(case_id), _lookup(case_ids) -> {case_id: vid},
    _insert(records, vectors), _remove(vids), _modal_count(name), _modal_search(name, q, k),
    _modal_similarities(name, q, vids) (exact, only for vids that have the modality), _records(vids).
    Not thread-safe for writes: serialise add/delete (searches may run concurrently with each other).
    """

    spec: IndexSpec

    def add(self, cases: Iterable[Case], on_duplicate: Literal["error", "skip", "replace"] = "error") -> list[str]:
        """Index cases; returns the ids added. Reports are masked and labelled here, once."""
        cases = list(cases)
        ids = [c.case_id for c in cases]
        if len(set(ids)) != len(ids):
            raise CaseIndexError("the same case id appears twice in one add: ids must be unique")
        existing = self._lookup(ids)
        if existing and on_duplicate == "error":
            raise CaseIndexError(f"{len(existing)} case(s) are already indexed (e.g. {next(iter(existing))}): "
                                 "delete them first or add with on_duplicate='replace' or 'skip'")
        if existing and on_duplicate == "replace":
            self._remove(list(existing.values()))
        cases = [c for c in cases if on_duplicate != "skip" or c.case_id not in existing]
        records, vectors = self._prepare(cases)
        if records:
            self._insert(records, vectors)
        return [r.case_id for r in records]

    def _prepare(self, cases: list[Case]) -> tuple[list[_Record], dict[str, tuple[list[int], np.ndarray]]]:
        records, vecs = [], {m: ([], []) for m in MODALITIES}
        for case in cases:
            if not _CASE_ID.fullmatch(case.case_id) or mask_phi(case.case_id) != case.case_id:
                raise ValueError(f"case id {case.case_id[:40]!r} is not a plain pseudonymous id "
                                 "(letters, digits, . _ : -; no names or dates)")
            vid, present = self._new_id(case.case_id), []
            for name, vector in (("text", case.text_vector), ("image", case.image_vector)):
                if vector is None:
                    continue
                spec = self.spec.modality(name)
                if spec is None:
                    raise CaseIndexError(f"case {case.case_id} has a {name} vector but the index has no "
                                         f"{name} embedder")
                vecs[name][0].append(vid)
                vecs[name][1].append(as_unit_rows(vector, spec.dim, f"{name} vector of case {case.case_id}")[0])
                present.append(name)
            if not present:
                raise ValueError(f"case {case.case_id} has neither a text nor an image vector")
            report = mask_phi(case.report)
            labels = dict(case.labels) if case.labels is not None else label_report(report)
            records.append(_Record(vid, case.case_id, report, labels, clean_metadata(case.metadata), tuple(present)))
        return records, {m: (ids, np.stack(v)) for m, (ids, v) in vecs.items() if ids}

    def delete(self, case_ids: Iterable[str]) -> int:
        """Remove cases; they never come back from a search. Unknown ids are ignored; returns count."""
        found = self._lookup(list(case_ids))
        if found:
            self._remove(list(found.values()))
        return len(found)

    def search(self, *, text_vector: np.ndarray | None = None, image_vector: np.ndarray | None = None,
               k: int = 5, min_similarity: float | None = None, text_weight: float | None = None) -> SearchResults:
        """Top-k similar cases by text, image or both (fused; see the module docstring)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        threshold = self.spec.min_similarity if min_similarity is None else float(min_similarity)
        if not len(self):
            return SearchResults((), threshold, None, (), ("the index is empty",))
        queries, notes = self._queries(text_vector, image_vector)
        weights = self._weights(queries, text_weight)
        scores = self._modal_scores(queries, k)
        candidates = set().union(*scores.values())
        fused = {vid: sum(weights[m] * scores[m].get(vid, 0.0) for m in queries) for vid in candidates}
        records = self._records(list(fused))
        ranked = sorted(fused, key=lambda vid: (-fused[vid], records[vid].case_id))[:k]
        best = fused[ranked[0]] if ranked else None
        hits = tuple(_similar(records[v], fused[v], scores) for v in ranked if fused[v] >= threshold)
        return SearchResults(hits, threshold, best, tuple(queries), tuple(notes))

    def _weights(self, queries: dict, text_weight: float | None) -> dict[str, float]:
        weight = self.spec.text_weight if text_weight is None else float(text_weight)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"text weight must be between 0 and 1, got {weight}")
        weights = {m: (weight if m == "text" else 1.0 - weight) for m in queries}
        total = sum(weights.values())
        # Renormalise over the modalities in use; a zero total (e.g. weight 1 but only an image query)
        # means the one modality present decides alone.
        return {m: (w / total if total > 0 else 1.0 / len(queries)) for m, w in weights.items()}

    def _queries(self, text_vector, image_vector) -> tuple[dict[str, np.ndarray], list[str]]:
        queries, notes = {}, []
        for name, vector in (("text", text_vector), ("image", image_vector)):
            if vector is None:
                continue
            spec = self.spec.modality(name)
            if spec is None or not self._modal_count(name):
                notes.append(f"{name} query ignored: the index holds no {name} embeddings")
                continue
            queries[name] = as_unit_rows(vector, spec.dim, f"{name} query")[0]
        if not queries:
            reason = "; ".join(notes) if notes else "pass a text and/or an image query"
            raise CaseIndexError(f"nothing to search with: {reason}")
        return queries, notes

    def _modal_scores(self, queries: dict[str, np.ndarray], k: int) -> dict[str, dict[int, float]]:
        pool = k if len(queries) == 1 else max(4 * k, 50)
        scores = {m: dict(self._modal_search(m, q, pool)) for m, q in queries.items()}
        candidates = set().union(*scores.values())
        for m, q in queries.items():
            missing = [vid for vid in candidates if vid not in scores[m]]
            if missing:
                scores[m].update(self._modal_similarities(m, q, missing))
        return scores

    def stats(self) -> dict:
        counts = {m: self._modal_count(m) for m in MODALITIES}
        spec = {m: (vars(s) if (s := self.spec.modality(m)) else None) for m in MODALITIES}
        return {"cases": len(self), "vectors": counts, "embedders": spec, "min_similarity": self.spec.min_similarity,
                "text_weight": self.spec.text_weight}

    def check_embedders(self, text: EmbedderSpec | None = None, image: EmbedderSpec | None = None) -> None:
        """Raise CaseIndexError when the query embedders differ from those that built the index."""
        for name, wanted in (("text", text), ("image", image)):
            have = self.spec.modality(name)
            if wanted is not None and have is not None and have != wanted:
                raise CaseIndexError(
                    f"the index's {name} vectors come from {have.name} (version {have.version}, {have.dim}-d) but the "
                    f"query embedder is {wanted.name} (version {wanted.version}, {wanted.dim}-d): use the same "
                    "embedder or rebuild the index")


def _similar(record: _Record, score: float, scores: dict[str, dict[int, float]]) -> SimilarCase:
    per = {m: (float(scores[m][record.vid]) if record.vid in scores.get(m, {}) else None) for m in MODALITIES}
    return SimilarCase(record.case_id, float(score), per["text"], per["image"], snippet(record.report),
                       positive_findings(record.labels), record.report, dict(record.metadata))


