"""Truly paired image-report datasets, for users who have them (we do not: see train_data.py).

Two layouts are recognised by their index files:

R2Gen IU X-ray (`annotation.json` present):
    <root>/annotation.json            {"train": [{"id", "report", "image_path": ["CXR1_1_IM-0001/0.png", ...],
                                                   optional "impression", "indication"}], "val": [...], "test": [...]}
    <root>/images/CXR1_1_IM-0001/0.png

MIMIC-CXR-JPG (`mimic-cxr-2.0.0-split.csv[.gz]` present):
    <root>/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split (train/validate/test)
    <root>/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, ..., ViewPosition (optional)
    <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg
    <root>/files/p10/p10000032/s50414267.txt   the report (MIMIC-CXR's reports zip unpacked into the same
                                               `files` tree, or under <root>/reports/files/...)

Each study becomes the same `Example` the shared-data path builds (the app's draft_report prompt,
target "{findings}\n\nIMPRESSION:\n{impression}"), with up to three of its images.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

from .train_data import Example, _View, report_target
from .pipeline import MAX_IMAGES_PER_STUDY, report_prompt

SPLITS = {"train": "train", "val": "val", "validate": "val", "valid": "val", "test": "test"}
_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)


def detect_layout(root: Path) -> str:
    if (root / "annotation.json").is_file():
        return "r2gen"
    if _first(root, "mimic-cxr-2.0.0-split.csv") is not None:
        return "mimic"
    raise FileNotFoundError(f"{root} is neither an R2Gen IU X-ray folder (annotation.json) nor a "
                            "MIMIC-CXR-JPG folder (mimic-cxr-2.0.0-split.csv): see assistant/train_data_paired.py")


def paired_examples(root: str | Path, split: str = "train") -> list[Example]:
    root = Path(root).expanduser()
    return r2gen_examples(root, split) if detect_layout(root) == "r2gen" else mimic_examples(root, split)


def _example(study_id: str, images: list[Path], views: list[str | None], indication: str,
             findings: str, impression: str) -> Example:
    images, views = images[:MAX_IMAGES_PER_STUDY], views[:MAX_IMAGES_PER_STUDY]
    prompt = report_prompt([_View(view) for view in views], indication)
    return Example(prompt, report_target(findings, impression), tuple(str(p) for p in images), study_id)


def r2gen_examples(root: Path, split: str = "train") -> list[Example]:
    annotation = json.loads((root / "annotation.json").read_text(encoding="utf-8"))
    items = annotation.get(split, [])
    return [_example(item["id"], [root / "images" / p for p in item["image_path"]], [None] * len(item["image_path"]),
                     item.get("indication", ""), item["report"], item.get("impression", ""))
            for item in items if item.get("image_path") and item.get("report", "").strip()]


def _first(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)


def _csv_rows(path: Path | None) -> list[dict]:
    if path is None:
        return []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def report_sections(text: str) -> dict[str, str]:
    """MIMIC free-text report -> {"FINDINGS": ..., "IMPRESSION": ..., "INDICATION": ...}."""
    marks = list(_SECTION.finditer(text))
    sections = {}
    for mark, after in zip(marks, marks[1:] + [None]):
        body = text[mark.end():after.start() if after else len(text)]
        sections[mark.group(1).strip()] = " ".join(body.split())
    return sections


def mimic_examples(root: Path, split: str = "train") -> list[Example]:
    views = {r["dicom_id"]: r.get("ViewPosition") or None for r in _csv_rows(_first(root, "mimic-cxr-2.0.0-metadata.csv"))}
    studies: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in _csv_rows(_first(root, "mimic-cxr-2.0.0-split.csv")):
        if SPLITS.get(row["split"]) == SPLITS.get(split, split):
            studies[(row["subject_id"], row["study_id"])].append(row["dicom_id"])
    examples = []
    for (subject, study), dicom_ids in sorted(studies.items()):
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        report = next((p for p in (root / folder / f"s{study}.txt", root / "reports" / folder / f"s{study}.txt")
                       if p.is_file()), None)
        if report is None:
            continue
        sections = report_sections(report.read_text(encoding="utf-8", errors="replace"))
        findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
        images = [root / folder / f"s{study}" / f"{d}.jpg" for d in sorted(dicom_ids)]
        if (findings or impression) and all(p.is_file() for p in images):
            examples.append(_example(f"s{study}", images, [views.get(d) for d in sorted(dicom_ids)],
                                     sections.get("INDICATION", ""), findings, impression))
    return examples
