"""The command line: help, one-line errors for bad input, and a real end-to-end draft."""

from __future__ import annotations

import subprocess
import sys

import pytest

from assistant.cli import main
from conftest import CHEST_DICOM, ROOT


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "assistant", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0
    assert "prepare" in result.stdout and "draft" in result.stdout


def test_non_dicom_file_is_one_error_line(tmp_path, capsys):
    bogus = tmp_path / "report.dcm"
    bogus.write_text("this is not an image")
    assert main(["draft", str(bogus)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_missing_file_is_one_error_line(tmp_path, capsys):
    assert main(["draft", str(tmp_path / "missing.dcm")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_model_path_is_one_error_line(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "cxr.png"
    Image.new("L", (64, 64), 128).save(png)
    assert main(["draft", str(png), "--llm", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "--llm" in err and "\n" not in err


def test_bad_override_is_one_error_line(capsys):
    assert main(["draft", "x.png", "--set", "llm.no_such_field=1"]) == 2
    assert "unknown config field" in capsys.readouterr().err


@pytest.mark.slow
def test_draft_prints_a_labelled_report_from_a_real_chest_dicom(llm_cache, capsys):
    from assistant.safety import DRAFT_LABEL

    assert main(["draft", str(CHEST_DICOM), "--indication", "cough", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert DRAFT_LABEL in out and "FINDINGS:" in out and "IMPRESSION:" in out
