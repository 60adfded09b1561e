"""benchmarks/report.py: the README's results section is rebuilt from result JSON, between markers."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT, load_benchmark


@pytest.fixture(scope="module")
def report():
    return load_benchmark("report")


def test_replace_section_keeps_the_rest_of_the_readme(report):
    text = f"# Title\n\nintro\n\n{report.START}\nold numbers\n{report.END}\n\nafter\n"
    updated = report.replace_section(text, "new table")
    assert updated == f"# Title\n\nintro\n\n{report.START}\nnew table\n{report.END}\n\nafter\n"
    assert report.replace_section(updated, "new table") == updated  # idempotent
    with pytest.raises(ValueError, match="markers"):
        report.replace_section("no markers here", "x")


def test_readme_is_rebuilt_from_result_files(report, tmp_path, capsys):
    from assistant.evaluate import evaluate

    evaluate("triage", out=tmp_path / "eval-triage.json", command="python -m assistant evaluate --task triage")
    shutil.copy(ROOT / "benchmarks" / "results" / "ingest.json", tmp_path / "ingest.json")
    (tmp_path / "unknown.json").write_text(json.dumps({"something": "else"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# X\n\n## Results\n\n{report.START}\n{report.END}\n")
    args = ["--readme", str(readme), "--results", str(tmp_path)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    text = readme.read_text()
    assert "### Red-flag triage" in text and "### DICOM ingest speed" in text
    assert text.index("Red-flag triage") < text.index("DICOM ingest speed")
    assert "`python -m assistant evaluate --task triage`" in text and "| emergency recall | 1.000 |" in text
    assert report.main([*args, "--check"]) == 0


def test_case_index_and_vision_results_are_recognised_by_shape(report, tmp_path):
    """retrieval.json (benchmarks/retrieval.py) and eval-vision.json (evaluate-vision) carry no kind key."""
    row = {"kind": "hnsw", "n": 1000, "build_s": 1.5, "index_mb": 2.0,
           "settings": [{"hnsw_ef_search": 32, "recall_at_10": 0.90, "latency_ms_1_thread": {"p50": 0.1, "p99": 0.2}},
                        {"hnsw_ef_search": 64, "recall_at_10": 0.97, "latency_ms_1_thread": {"p50": 0.3, "p99": 0.5}},
                        {"hnsw_ef_search": 96, "recall_at_10": 0.99, "latency_ms_1_thread": {"p50": 0.4, "p99": 0.6}}]}
    flat = {"kind": "flat", "n": 1000, "build_s": 0.0, "index_mb": 1.5,
            "settings": [{"recall_at_10": 1.0, "latency_ms_1_thread": {"p50": 0.2, "p99": 0.3}}]}
    bench = {"environment": {"date": "2026-11-23", "faiss": "1.15.1", "cpu_count": 2}, "method": "m",
             "synthetic": {"1000": [flat, row]},
             "iu": {"index_types": [], "retrieval": {"n_queries": 590, "recall_at_1": 0.0644, "recall_at_10": 0.1424}}}
    (tmp_path / "retrieval.json").write_text(json.dumps(bench))
    vision = {"nih_test": {"images": 150, "abnormal": 66, "macro_auroc": 0.64, "findings_scored": 1,
                           "normal_vs_abnormal_auroc": {"noisy_or": 0.6436, "noisy_or_ci95": [0.55, 0.73], "max": 0.6},
                           "per_finding": {"Effusion": {"auroc": 0.687, "positives": 18},
                                           "Mass": {"auroc": None, "positives": 3}}},
              "pneumoniamnist_test": {"auroc": 0.925, "images": 624,
                                      "published_baselines_auroc": {"ResNet-18 (28)": 0.944}}}
    (tmp_path / "eval-vision.json").write_text(json.dumps(vision))
    section = report.build_section(tmp_path)
    assert section.index("### Vision encoder") < section.index("### Case-index speed and recall")
    # The fastest setting reaching recall@10 0.95 is ef_search=64, not the faster ef_search=32.
    assert "| synthetic | 1,000 | hnsw | hnsw_ef_search=64 | 0.970 | 0.30 | 0.50 | 1.5 | 2.0 |" in section
    assert "| synthetic | 1,000 | flat | exact | 1.000 | 0.20 |" in section
    assert "recall@1 0.064, recall@10 0.142" in section and "`python benchmarks/retrieval.py`" in section
    assert "| NIH normal vs abnormal (noisy-OR of the 14 outputs) | 0.644 (95% CI 0.550-0.730) | 150 |" in section
    assert "| NIH Effusion | 0.687 | 18 |" in section and "Not scored (too few test positives): Mass." in section
    assert "| PneumoniaMNIST published baseline: ResNet-18 (28) | 0.944 | 624 |" in section
    assert report.VISION_COMMAND in section


def test_the_shipped_results_of_every_titled_kind_render(report):
    """The result files in benchmarks/results that the README has a section title for all render."""
    paths = [report.RESULTS / f"{stem}.json" for stem in report.TITLES]
    for path in [p for p in paths if p.is_file()]:
        assert report.render_file(path), f"{path.name} has no renderer"
