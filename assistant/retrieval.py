"""Similar prior cases: a case index searched by image, by report text, or both.

A case is one study: an image embedding (the vision encoder's pooled, L2-normalised vector; absent
for text-only cases), a text embedding of its report (MiniLM, 384-d), the report text after
`phi.mask_phi`, CheXpert-style finding labels (`labeler.label_report`) and whitelisted,
de-identified metadata. Embedding models never load here: callers pass vectors (or, in
`retrieval_sources`, embedding callables), so this module needs only numpy and faiss.

Scores are cosine similarities (inner products of unit vectors). With both a text and an image
query, the fused score is a weighted sum, ``w_text * cos_text + w_image * cos_image`` with the
weights (default 0.5 / 0.5) renormalised over the modalities the query and the index both have;
a case lacking one of them scores 0 for it (conservative: unknown is not similar). Candidates are
the union of each modality's top max(4k, 50); their other-modality scores are computed exactly.
Results below `min_similarity` are dropped, and when none remain the result says that no close
prior case was found instead of showing weak matches.

Scaling: `retrieval_store` picks exact flat search for small indexes and HNSW from 20k cases
(IVF-PQ by flag), measured in benchmarks/retrieval.py. When one machine is no longer enough
(replication, filtering by site or date, tens of millions of cases), the same interface is served
by `QdrantCaseStore` (assistant.retrieval_qdrant): local mode (`path=`) for tests and single
hosts, a Qdrant server or cluster (`url=`) for distributed deployments, chosen by
`RetrievalConfig.backend`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .retrieval_cases import (
    MODALITIES, SAFE_METADATA_KEYS, Case, CaseStoreBase, EmbedderSpec, IndexSpec, RetrievalConfig, SearchResults,
    SimilarCase, _Record,
)
from .retrieval_io import CaseIndexError, read_jsonl, read_manifest, verified_files, write_folder, write_jsonl
from .retrieval_store import StoreParams, grow_if_needed, load_store, new_store

__all__ = ["CaseIndexError", "EmbedderSpec", "IndexSpec", "Case", "SimilarCase", "SearchResults", "CaseIndex",
           "RetrievalConfig", "format_similar_cases", "rag_context", "SAFE_METADATA_KEYS", "open_case_store",
           "create_case_store"]

FORMAT, FORMAT_VERSION = "clinical-assistant/case-index", 1
BUILD_HINT = "build one with `python -m assistant index build --out DIR`"


class CaseIndex(CaseStoreBase):
    """The FAISS case index: in memory, saved atomically to a folder (see retrieval_io)."""

    def __init__(self, spec: IndexSpec):
        if spec.text is None and spec.image is None:
            raise ValueError("an index needs a text or an image embedder spec")
        self.spec = spec
        self.stores = {m: new_store(s.dim, spec.store) for m in MODALITIES if (s := spec.modality(m))}
        self.records: dict[int, _Record] = {}
        self.by_case: dict[str, int] = {}
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.records)

    def _new_id(self, case_id: str) -> int:
        self.next_id += 1  # ids are never reused, so a tombstoned HNSW id cannot come back
        return self.next_id - 1

    def _lookup(self, case_ids: Sequence[str]) -> dict[str, int]:
        return {c: self.by_case[c] for c in case_ids if c in self.by_case}

    def _insert(self, records: list[_Record], vectors: dict[str, tuple[list[int], np.ndarray]]) -> None:
        for name, (ids, array) in vectors.items():
            if not len(self.stores[name]):  # an empty store may pick its kind for the batch size (auto)
                self.stores[name] = new_store(array.shape[1], self.spec.store, expected_size=len(ids))
            self.stores[name].add(ids, array)
            self.stores[name] = grow_if_needed(self.stores[name], self.spec.store)
        for record in records:
            self.records[record.vid] = record
            self.by_case[record.case_id] = record.vid

    def _remove(self, vids: list[int]) -> None:
        for name, store in self.stores.items():
            store.remove([v for v in vids if name in self.records[v].modalities])
        for vid in vids:
            del self.by_case[self.records.pop(vid).case_id]

    def _modal_count(self, name: str) -> int:
        return len(self.stores[name]) if name in self.stores else 0

    def _modal_search(self, name: str, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        scores, ids = self.stores[name].search(query[None, :], k)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def _modal_similarities(self, name: str, query: np.ndarray, vids: list[int]) -> dict[int, float]:
        have = [v for v in vids if name in self.records[v].modalities]
        return dict(zip(have, (self.stores[name].vectors(have) @ query).tolist())) if have else {}

    def _records(self, vids: list[int]) -> dict[int, _Record]:
        return {v: self.records[v] for v in vids}

    def save(self, folder: str | Path) -> Path:
        """Atomically replace the index at `folder` (manifest last; old generations removed)."""
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": "faiss",
                    "spec": _spec_to_dict(self.spec), "next_id": self.next_id, "count": len(self),
                    "stores": {m: s.meta() for m, s in self.stores.items()}}
        writers = {m: (lambda prefix, s=s: s.save(prefix)) for m, s in self.stores.items()}
        writers["cases"] = lambda prefix: {"cases": write_jsonl(prefix.with_suffix(".jsonl"),
                                                                (r.row() for r in self.records.values()))}
        return write_folder(folder, manifest, writers)

    @classmethod
    def load(cls, folder: str | Path, text: EmbedderSpec | None = None, image: EmbedderSpec | None = None,
             verify: bool = True) -> "CaseIndex":
        """Load and check an index; `text`/`image` name the embedders the caller will query with."""
        manifest = read_manifest(folder, FORMAT, FORMAT_VERSION, BUILD_HINT)
        if manifest.get("backend", "faiss") != "faiss":
            raise CaseIndexError(f"{folder} holds a {manifest.get('backend')} store: open it with open_case_store")
        try:
            spec = _spec_from_dict(manifest["spec"])
            index = cls(spec)
            index.next_id = int(manifest["next_id"])
        except (KeyError, TypeError, ValueError) as err:
            raise CaseIndexError(f"{folder}/manifest.json is incomplete or invalid ({err}): "
                                 "rebuild the index") from None
        index.check_embedders(text, image)
        files = verified_files(folder, manifest, verify)
        for name in list(index.stores):
            meta = manifest["stores"].get(name, {})
            try:
                index.stores[name] = load_store(meta.get("kind", ""), spec.modality(name).dim, spec.store,
                                                files[name], meta)
            except (RuntimeError, ValueError, KeyError) as err:
                raise CaseIndexError(f"the {name} index in {folder} cannot be read ({str(err).splitlines()[0][:120]}): "
                                     "rebuild the index") from None
        index._load_records(read_jsonl(files["cases"]["cases"]), folder)
        return index

    def _load_records(self, rows: list[dict], folder) -> None:
        try:
            for row in rows:
                record = _Record(int(row["id"]), row["case_id"], row["report"], row["labels"], row["metadata"],
                                 tuple(row["modalities"]))
                self.records[record.vid], self.by_case[record.case_id] = record, record.vid
        except (KeyError, TypeError, ValueError):
            raise CaseIndexError(f"the cases file in {folder} has malformed rows: rebuild the index") from None
        for name, store in self.stores.items():
            expected = sum(name in r.modalities for r in self.records.values())
            if len(store) != expected:
                raise CaseIndexError(f"{folder} is inconsistent: {len(store)} {name} vectors for {expected} cases; "
                                     "rebuild the index")


def create_case_store(spec: IndexSpec, config: RetrievalConfig = RetrievalConfig()):
    """An empty case store on the configured backend (a faiss CaseIndex unless config says qdrant)."""
    if config.backend == "qdrant":
        from .retrieval_qdrant import QdrantCaseStore

        if not config.location:
            raise ValueError("the qdrant backend needs a location: a folder, ':memory:' or a server URL")
        return QdrantCaseStore.create(spec, config.location, config.collection)
    return CaseIndex(spec)


def open_case_store(folder: str | Path, text: EmbedderSpec | None = None, image: EmbedderSpec | None = None):
    """Open the index at `folder` on whichever backend built it (manifest.json says which)."""
    manifest = read_manifest(folder, FORMAT, FORMAT_VERSION, BUILD_HINT)
    if manifest.get("backend") == "qdrant":
        from .retrieval_qdrant import QdrantCaseStore

        store = QdrantCaseStore.open(str(folder))
        try:
            store.check_embedders(text, image)
        except CaseIndexError:
            store.close()  # local mode holds a folder lock until closed
            raise
        return store
    return CaseIndex.load(folder, text, image)


def _spec_to_dict(spec: IndexSpec) -> dict:
    return {"text": vars(spec.text) if spec.text else None, "image": vars(spec.image) if spec.image else None,
            "store": vars(spec.store), "min_similarity": spec.min_similarity, "text_weight": spec.text_weight}


def _spec_from_dict(data: dict) -> IndexSpec:
    emb = {m: EmbedderSpec(**data[m]) if data.get(m) else None for m in MODALITIES}
    return IndexSpec(emb["text"], emb["image"], StoreParams(**data["store"]), float(data["min_similarity"]),
                     float(data["text_weight"]))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_similar_cases(results: SearchResults | Sequence[SimilarCase]) -> str:
    """Markdown table of similar cases for the app, or the 'no close prior case' sentence."""
    cases = list(results)
    if not cases:
        return results.message if isinstance(results, SearchResults) else "No close prior case found."
    lines = ["| # | Case | Similarity | Key findings | Report excerpt |", "|---|---|---|---|---|"]
    for rank, case in enumerate(cases, 1):
        findings = ", ".join(case.findings) or "—"
        lines.append(f"| {rank} | {_cell(case.case_id)} | {case.similarity:.2f} | {_cell(findings)} "
                     f"| {_cell(case.snippet)} |")
    lines.append("\n*Prior cases retrieved by similarity, for reference only; they are not a diagnosis.*")
    return "\n".join(lines)


def rag_context(results: SearchResults | Sequence[SimilarCase], max_chars: int = 1500) -> str:
    """Retrieved prior reports as context for the drafting prompt, at most `max_chars` long.

    Retrieval-augmented drafting is optional: the caller decides with its own switch (a UI toggle
    or config flag) whether to call this and put the text in the prompt. Reports are already
    PHI-masked; '' when there is nothing close enough to use. Reports indexed from a user's
    folder are untrusted text: give them the same prompt-injection treatment as user input.
    """
    cases = list(results)
    if not cases or max_chars <= 0:
        return ""
    header = "Similar prior reports (retrieved by similarity; they describe other patients):"
    parts, used = [header], len(header)
    for rank, case in enumerate(cases, 1):
        entry = f"[{rank}] (similarity {case.similarity:.2f}) {' '.join(case.report.split())}"
        room = max_chars - used - 1
        if room < 40:
            break
        if len(entry) > room:
            entry = entry[:room - 1].rsplit(" ", 1)[0] + "…"
        parts.append(entry)
        used += len(entry) + 1
    return "\n".join(parts) if len(parts) > 1 else ""
