"""Case sources (IU X-ray train split, study folders) and MedQuAD passages, with stub embedders."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from assistant.retrieval import CaseIndex, EmbedderSpec, IndexSpec
from assistant.retrieval_passages import (
    PassageIndex, chunk_text, load_medquad, medquad_split, passages_context, passages_from_records,
)
from assistant.retrieval_sources import cases_from_folder, iu_cases, iu_studies

from conftest import SHARED_DATA
from test_retrieval import single_thread_faiss  # noqa: F401  (autouse)

DIM = 256


def stub_text(texts):
    """Bag of hashed words: deterministic, shares direction between texts with shared words."""
    out = np.zeros((len(texts), DIM), np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, zlib.crc32(word.strip(".,:;").encode()) % DIM] += 1.0
        out[row, 0] += 1e-3
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def stub_images(scans):
    """Mean intensity and a few pixel statistics as an 8-d unit vector."""
    rows = []
    for scan in scans:
        p = scan.pixels
        v = np.array([p.mean(), p.std(), p[: p.shape[0] // 2].mean(), p[:, : p.shape[1] // 2].mean(), 1, 0.5, 0.2, 0.1])
        rows.append(v / np.linalg.norm(v))
    return np.array(rows, np.float32)


needs_iu = pytest.mark.skipif(not (SHARED_DATA / "iu-xray").is_dir(), reason="shared IU X-ray data missing")
needs_medquad = pytest.mark.skipif(not (SHARED_DATA / "medquad").is_dir(), reason="shared MedQuAD data missing")


@needs_iu
def test_iu_cases_come_from_the_training_split_only():
    train = iu_studies("train")
    assert len(train) == 2069 and all(s.split == "train" for s in train)
    test_ids = {s.id for s in iu_studies("test")}
    assert not test_ids & {s.id for s in train}
    cases = iu_cases(train[:20], stub_text)
    assert cases[0].case_id == f"iu-{train[0].id}" and cases[0].report.startswith("Findings:")
    assert cases[0].metadata["split"] == "train"
    with pytest.raises(ValueError, match="only IU X-ray training studies"):
        iu_cases(iu_studies("test")[:2], stub_text)


@needs_iu
@pytest.mark.slow
def test_real_minilm_finds_a_report_by_its_own_findings():
    from assistant.base_models import load_embedder

    model = load_embedder()

    def embed(texts):
        return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
    studies = [s for s in iu_studies("train") if s.findings][:50]
    index = CaseIndex(IndexSpec(EmbedderSpec("all-minilm-l6-v2", "test", 384)))
    index.add(iu_cases(studies, embed))
    for study in studies[:5]:
        res = index.search(text_vector=embed([study.findings])[0], k=3)
        assert res.found and f"iu-{study.id}" in [c.case_id for c in res]


def _png(path, value, size=(24, 32)):
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def test_cases_from_folder_pseudonymous_ids_and_skips(tmp_path):
    studies = tmp_path / "studies"
    (studies / "Smith_John_2021-03-14").mkdir(parents=True)
    _png(studies / "Smith_John_2021-03-14" / "frontal.png", 200)
    _png(studies / "Smith_John_2021-03-14" / "lateral.png", 180)
    (studies / "Smith_John_2021-03-14" / "report.txt").write_text("Mr. John Smith. Heart enlarged. Small effusion.")
    (studies / "text_only").mkdir()
    (studies / "text_only" / "report.txt").write_text("Lungs are clear.")
    _png(studies / "loose.png", 90)
    (studies / "broken.dcm").write_bytes(b"not an image at all")
    (studies / "empty").mkdir()
    found = cases_from_folder(studies, stub_text, stub_images)
    assert len(found.cases) == 3 and found.unreadable_files == 1 and found.empty_studies == 2
    ids = [c.case_id for c in found.cases]
    assert all(i.startswith("case-") and "Smith" not in i for i in ids)
    first = found.cases[0]
    assert first.image_vector is not None and first.text_vector is not None and "[NAME]" in first.report
    assert first.metadata["n_images"] == 2
    text_only = next(c for c in found.cases if c.image_vector is None)
    assert text_only.report == "Lungs are clear."
    again = cases_from_folder(studies, stub_text, stub_images)
    assert [c.case_id for c in again.cases] == ids  # content-derived ids are stable


def test_chunk_text_respects_limit_and_keeps_text():
    text = "First sentence here. " * 100 + "\n\n" + "x" * 3000
    chunks = chunk_text(text, 500)
    assert all(len(c) <= 500 for c in chunks)
    assert "".join(chunks).replace(" ", "") == " ".join(text.split()).replace(" ", "")


@needs_medquad
def test_medquad_split_is_by_qid_fixed_and_leak_free():
    records = load_medquad()
    split = medquad_split(records)
    assert split == medquad_split(records)  # fixed seed
    train_qids = {r["qid"] for r in split.train}
    assert split.test_qids and not train_qids & split.test_qids
    assert 0.05 < len(split.test) / len(records) < 0.15
    test_answers = {" ".join(r["answer"].lower().split()) for r in split.test}
    assert not any(" ".join(r["answer"].lower().split()) in test_answers for r in split.train)
    assert medquad_split(records, seed=1).test_qids != split.test_qids


@needs_medquad
def test_passage_index_cites_sources_and_never_returns_test_answers(tmp_path):
    split = medquad_split(load_medquad())
    train = split.train[:300]
    index = PassageIndex.build(train, stub_text, "stub", "1")
    assert len(index) == len(passages_from_records(train))
    question = train[5]
    target = next(p for p in index.passages if p.qid == question["qid"])
    hits = index.search(stub_text([target.text])[0], k=3)
    assert hits[0].passage == target and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert target.url.startswith("http")
    assert hits[0].citation == f"{question['source']}: {question['url']}"
    assert question["qid"] not in {h.passage.qid for h in index.search(stub_text([question["answer"]])[0], k=3,
                                                                          exclude_qids=frozenset({question["qid"]}))}
    context = passages_context(hits, 2000)
    assert context.startswith("[1] ") and "(Source: " in context
    index.save(tmp_path / "passages")
    loaded = PassageIndex.load(tmp_path / "passages", "stub", "1")
    assert [h.passage for h in loaded.search(stub_text(["diabetes"])[0], k=3)] == \
        [h.passage for h in index.search(stub_text(["diabetes"])[0], k=3)]
    assert not split.test_qids & {p.qid for p in index.passages}
