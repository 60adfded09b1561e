"""benchmarks/report.py: the README's results section is rebuilt from result JSON, between markers."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
