"""QdrantCaseStore (qdrant-client local mode) serves the same interface and results as the FAISS index."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qdrant_client")

from assistant.retrieval import (  # noqa: E402
    Case, CaseIndex, CaseIndexError, IndexSpec, RetrievalConfig, create_case_store, open_case_store,
)
from test_retrieval import CANARIES, IMAGE, TEXT, make_cases, single_thread_faiss  # noqa: E402,F401


def test_qdrant_matches_faiss_results_and_deletes(tmp_path):
    spec = IndexSpec(TEXT, IMAGE)
    cases = make_cases(80, seed=11)
    faiss_index = CaseIndex(spec)
    faiss_index.add(cases)
    store = create_case_store(spec, RetrievalConfig(backend="qdrant", location=str(tmp_path / "q")))
    store.add(cases)
    assert len(store) == 80 and store.stats()["vectors"] == faiss_index.stats()["vectors"]
    for case in cases[:8]:
        a = store.search(text_vector=case.text_vector, image_vector=case.image_vector, k=5, min_similarity=-1)
        b = faiss_index.search(text_vector=case.text_vector, image_vector=case.image_vector, k=5, min_similarity=-1)
        assert [c.case_id for c in a] == [c.case_id for c in b]
        assert np.allclose([c.similarity for c in a], [c.similarity for c in b], atol=1e-4)
    assert store.delete([c.case_id for c in cases[:10]]) == 10
    res = store.search(text_vector=cases[0].text_vector, k=20, min_similarity=-1)
    assert not {c.case_id for c in cases[:10]} & {c.case_id for c in res}
    with pytest.raises(CaseIndexError, match="already indexed"):
        store.add(cases[20:21])
    store.close()
    reopened = open_case_store(tmp_path / "q", text=TEXT)
    assert isinstance(reopened, type(store)) and len(reopened) == 70
    reopened.close()


def test_qdrant_in_memory_threshold_and_no_phi_in_folder(tmp_path):
    store = create_case_store(IndexSpec(TEXT, None, min_similarity=0.99),
                              RetrievalConfig(backend="qdrant", location=str(tmp_path / "q")))
    report = "Mr. John Smith MRN 12345678, call 555-867-5309, seen 03/14/2021. Heart normal."
    store.add([Case("case-phi", report, text_vector=np.ones(16))])
    res = store.search(text_vector=-np.ones(16))
    assert not res.found and "No close prior case" in res.message
    store.close()
    blob = b"".join(p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file())
    assert not [c for c in CANARIES if c.encode() in blob]
    with pytest.raises(ValueError, match="needs a location"):
        create_case_store(IndexSpec(TEXT), RetrievalConfig(backend="qdrant"))
