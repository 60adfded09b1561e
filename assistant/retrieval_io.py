"""Atomic, checksummed index folders shared by the case and passage indexes.

A folder holds `manifest.json` plus data files named by generation (`g000003-text.faiss`,
`g000003-cases.jsonl`, ...). A save writes and fsyncs a new generation's files, then replaces the
manifest with one `os.replace` (atomic on POSIX), then deletes the files of older generations.
A crash at any point leaves a manifest that names complete files: the old index or the new one,
never a mix. Loads verify each file's SHA-256 before parsing it, so a truncated or altered file
gives a one-line `CaseIndexError` instead of whatever faiss or json would make of it.

Single writer per folder: concurrent saves to one folder are not coordinated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"
_GENERATED = re.compile(r"^g\d{6}-[\w.-]+$|^\.manifest-[\w]+\.tmp$")


class CaseIndexError(ValueError):
    """A missing, corrupt or mismatched index, or a request it cannot serve (one line, actionable).

    A ValueError so the CLI prints its message as the one `error:` line.
    """


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(folder: str | os.PathLike, manifest: dict,
                 writers: dict[str, Callable[[Path], dict[str, Path]]]) -> Path:
    """Write a new generation: each writer gets a file prefix and returns {role: path} it wrote."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generation = _current_generation(folder) + 1
    files: dict[str, dict] = {}
    for group, write in writers.items():
        written = write(folder / f"g{generation:06d}-{group}")
        files[group] = {}
        for role, path in written.items():
            _fsync(path)
            files[group][role] = {"name": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    final = {**manifest, "generation": generation, "files": files}
    tmp = folder / f".manifest-{os.getpid()}.tmp"
    tmp.write_text(json.dumps(final, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, folder / MANIFEST)  # the commit point
    _fsync(folder)
    _remove_stale(folder, final)
    return folder


def _current_generation(folder: Path) -> int:
    try:
        return int(json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("generation", 0))
    except (OSError, ValueError, AttributeError):
        return max((int(p.name[1:7]) for p in folder.glob("g[0-9]*-*") if p.name[1:7].isdigit()), default=0)


def _remove_stale(folder: Path, manifest: dict) -> None:
    # Only files this module names are ever deleted: the folder may hold the user's own files.
    keep = {entry["name"] for group in manifest["files"].values() for entry in group.values()}
    for path in folder.iterdir():
        if path.is_file() and _GENERATED.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def read_manifest(folder: str | os.PathLike, fmt: str, version: int, build_hint: str) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CaseIndexError(f"no index folder at {folder}: {build_hint}")
    if not path.is_file():
        raise CaseIndexError(f"{folder} holds no {MANIFEST}, so it is not an index: {build_hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CaseIndexError(f"{path} is corrupt (not valid JSON): restore it or rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise CaseIndexError(f"{path} is not a {fmt} manifest: {build_hint}")
    found = manifest.get("format_version")
    if not isinstance(found, int) or found > version:
        raise CaseIndexError(f"{folder} uses index format {found!r}, this version reads up to {version}: "
                             "upgrade the assistant or rebuild the index")
    return manifest


def verified_files(folder: str | os.PathLike, manifest: dict, verify: bool = True) -> dict[str, dict[str, Path]]:
    """{group: {role: path}} of the manifest's files, each present and (if verify) checksum-correct."""
    folder, out = Path(folder), {}
    try:
        groups = manifest["files"].items()
        for group, roles in groups:
            out[group] = {}
            for role, entry in roles.items():
                path = folder / entry["name"]
                if Path(entry["name"]).name != entry["name"]:
                    raise CaseIndexError(f"{folder}/{MANIFEST} names a file outside the folder: rebuild the index")
                if not path.is_file():
                    raise CaseIndexError(f"{path.name} is missing from {folder}: restore it or rebuild the index")
                if verify and (path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]):
                    raise CaseIndexError(f"{path.name} in {folder} is corrupt (checksum mismatch): "
                                         "restore it or rebuild the index")
                out[group][role] = path
    except (KeyError, TypeError, AttributeError):
        raise CaseIndexError(f"{folder}/{MANIFEST} lists its files wrongly: rebuild the index") from None
    return out


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CaseIndexError(f"{path.name} is corrupt (not JSON lines): rebuild the index") from None
