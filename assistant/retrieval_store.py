"""FAISS vector stores behind the case index: one store per modality (text, image).

Every store maps int64 ids to L2-normalised vectors and scores by inner product, which equals
cosine similarity for unit vectors. Three kinds, picked by size (`kind="auto"`) or by name;
numbers are for 384-d clustered data, one query per call, 1 thread (benchmarks/results/retrieval.md):

- ``flat``: ``IndexIDMap2(IndexFlatIP)``. Exact; p50 0.25 ms at 10k vectors, 0.95 ms at 20k,
  8 ms at 50k, 89 ms at 1M (memory-bound), so `auto` uses it below ``auto_hnsw_at`` (20k).
  Deletes use ``remove_ids``.
- ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``, M=32. At 1M: recall@10 0.99 at the default
  efSearch 96 with p50 0.6 ms / p99 1.8 ms; 1.7 GB; builds slowly (12 min single-threaded on the
  busy 2-core machine). HNSW cannot remove nodes, so a delete adds the id to a tombstone set that
  searches exclude with an ``IDSelectorNot`` during the graph walk (k results still come back);
  when tombstones pass ``compact_at`` of the stored vectors the graph is rebuilt from live ones.
- ``ivfpq``: an exact flat store (the source of truth) plus an ``IndexIVFPQ`` (PQ48, ~2*sqrt(n)
  lists) that proposes ``k * rerank_factor`` candidates, re-ranked exactly. At 1M: recall@10
  0.993, p50 1.3 ms, built in 62 s (k-means on a sample), 1.5 GB, nearly all of it the exact
  copy that keeps scores true (the PQ codes are ~50 MB). Until ``ivf_min_train`` vectors exist it
  searches the exact store. Deletes use ``remove_ids`` on both parts. Chosen by name only.

Dependencies: numpy and faiss only. Not thread-safe for writes: callers serialise add/remove.
Threads: faiss's OpenMP thread count is process-wide, so it is left to the caller. A serving
process should call ``faiss.omp_set_num_threads(1)``: one query never needs more, and on 2 busy
cores a second OpenMP thread made single queries 5-13x slower in the benchmark (waiting for a
core). Bulk builds and batch searches may use more threads when the cores are free.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

KINDS = ("flat", "hnsw", "ivfpq")


@dataclass(frozen=True)
class StoreParams:
    """Index-type choice and tuning. Search-time knobs (ef_search, nprobe) can differ per load."""

    kind: str = "auto"  # auto | flat | hnsw | ivfpq
    auto_hnsw_at: int = 20_000  # auto: flat below, HNSW from here (flat p50 here: 0.25 ms at 10k, 8 ms at 50k)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 96
    ivf_nlist: int = 0  # 0: about 2 * sqrt(n) at training time
    ivf_pq_m: int = 0  # 0: dim / 8 sub-quantizers (48 for 384-d)
    ivf_nprobe: int = 48
    ivf_min_train: int = 20_000  # below this the ivfpq kind searches its exact store
    rerank_factor: int = 10
    compact_at: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("auto", *KINDS):
            raise ValueError(f"unknown index kind {self.kind!r}: choose auto, {', '.join(KINDS)}")


def as_unit_rows(vectors: np.ndarray, dim: int, what: str = "vector") -> np.ndarray:
    """(n, dim) float32 C-contiguous unit rows; rejects wrong shapes, NaN/inf and zero vectors."""
    arr = np.array(vectors, dtype=np.float32, copy=True, ndmin=2)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} has shape {tuple(np.shape(vectors))}, expected (n, {dim})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1)
    if (norms < 1e-12).any():
        raise ValueError(f"{what} contains an all-zero vector, which has no direction to compare")
    # Callers promise unit vectors; normalising again costs little and keeps IP == cosine.
    return np.ascontiguousarray(arr / norms[:, None])


def _ids(ids) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class FlatStore:
    kind = "flat"

    def __init__(self, dim: int, params: StoreParams = StoreParams()):
        self.dim, self.params = dim, params
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids, vectors: np.ndarray) -> None:
        self.index.add_with_ids(as_unit_rows(vectors, self.dim), _ids(ids))

    def remove(self, ids) -> int:
        return int(self.index.remove_ids(_ids(ids))) if len(ids) else 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (nq, k); missing slots have id -1 (and score -inf)."""
        return _padded(self.index, queries, k, None)

    def vectors(self, ids) -> np.ndarray:
        return _reconstruct(self.index, ids, self.dim)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors), in storage order."""
        n = len(self)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return ids, (self.index.index.reconstruct_n(0, n) if n else np.empty((0, self.dim), np.float32))

    def meta(self) -> dict:
        return {"kind": self.kind, "count": len(self)}

    def save(self, prefix: Path) -> dict[str, Path]:
        path = prefix.with_name(prefix.name + ".faiss")
        faiss.write_index(self.index, str(path))
        return {"index": path}

    @classmethod
    def load(cls, dim: int, params: StoreParams, files: dict[str, Path], meta: dict) -> "FlatStore":
        store = cls(dim, params)
        store.index = _read(files["index"], dim)
        return store


class HNSWStore:
    kind = "hnsw"

    def __init__(self, dim: int, params: StoreParams = StoreParams()):
        self.dim, self.params = dim, params
        self.index = self._empty()
        self.tombstones: set[int] = set()

    def _empty(self):
        hnsw = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.params.hnsw_ef_construction
        return faiss.IndexIDMap2(hnsw)

    def __len__(self) -> int:
        return int(self.index.ntotal) - len(self.tombstones)

    def add(self, ids, vectors: np.ndarray) -> None:
        self.index.add_with_ids(as_unit_rows(vectors, self.dim), _ids(ids))

    def remove(self, ids) -> int:
        """Tombstone live ids (the caller passes only ids it stored); compact when they pile up."""
        before = len(self.tombstones)
        self.tombstones.update(int(i) for i in _ids(ids))
        removed = len(self.tombstones) - before
        if self.index.ntotal and len(self.tombstones) > self.params.compact_at * self.index.ntotal:
            self.compact()
        return removed

    def compact(self) -> None:
        """Rebuild the graph from the live vectors so tombstones stop costing search time."""
        ids, vecs = self.items()
        self.index, self.tombstones = self._empty(), set()
        if len(ids):
            self.index.add_with_ids(vecs, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW(efSearch=max(self.params.hnsw_ef_search, k))
        selector = None
        if self.tombstones:
            batch = faiss.IDSelectorBatch(_ids(sorted(self.tombstones)))
            selector = faiss.IDSelectorNot(batch)
            params.sel = selector  # batch/selector stay referenced until the search returns
        return _padded(self.index, queries, min(k, len(self)), params)

    def vectors(self, ids) -> np.ndarray:
        return _reconstruct(self.index, ids, self.dim)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.index.ntotal)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vecs = self.index.index.reconstruct_n(0, n) if n else np.empty((0, self.dim), np.float32)
        live = ~np.isin(ids, _ids(sorted(self.tombstones)))
        return ids[live], np.ascontiguousarray(vecs[live])

    def meta(self) -> dict:
        return {"kind": self.kind, "count": len(self), "tombstones": len(self.tombstones)}

    def save(self, prefix: Path) -> dict[str, Path]:
        path = prefix.with_name(prefix.name + ".faiss")
        faiss.write_index(self.index, str(path))
        files = {"index": path}
        if self.tombstones:
            files["tombstones"] = prefix.with_name(prefix.name + ".tombstones.npy")
            _save_npy(files["tombstones"], _ids(sorted(self.tombstones)))
        return files

    @classmethod
    def load(cls, dim: int, params: StoreParams, files: dict[str, Path], meta: dict) -> "HNSWStore":
        store = cls(dim, params)
        store.index = _read(files["index"], dim)
        if "tombstones" in files:
            store.tombstones = {int(i) for i in _load_npy(files["tombstones"])}
        return store


class IVFPQStore:
    kind = "ivfpq"

    def __init__(self, dim: int, params: StoreParams = StoreParams()):
        self.dim, self.params = dim, params
        self.exact = FlatStore(dim, params)
        self.ivf = None  # trained lazily, once ivf_min_train vectors exist

    def __len__(self) -> int:
        return len(self.exact)

    def add(self, ids, vectors: np.ndarray) -> None:
        vecs, ids = as_unit_rows(vectors, self.dim), _ids(ids)
        self.exact.add(ids, vecs)
        if self.ivf is not None:
            self.ivf.add_with_ids(vecs, ids)
        elif len(self.exact) >= self.params.ivf_min_train:
            self._train()

    def _train(self) -> None:
        ids, vecs = self.exact.items()
        nlist = self.params.ivf_nlist or int(min(65536, max(16, 2 * math.sqrt(len(ids)))))
        nlist = min(nlist, len(ids))
        pq_m = self.params.ivf_pq_m or max(1, self.dim // 8)
        # k-means wants ~40+ points per centroid and PQ's 256 codes ~10k; a fixed-seed sample bounds training time.
        rng = np.random.default_rng(0)
        sample = vecs[rng.choice(len(vecs), size=min(len(vecs), max(32 * nlist, 10_000)), replace=False)]
        nbits = 8 if len(sample) >= 256 else max(1, int(math.log2(len(sample))))  # 2**nbits codes need data
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFPQ(quantizer, self.dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        ivf.add_with_ids(vecs, ids)
        self.ivf = ivf

    def remove(self, ids) -> int:
        ids = _ids(ids)
        if self.ivf is not None and len(ids):
            self.ivf.remove_ids(ids)
        return self.exact.remove(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ivf is None:
            return self.exact.search(queries, k)
        params = faiss.SearchParametersIVF(nprobe=self.params.ivf_nprobe)
        _, cand = _padded(self.ivf, queries, k * self.params.rerank_factor, params)
        return _rerank(self.exact, np.asarray(queries, np.float32).reshape(-1, self.dim), cand, k)

    def vectors(self, ids) -> np.ndarray:
        return self.exact.vectors(ids)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        return self.exact.items()

    def meta(self) -> dict:
        trained = self.ivf is not None
        return {"kind": self.kind, "count": len(self), "trained": trained,
                "nlist": int(self.ivf.nlist) if trained else None}

    def save(self, prefix: Path) -> dict[str, Path]:
        files = self.exact.save(prefix.with_name(prefix.name + ".exact"))
        if self.ivf is not None:
            files["ivf"] = prefix.with_name(prefix.name + ".ivfpq.faiss")
            faiss.write_index(self.ivf, str(files["ivf"]))
        return files

    @classmethod
    def load(cls, dim: int, params: StoreParams, files: dict[str, Path], meta: dict) -> "IVFPQStore":
        store = cls(dim, params)
        store.exact = FlatStore.load(dim, params, {"index": files["index"]}, meta)
        if "ivf" in files:
            store.ivf = _read(files["ivf"], dim)
        return store


STORE_TYPES = {cls.kind: cls for cls in (FlatStore, HNSWStore, IVFPQStore)}


def new_store(dim: int, params: StoreParams, expected_size: int = 0):
    """A store of `params.kind`; `auto` picks by the expected number of vectors."""
    kind = params.kind
    if kind == "auto":
        kind = "hnsw" if expected_size >= params.auto_hnsw_at else "flat"
    return STORE_TYPES[kind](dim, params)


def grow_if_needed(store, params: StoreParams):
    """`auto` switches a flat store to HNSW once it holds auto_hnsw_at vectors (one rebuild)."""
    if params.kind != "auto" or store.kind != "flat" or len(store) < params.auto_hnsw_at:
        return store
    bigger = HNSWStore(store.dim, params)
    ids, vecs = store.items()
    bigger.add(ids, vecs)
    return bigger


def load_store(kind: str, dim: int, params: StoreParams, files: dict[str, Path], meta: dict):
    if kind not in STORE_TYPES:
        raise ValueError(f"unknown stored index kind {kind!r}")
    return STORE_TYPES[kind].load(dim, params, files, meta)


def _padded(index, queries: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
    q = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, index.d))
    if k <= 0 or index.ntotal == 0:
        return np.full((len(q), 0), -np.inf, np.float32), np.full((len(q), 0), -1, np.int64)
    scores, ids = index.search(q, k, params=params) if params is not None else index.search(q, k)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return scores, ids.astype(np.int64)


def _rerank(exact: FlatStore, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products for each query's candidates; top k of them (why: PQ scores are coarse)."""
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for row, (q, ids) in enumerate(zip(queries, cand)):
        ids = ids[ids >= 0]
        if not len(ids):
            continue
        scores = exact.vectors(ids) @ q
        order = np.argsort(-scores, kind="stable")[:k]
        out_s[row, :len(order)], out_i[row, :len(order)] = scores[order], ids[order]
    return out_s, out_i


def _reconstruct(index, ids, dim: int) -> np.ndarray:
    """(len(ids), dim) stored vectors by id (IndexIDMap2 keeps the id -> row map)."""
    ids = _ids(ids)
    return np.stack([index.reconstruct(int(i)) for i in ids]) if len(ids) else np.empty((0, dim), np.float32)


def _read(path: Path, dim: int):
    index = faiss.read_index(str(path))
    if index.d != dim:
        raise ValueError(f"{path.name} holds {index.d}-d vectors, the manifest says {dim}-d")
    return index


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    path.write_bytes(buffer.getvalue())


def _load_npy(path: Path) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
