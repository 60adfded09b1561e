"""`QdrantCaseStore`: the case index's interface on Qdrant, for deployments that outgrow one machine.

FAISS (`retrieval.CaseIndex`) is the default: one process, one folder, no server. Move to Qdrant
when the index needs replication or sharding across machines, payload filters (site, modality,
date window), or concurrent writers. Select it with `RetrievalConfig(backend="qdrant",
location=...)`:

- ``location="/path/folder"``: qdrant-client's local mode (embedded, no server; what the tests
  use). The folder also gets our `manifest.json` so `retrieval.open_case_store(folder)` finds it.
- ``location=":memory:"``: local mode in memory.
- ``location="http://qdrant:6333"``: a Qdrant server or cluster (replicas/shards are set on the
  server side: `replication_factor`, `shard_number` at collection creation). The spec is not
  persisted remotely: pass the same `IndexSpec` when opening, and sizes are checked against the
  collection.

Each case is one point: named vectors "text" and/or "image" (cosine distance), payload = the
masked report, labels, whitelisted metadata. Point ids derive from a hash of the case id, so
lookups by case id need no secondary index. Scores match FAISS's (cosine); fusion, thresholds and
PHI handling are shared (`retrieval_cases.CaseStoreBase`). Requires `pip install qdrant-client`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .retrieval_cases import MODALITIES, CaseStoreBase, IndexSpec, _Record
from .retrieval_io import CaseIndexError, read_manifest, write_folder

FORMAT, FORMAT_VERSION = "clinical-assistant/case-index", 1


def _models():
    try:
        from qdrant_client import QdrantClient, models
    except ImportError:
        raise CaseIndexError("the qdrant backend needs qdrant-client: pip install qdrant-client") from None
    return QdrantClient, models


def _client(location: str):
    QdrantClient, _ = _models()
    if location == ":memory:":
        return QdrantClient(":memory:")
    if location.startswith(("http://", "https://")):
        return QdrantClient(url=location)
    return QdrantClient(path=str(Path(location) / "qdrant"))


class QdrantCaseStore(CaseStoreBase):
    def __init__(self, spec: IndexSpec, client, collection: str = "cases", folder: Path | None = None):
        """Wrap an open client (no I/O); use `create` or `open` to get one ready."""
        self.spec, self.client, self.collection, self.folder = spec, client, collection, folder

    @classmethod
    def create(cls, spec: IndexSpec, location: str, collection: str = "cases") -> "QdrantCaseStore":
        _, models = _models()
        store = cls(spec, _client(location), collection, _folder(location))
        if store.client.collection_exists(collection):
            raise CaseIndexError(f"collection {collection!r} already exists at {location}: open it or pick another")
        vectors = {m: models.VectorParams(size=s.dim, distance=models.Distance.COSINE)
                   for m in MODALITIES if (s := spec.modality(m))}
        store.client.create_collection(collection, vectors_config=vectors)
        store.save()
        return store

    @classmethod
    def open(cls, location: str, spec: IndexSpec | None = None, collection: str = "cases") -> "QdrantCaseStore":
        """Open an existing store; a local folder supplies its own spec from manifest.json."""
        from .retrieval import BUILD_HINT, _spec_from_dict

        folder = _folder(location)
        if folder is not None:
            manifest = read_manifest(folder, FORMAT, FORMAT_VERSION, BUILD_HINT)
            spec, collection = _spec_from_dict(manifest["spec"]), manifest.get("collection", collection)
        if spec is None:
            raise CaseIndexError("opening a remote Qdrant collection needs the IndexSpec it was built with")
        store = cls(spec, _client(location), collection, folder)
        if not store.client.collection_exists(collection):
            raise CaseIndexError(f"no collection {collection!r} at {location}: {BUILD_HINT} --backend qdrant")
        store._check_sizes()
        return store

    def _check_sizes(self) -> None:
        params = self.client.get_collection(self.collection).config.params.vectors
        for m in MODALITIES:
            spec = self.spec.modality(m)
            size = params[m].size if spec and m in params else None
            if spec is not None and size != spec.dim:
                raise CaseIndexError(f"collection {self.collection!r} has {m} vectors of size {size}, "
                                     f"the spec says {spec.dim}: rebuild the collection")

    def save(self, folder=None) -> Path | None:
        """Qdrant persists each write itself; this records the spec for `open_case_store`."""
        from .retrieval import _spec_to_dict

        if self.folder is None:
            return None
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": "qdrant",
                    "collection": self.collection, "spec": _spec_to_dict(self.spec)}
        return write_folder(self.folder, manifest, {})

    def close(self) -> None:
        self.client.close()

    def __len__(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def _new_id(self, case_id: str) -> int:
        # 63-bit hash of the case id: stable, so a case id maps to its point without a lookup table.
        return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "big") >> 1

    def _lookup(self, case_ids) -> dict[str, int]:
        wanted = {self._new_id(c): c for c in case_ids}
        found = self.client.retrieve(self.collection, ids=list(wanted), with_payload=["case_id"]) if wanted else []
        for point in found:
            if point.payload.get("case_id") != wanted[point.id]:
                raise CaseIndexError(f"point id collision for case {wanted[point.id]!r}: rename the case")
        return {wanted[p.id]: p.id for p in found}

    def _insert(self, records: list[_Record], vectors: dict[str, tuple[list[int], np.ndarray]]) -> None:
        _, models = _models()
        per_point: dict[int, dict] = {r.vid: {} for r in records}
        for name, (ids, array) in vectors.items():
            for vid, row in zip(ids, array):
                per_point[vid][name] = row.tolist()
        points = [models.PointStruct(id=r.vid, vector=per_point[r.vid], payload=_payload(r)) for r in records]
        for start in range(0, len(points), 256):
            self.client.upsert(self.collection, points=points[start:start + 256], wait=True)

    def _remove(self, vids: list[int]) -> None:
        _, models = _models()
        self.client.delete(self.collection, points_selector=models.PointIdsList(points=list(vids)), wait=True)

    def _modal_count(self, name: str) -> int:
        if self.spec.modality(name) is None:
            return 0
        _, models = _models()
        has = models.Filter(must=[models.FieldCondition(key="modalities", match=models.MatchValue(value=name))])
        return int(self.client.count(self.collection, count_filter=has, exact=True).count)

    def _modal_search(self, name: str, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        hits = self.client.query_points(self.collection, query=query.tolist(), using=name, limit=k).points
        return [(int(h.id), float(h.score)) for h in hits]

    def _modal_similarities(self, name: str, query: np.ndarray, vids: list[int]) -> dict[int, float]:
        points = self.client.retrieve(self.collection, ids=list(vids), with_vectors=[name], with_payload=False)
        out = {}
        for point in points:
            vector = (point.vector or {}).get(name)
            if vector is not None:
                out[int(point.id)] = float(np.asarray(vector, np.float32) @ query)
        return out

    def _records(self, vids: list[int]) -> dict[int, _Record]:
        points = self.client.retrieve(self.collection, ids=list(vids), with_payload=True)
        return {int(p.id): _Record(int(p.id), p.payload["case_id"], p.payload["report"], p.payload["labels"],
                                   p.payload["metadata"], tuple(p.payload["modalities"])) for p in points}


def _payload(record: _Record) -> dict:
    row = record.row()
    row.pop("id")
    return row


def _folder(location: str) -> Path | None:
    return None if location == ":memory:" or location.startswith(("http://", "https://")) else Path(location)
