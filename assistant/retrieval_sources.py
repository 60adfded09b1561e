"""Where cases come from: the IU X-ray reports (text side, training split only) and study folders.

Embedding models are passed in as callables, so nothing here imports torch:
- ``embed_text(texts) -> (n, d)`` unit rows (e.g. MiniLM's ``encode(..., normalize_embeddings=True)``),
- ``embed_images(scans) -> (n, d)`` unit rows, one per `dicom.Scan` (the vision encoder's pooled
  vector; see `cli_index.image_embedder`).

Reports are PHI-masked before they are embedded, so the stored vector never encodes text the
index would refuse to store. Case ids are pseudonyms: IU's own study ids, or a hash of the
DICOM study pseudonym or of the file contents, never a folder or file name.

IU X-ray: only the R2Gen *train* split is indexed; val/test are evaluation data (the retrieval
benchmark indexes test findings on its own, in a separate index).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .phi import mask_phi
from .retrieval_cases import Case

TextEmbedder = Callable[[Sequence[str]], np.ndarray]
ImageEmbedder = Callable[[Sequence[object]], np.ndarray]
ANNOTATION, REPORTS_CSV = "r2gen_iu_xray_annotation.json", "indiana_reports.csv"
REPORT_FILE = "report.txt"
_NOT_IMAGES = {".txt", ".json", ".md", ".csv", ".tsv", ".xml", ".html"}
_MAX_REPORT_BYTES = 200_000


def shared_data_dir() -> Path:
    """`../shared/data` beside the repository (override with ASSISTANT_SHARED_DATA)."""
    env = os.environ.get("ASSISTANT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class IuStudy:
    id: str  # R2Gen id, e.g. CXR2384_IM-0942
    split: str
    findings: str
    impression: str
    indication: str

    @property
    def report(self) -> str:
        parts = [f"Findings: {self.findings}" if self.findings else "",
                 f"Impression: {self.impression}" if self.impression else ""]
        return " ".join(p for p in parts if p)


def iu_studies(split: str = "train", root: str | Path | None = None) -> list[IuStudy]:
    """R2Gen split in annotation order, joined to indiana_reports.csv for impression and indication."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown IU split {split!r}: train, val or test")
    folder = Path(root) if root else shared_data_dir() / "iu-xray"
    if not (folder / ANNOTATION).is_file() or not (folder / REPORTS_CSV).is_file():
        raise FileNotFoundError(f"IU X-ray files not found in {folder}: pass --iu-dir or set ASSISTANT_SHARED_DATA")
    annotation = json.loads((folder / ANNOTATION).read_text(encoding="utf-8"))[split]
    with (folder / REPORTS_CSV).open(newline="", encoding="utf-8") as handle:
        rows = {row["uid"]: row for row in csv.DictReader(handle)}
    studies = []
    for item in annotation:
        uid = re.match(r"CXR(\d+)_", item["id"])
        row = rows.get(uid.group(1), {}) if uid else {}
        findings = (row.get("findings") or item["report"] or "").strip()
        studies.append(IuStudy(item["id"], split, findings, (row.get("impression") or "").strip(),
                               (row.get("indication") or "").strip()))
    return studies


def embed_in_batches(embed: Callable[[Sequence], np.ndarray], items: Sequence, batch_size: int = 64) -> np.ndarray:
    chunks = [np.asarray(embed(items[i:i + batch_size]), np.float32) for i in range(0, len(items), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty((0, 0), np.float32)


def iu_cases(studies: Sequence[IuStudy], embed_text: TextEmbedder, batch_size: int = 64) -> list[Case]:
    """Text-only cases (IU has no images here), case id ``iu-<R2Gen id>``."""
    if any(s.split != "train" for s in studies):
        raise ValueError("only IU X-ray training studies may enter the case index (val/test are evaluation data)")
    reports = [mask_phi(s.report) for s in studies]
    vectors = embed_in_batches(embed_text, reports, batch_size)
    return [Case(f"iu-{s.id}", report, text_vector=v,
                 metadata={"source": "iu-xray", "split": s.split, "indication": s.indication})
            for s, report, v in zip(studies, reports, vectors)]


@dataclass(frozen=True)
class StudyFiles:
    images: tuple[Path, ...]
    report: Path | None


@dataclass
class FolderCases:
    cases: list[Case] = field(default_factory=list)
    unreadable_files: int = 0
    empty_studies: int = 0
    duplicates: int = 0


def folder_studies(folder: str | Path) -> list[StudyFiles]:
    """Studies in `folder`: each subfolder is one study (its images + optional report.txt); each
    loose image file is one study, with `<stem>.txt` beside it as its report. Hidden names skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of studies")
    studies, loose = [], sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for path in loose:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            images = tuple(p for p in files if p.suffix.lower() not in _NOT_IMAGES)
            report = path / REPORT_FILE
            studies.append(StudyFiles(images, report if report.is_file() else None))
        elif path.is_file() and path.suffix.lower() not in _NOT_IMAGES:
            report = path.with_suffix(".txt")
            studies.append(StudyFiles((path,), report if report.is_file() else None))
    return studies


def cases_from_folder(folder: str | Path, embed_text: TextEmbedder | None, embed_images: ImageEmbedder | None,
                      read: Callable[[Path], object] | None = None) -> FolderCases:
    """Cases for every study in `folder` (see folder_studies). Unreadable images are skipped and
    counted, never named (file names can carry PHI). A study keeps the modalities it has."""
    if read is None:
        from .dicom import read_scan as read
    out, seen = FolderCases(), set()
    for study in folder_studies(folder):
        scans = _read_scans(study.images, read, out)
        report = mask_phi(_read_report(study.report)) if study.report else ""
        if not (scans and embed_images) and not (report and embed_text):
            out.empty_studies += 1
            continue
        case_id = _case_id(study, scans, report)
        if case_id in seen:
            out.duplicates += 1
            continue
        seen.add(case_id)
        image_vector = _study_vector(embed_images(scans)) if scans and embed_images else None
        text_vector = np.asarray(embed_text([report]), np.float32)[0] if report and embed_text else None
        out.cases.append(Case(case_id, report, text_vector=text_vector, image_vector=image_vector,
                              metadata=_scan_metadata(scans)))
    return out


def _read_scans(paths: Sequence[Path], read, out: FolderCases) -> list:
    from .dicom_pixels import ScanError

    scans = []
    for path in paths:
        try:
            scans.append(read(path))
        except (ScanError, OSError):
            out.unreadable_files += 1
    return scans


def _read_report(path: Path) -> str:
    data = path.read_bytes()[:_MAX_REPORT_BYTES]
    return data.decode("utf-8", errors="replace").strip()


def _study_vector(vectors: np.ndarray) -> np.ndarray:
    """One vector per study: the mean of its images' unit vectors, renormalised (views pooled)."""
    mean = np.asarray(vectors, np.float32).mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def _case_id(study: StudyFiles, scans: Sequence, report: str) -> str:
    keys = {getattr(s, "study_key", None) for s in scans}
    if len(keys) == 1 and None not in keys:
        # The reader's one-way pseudonym of StudyInstanceUID: the same study always gets one id.
        return "study-" + hashlib.sha256(next(iter(keys)).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for path in study.images:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(report.encode())
    return "case-" + digest.hexdigest()[:16]


def _scan_metadata(scans: Sequence) -> dict:
    if not scans:
        return {"source": "folder", "n_images": 0}
    first = scans[0]
    views = sorted({s.view_position for s in scans if getattr(s, "view_position", None)})
    return {"source": "folder", "n_images": len(scans), "modality": getattr(first, "modality", None),
            "body_part": getattr(first, "body_part", None), "views": views}
