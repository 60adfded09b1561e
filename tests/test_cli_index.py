"""`python -m assistant index ...` end to end with stub embedders (the seams cli_index exposes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from assistant import cli, cli_index
from assistant.retrieval import EmbedderSpec
from conftest import SHARED_DATA
from test_retrieval import single_thread_faiss  # noqa: F401  (autouse)
from test_retrieval_sources import stub_images, stub_text


@pytest.fixture
def run(monkeypatch, capsys):
    groups = cli._command_groups
    if cli_index.add_commands not in groups():  # until cli.py registers the group itself
        monkeypatch.setattr(cli, "_command_groups", lambda: [*groups(), cli_index.add_commands])
    monkeypatch.setattr(cli_index, "text_embedder", lambda config: (EmbedderSpec("stub-text", "1", 256), stub_text))
    monkeypatch.setattr(cli_index, "image_embedder", lambda config: (EmbedderSpec("stub-image", "1", 8), stub_images))

    def invoke(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return invoke


def _study(folder, name, value, report):
    (folder / name).mkdir(parents=True)
    Image.fromarray(np.full((20, 30), value, np.uint8)).save(folder / name / "frontal.png")
    (folder / name / "report.txt").write_text(report)


@pytest.fixture
def studies(tmp_path):
    folder = tmp_path / "studies"
    _study(folder, "a", 220, "Heart is enlarged. Small left pleural effusion.")
    _study(folder, "b", 40, "Lungs are clear. No effusion. Heart size normal.")
    _study(folder, "c", 120, "Right lower lobe consolidation, pneumonia.")
    return folder


def test_build_search_add_stats_delete(run, studies, tmp_path):
    out_dir = tmp_path / "index"
    code, out, _ = run("index", "build", "--from-folder", studies, "--out", out_dir)
    assert code == 0 and "indexed 3 cases" in out
    code, out, _ = run("index", "search", "--index", out_dir, "--text", "heart enlarged pleural effusion", "--k", "2",
                       "--min-similarity", "0")
    assert code == 0 and out.splitlines()[0].startswith("| # | Case |") and "Cardiomegaly" in out
    code, out, _ = run("index", "search", "--index", out_dir, "--image", studies / "a" / "frontal.png", "--json",
                       "--min-similarity", "0")
    found = json.loads(out)["cases"]
    assert code == 0 and found[0]["image_similarity"] == pytest.approx(1.0, abs=1e-5)
    _study(tmp_path / "more", "d", 70, "Pneumothorax on the right.")
    code, out, _ = run("index", "add", "--index", out_dir, "--from-folder", tmp_path / "more")
    assert code == 0 and "added 1 cases; the index now holds 4" in out
    code, out, _ = run("index", "stats", "--index", out_dir)
    stats = json.loads(out)
    assert stats["cases"] == 4 and stats["vectors"] == {"text": 4, "image": 4} and stats["generation"] == 2
    code, out, _ = run("index", "delete", "--index", out_dir, found[0]["case_id"])
    assert code == 0 and "deleted 1 of 1" in out


def test_errors_are_one_line(run, studies, tmp_path):
    code, _, err = run("index", "search", "--index", tmp_path / "missing", "--text", "x")
    assert code == 2 and err.startswith("error: no index folder") and err.count("\n") == 1
    run("index", "build", "--from-folder", studies, "--out", tmp_path / "idx")
    code, _, err = run("index", "build", "--from-folder", studies, "--out", tmp_path / "idx")
    assert code == 2 and "already holds an index" in err
    code, _, err = run("index", "search", "--index", tmp_path / "idx")
    assert code == 2 and "pass --text and/or --image" in err
    code, _, err = run("index", "search", "--index", tmp_path / "idx", "--image", studies / "a" / "report.txt")
    assert code == 2 and err.startswith("error: ") and "report.txt" not in err


@pytest.mark.skipif(not (SHARED_DATA / "iu-xray").is_dir(), reason="shared IU X-ray data missing")
def test_build_from_iu_text_only(run, tmp_path):
    code, out, _ = run("index", "build", "--from-iu", "--limit", "40", "--kind", "hnsw", "--out", tmp_path / "iu")
    assert code == 0 and "indexed 40 cases" in out
    code, out, _ = run("index", "stats", "--index", tmp_path / "iu")
    stats = json.loads(out)
    assert stats["vectors"] == {"text": 40, "image": 0} and stats["stores"]["text"]["kind"] == "hnsw"


def test_qdrant_backend_via_cli(run, studies, tmp_path):
    pytest.importorskip("qdrant_client")
    code, _, _ = run("index", "build", "--from-folder", studies, "--out", tmp_path / "q", "--backend", "qdrant")
    assert code == 0
    code, out, _ = run("index", "search", "--index", tmp_path / "q", "--text", "pneumonia consolidation", "--json")
    assert code == 0 and json.loads(out)["cases"][0]["findings"] == ["Consolidation", "Pneumonia"]


def test_real_image_embedder_with_tiny_trained_weights(tmp_path):
    """The real seam: vision.load_vision_encoder + to_pixel_values -> pooled unit vectors."""
    import dataclasses

    import torch

    from assistant.dicom import read_scan
    from assistant.vision import VisionEncoder, build_vision_tower, config_for_weights, save_vision_encoder
    from conftest import tiny_config

    torch.manual_seed(0)
    tiny = tiny_config().vision
    save_vision_encoder(VisionEncoder(build_vision_tower(tiny)), tmp_path / "weights", tiny)
    config = dataclasses.replace(tiny_config(), vision=config_for_weights(tmp_path / "weights"))
    spec, embed = cli_index.image_embedder(config)
    Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30)).save(tmp_path / "x.png")
    vectors = embed([read_scan(tmp_path / "x.png")])
    assert vectors.shape == (1, spec.dim) and np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)
    assert spec.version.startswith("sha256:") and spec.name == "vision:weights"
    assert np.allclose(cli_index.image_embedder(config)[1]([read_scan(tmp_path / "x.png")]), vectors, atol=1e-5)
    untrained = dataclasses.replace(tiny_config(), vision=tiny)
    with pytest.raises(ValueError, match="image retrieval needs trained vision weights"):
        cli_index.image_embedder(untrained)
