"""Case index: round trips, incremental == bulk, deletes, thresholds, fusion, bad files, no PHI on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from assistant.retrieval import (
    Case, CaseIndex, CaseIndexError, EmbedderSpec, IndexSpec, format_similar_cases, open_case_store, rag_context,
)
from assistant.retrieval_store import StoreParams

TEXT, IMAGE = EmbedderSpec("stub-text", "1", 16), EmbedderSpec("stub-image", "1", 8)
# Small sizes so every kind is exercised: IVF-PQ trains at 64 vectors; probing all 4 lists and
# HNSW's efSearch well above n make the approximate kinds exact here, so results must match.
PARAMS = {
    "flat": StoreParams(kind="flat"),
    "hnsw": StoreParams(kind="hnsw", hnsw_ef_search=400),
    "ivfpq": StoreParams(kind="ivfpq", ivf_min_train=64, ivf_nlist=4, ivf_pq_m=4, ivf_nprobe=4, rerank_factor=50),
}
CANARIES = ["John", "Smith", "12345678", "555-867-5309", "03/14/2021"]


@pytest.fixture(autouse=True)
def single_thread_faiss():
    """One OpenMP thread: on 2 busy cores a second thread makes tiny faiss jobs 3-5x slower."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_cases(n, seed=0, images=True):
    rng = np.random.default_rng(seed)
    texts, imgs = unit(rng, n, TEXT.dim), unit(rng, n, IMAGE.dim)
    reports = [f"Report {i}. " + ("Small left pleural effusion." if i % 3 == 0 else "Lungs clear.") for i in range(n)]
    return [Case(f"case-{seed}-{i}", reports[i],
                 text_vector=texts[i], image_vector=imgs[i] if images and i % 4 else None,
                 metadata={"source": "test"}) for i in range(n)]


def new_index(kind="flat", **spec):
    return CaseIndex(IndexSpec(TEXT, IMAGE, PARAMS[kind], **spec))


def top(index, case, k=5, **kw):
    res = index.search(text_vector=case.text_vector, k=k, min_similarity=-1, **kw)
    return [c.case_id for c in res], [c.similarity for c in res]


def test_build_search_save_load_round_trip(tmp_path):
    cases = make_cases(60)
    index = new_index()
    assert index.add(cases) == [c.case_id for c in cases]
    ids, scores = top(index, cases[7])
    assert ids[0] == cases[7].case_id and scores[0] == pytest.approx(1.0, abs=1e-5)
    index.save(tmp_path / "idx")
    loaded = CaseIndex.load(tmp_path / "idx", text=TEXT, image=IMAGE)
    assert len(loaded) == 60 and loaded.stats()["vectors"] == {"text": 60, "image": 45}
    for case in cases[:10]:
        assert top(loaded, case) == top(index, case)
    hit = loaded.search(text_vector=cases[0].text_vector, k=1).cases[0]
    assert hit.findings == ("Pleural Effusion",) and "pleural effusion" in hit.snippet
    assert open_case_store(tmp_path / "idx").stats() == loaded.stats()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_incremental_add_equals_bulk_build(kind, tmp_path):
    cases = make_cases(300, seed=1)
    bulk, incremental = new_index(kind), new_index(kind)
    bulk.add(cases)
    for start in range(0, 300, 70):
        incremental.add(cases[start:start + 70])
    incremental.save(tmp_path / "inc")
    reloaded = CaseIndex.load(tmp_path / "inc")
    assert bulk.stores["text"].kind == kind
    for case in cases[::17]:
        ids, scores = top(bulk, case, k=10)
        for other in (incremental, reloaded):
            other_ids, other_scores = top(other, case, k=10)
            assert other_ids == ids and np.allclose(other_scores, scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_deleted_cases_never_return(kind, tmp_path):
    cases = make_cases(200, seed=2)
    index = new_index(kind)
    index.add(cases)
    gone = {c.case_id for c in cases[:30]}
    assert index.delete(list(gone) + ["never-indexed"]) == 30
    index.save(tmp_path / "idx")
    for current in (index, CaseIndex.load(tmp_path / "idx")):
        for case in cases[:30]:
            res = current.search(text_vector=case.text_vector, image_vector=case.image_vector, k=20, min_similarity=-1)
            assert len(res) == 20 and not gone & {c.case_id for c in res}
    assert len(index) == 170 and index.stores["text"].meta()["count"] == 170


def test_hnsw_compacts_when_tombstones_pile_up():
    cases = make_cases(100, seed=3)
    index = new_index("hnsw")
    index.add(cases)
    index.delete([c.case_id for c in cases[:15]])
    assert index.stores["text"].meta()["tombstones"] == 15
    index.delete([c.case_id for c in cases[15:25]])  # 25 of 100 > compact_at 0.2: graph rebuilt
    assert index.stores["text"].meta()["tombstones"] == 0 and index.stores["text"].index.ntotal == 75
    ids, _ = top(index, cases[20], k=75)
    assert not {c.case_id for c in cases[:25]} & set(ids)


def test_auto_kind_switches_from_flat_to_hnsw_by_size():
    index = CaseIndex(IndexSpec(TEXT, None, StoreParams(kind="auto", auto_hnsw_at=100, hnsw_ef_search=400)))
    cases = [Case(c.case_id, c.report, text_vector=c.text_vector) for c in make_cases(150, seed=4)]
    index.add(cases[:90])
    assert index.stores["text"].kind == "flat"
    index.add(cases[90:])
    assert index.stores["text"].kind == "hnsw"
    assert top(index, cases[3])[0][0] == cases[3].case_id


def test_threshold_says_no_close_prior_case():
    index = new_index(min_similarity=0.9)
    index.add(make_cases(40, seed=5))
    far = unit(np.random.default_rng(99), TEXT.dim)
    res = index.search(text_vector=far, k=5)
    assert not res.found and len(res) == 0 and res.best_similarity < 0.9
    assert "No close prior case" in res.message and "0.90" in res.message
    assert format_similar_cases(res) == res.message and rag_context(res) == ""
    assert len(index.search(text_vector=far, k=5, min_similarity=-1)) == 5
    empty = new_index().search(text_vector=far)
    assert not empty.found and "empty" in empty.message


def test_fusion_ranks_case_matching_both_modalities_first():
    rng = np.random.default_rng(6)
    q_text, q_image = unit(rng, TEXT.dim), unit(rng, IMAGE.dim)

    def toward(q, cos):  # a unit vector at cosine `cos` from q
        other = unit(rng, q.size)
        other = other - (other @ q) * q
        return cos * q + np.sqrt(1 - cos**2) * other / np.linalg.norm(other)
    cases = [Case("text-only-match", text_vector=q_text, image_vector=toward(q_image, 0.0)),
             Case("image-only-match", text_vector=toward(q_text, 0.0), image_vector=q_image),
             Case("both-match", text_vector=toward(q_text, 0.8), image_vector=toward(q_image, 0.8))]
    cases += make_cases(50, seed=7)
    index = new_index()
    index.add(cases)
    res = index.search(text_vector=q_text, image_vector=q_image, k=3, min_similarity=0)
    assert res.cases[0].case_id == "both-match" and res.cases[0].similarity == pytest.approx(0.8, abs=1e-4)
    assert res.cases[0].text_similarity == pytest.approx(0.8, abs=1e-4)
    assert index.search(text_vector=q_text, k=1).cases[0].case_id == "text-only-match"
    assert index.search(image_vector=q_image, k=1).cases[0].case_id == "image-only-match"
    text_heavy = index.search(text_vector=q_text, image_vector=q_image, k=1, text_weight=0.9)
    assert text_heavy.cases[0].case_id == "text-only-match"
    assert index.search(image_vector=q_image, k=1, text_weight=1.0).cases[0].similarity == pytest.approx(1.0)


def test_image_query_on_text_only_index_is_noted_not_fatal():
    index = CaseIndex(IndexSpec(TEXT))
    cases = [Case(c.case_id, text_vector=c.text_vector) for c in make_cases(5)]
    index.add(cases)
    res = index.search(text_vector=cases[0].text_vector, image_vector=np.ones(8))
    assert res.modalities == ("text",) and "image query ignored" in res.notes[0]
    with pytest.raises(CaseIndexError, match="nothing to search with"):
        index.search(image_vector=np.ones(8))


def _corrupt(folder: Path, pattern: str) -> Path:
    path = next(folder.glob(pattern))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda f: _corrupt(f, "*-text.faiss"), "corrupt (checksum mismatch)"),
    (lambda f: _corrupt(f, "*-cases.jsonl"), "corrupt (checksum mismatch)"),
    (lambda f: next(f.glob("*-image.faiss")).unlink(), "is missing"),
    (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda f: (f / "manifest.json").unlink(), "holds no manifest.json"),
    (lambda f: (f / "manifest.json").write_text(json.dumps(
        {**json.loads((f / "manifest.json").read_text()), "format_version": 99})), "reads up to 1"),
])
def test_damaged_index_gives_one_line_error(tmp_path, damage, message):
    folder = tmp_path / "idx"
    index = new_index()
    index.add(make_cases(20))
    index.save(folder)
    damage(folder)
    with pytest.raises(CaseIndexError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        CaseIndex.load(folder)
    assert "\n" not in str(err.value)


def test_embedder_mismatch_and_missing_folder(tmp_path):
    index = new_index()
    index.add(make_cases(5))
    index.save(tmp_path / "idx")
    with pytest.raises(CaseIndexError, match="stub-text .* other-model .* rebuild the index"):
        CaseIndex.load(tmp_path / "idx", text=EmbedderSpec("other-model", "2", 16))
    with pytest.raises(CaseIndexError, match="no index folder"):
        CaseIndex.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"text query has shape \(5,\), expected \(n, 16\)"):
        index.search(text_vector=np.ones(5))


def test_save_is_atomic_and_cleans_old_generations(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    (folder).mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    index = new_index()
    index.add(make_cases(10))
    index.save(folder)
    index.add(make_cases(10, seed=9))
    index.save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["generation"] == 2 and not list(folder.glob("g000001-*"))
    assert (folder / "notes.txt").is_file()

    def crash(*args):
        raise OSError("disk full")
    index.add(make_cases(10, seed=10))
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        index.save(folder)  # dies before the manifest is replaced
    monkeypatch.undo()
    assert len(CaseIndex.load(folder)) == 20  # the last complete index, intact


def test_no_phi_canary_reaches_saved_files(tmp_path):
    report = ("Patient Mr. John Smith MRN 12345678, call 555-867-5309, seen 03/14/2021. "
              "Findings: heart size normal. Small right pleural effusion.")
    case = Case("case-phi", report, text_vector=np.ones(16), metadata={"indication": "Cough. Mr. John Smith."})
    index = new_index()
    index.add([case, *make_cases(5)])
    index.save(tmp_path / "idx")
    blob = b"".join(p.read_bytes() for p in (tmp_path / "idx").iterdir())
    assert not [c for c in CANARIES if c.encode() in blob]
    stored = index.search(text_vector=np.ones(16), k=1).cases[0]
    assert "heart size normal" in stored.report and "[NAME]" in stored.report
    assert stored.findings == ("Pleural Effusion",)


def test_only_safe_metadata_and_pseudonymous_ids_enter():
    index = new_index()
    with pytest.raises(ValueError, match="metadata 'patient_name' may not enter"):
        index.add([Case("c1", text_vector=np.ones(16), metadata={"patient_name": "x"})])
    with pytest.raises(ValueError, match="not a plain pseudonymous id"):
        index.add([Case("John Smith", text_vector=np.ones(16))])
    with pytest.raises(ValueError, match="neither a text nor an image vector"):
        index.add([Case("c2")])
    assert len(index) == 0


def test_duplicate_case_ids(tmp_path):
    index = new_index()
    cases = make_cases(4)
    index.add(cases)
    with pytest.raises(CaseIndexError, match="already indexed"):
        index.add(cases[:1])
    assert index.add(cases[:2], on_duplicate="skip") == []
    moved = Case(cases[0].case_id, "New report.", text_vector=-cases[0].text_vector)
    assert index.add([moved], on_duplicate="replace") == [cases[0].case_id]
    assert len(index) == 4 and top(index, moved)[0][0] == cases[0].case_id


def test_markdown_table_and_rag_context():
    index = new_index()
    cases = make_cases(6)
    cases[0] = Case(cases[0].case_id, "Heart | enlarged.\nSmall left pleural effusion. " + "word " * 200,
                    text_vector=cases[0].text_vector)
    index.add(cases)
    res = index.search(text_vector=cases[0].text_vector, k=3, min_similarity=-1)
    table = format_similar_cases(res)
    assert table.splitlines()[0].startswith("| # | Case | Similarity | Key findings |")
    assert "Heart \\| enlarged." in table and "Pleural Effusion" in table and "1.00" in table
    context = rag_context(res, max_chars=400)
    assert len(context) <= 400 and context.startswith("Similar prior reports") and "[1] (similarity 1.00)" in context
    assert rag_context([], 400) == ""
