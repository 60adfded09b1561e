"""Ingest benchmark: how many chest radiographs per second `read_dicom` turns into a Scan.

Cases: uncompressed (a decoded Explicit VR Little Endian copy of RG1_J2KI, written to a temp
dir), JPEG 2000 (RG1_J2KI, 966_fixed) and JPEG-LS (RG1_JLSN), all from ../shared/data/dicom.
Each case is read once to warm up, then `--repeats` times; images/s is 1 / median seconds.
Peak Python-heap memory of one read is measured separately with tracemalloc (numpy reports
its buffers to it), so tracing never slows the timed runs.

    .venv/bin/python benchmarks/ingest.py [--repeats 7]

Writes benchmarks/results/ingest.json and benchmarks/results/ingest.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, installed or not

import pydicom  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from assistant.dicom import read_dicom  # noqa: E402
from assistant.evaluate import write_atomic  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "dicom"
RESULTS = ROOT / "benchmarks" / "results"
CASES = [  # (name, codec, path relative to DATA; None: the uncompressed copy made here)
    ("RG1 uncompressed", "Explicit VR Little Endian", None),
    ("RG1_J2KI", "JPEG 2000", "pydicom-data/RG1_J2KI.dcm"),
    ("966_fixed", "JPEG 2000 Lossless", "pylibjpeg-data/JPEG2000Lossless/966_fixed.dcm"),
    ("RG1_JLSN", "JPEG-LS near-lossless", "pylibjpeg-data/JPEGLS/RG1_JLSN.dcm"),
]


def uncompressed_copy(source: Path, folder: Path) -> Path:
    """RG1_J2KI decoded and re-saved natively (pylibjpeg only: gdcm is never used here)."""
    ds = pydicom.dcmread(source)
    ds.decompress(decoding_plugin="pylibjpeg")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    path = folder / "rg1_uncompressed.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def time_case(path: Path, repeats: int) -> dict:
    scan = read_dicom(path)  # warm-up: imports, plugin discovery, page cache
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        read_dicom(path)
        seconds.append(time.perf_counter() - start)
    tracemalloc.start()
    read_dicom(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    median = statistics.median(seconds)
    return {
        "file_bytes": path.stat().st_size,
        "shape": list(scan.pixels.shape),
        "photometric": scan.photometric,
        "repeats": repeats,
        "median_s": round(median, 5),
        "min_s": round(min(seconds), 5),
        "max_s": round(max(seconds), 5),
        "images_per_s": round(1.0 / median, 2),
        "megapixels_per_s": round(scan.pixels.size / median / 1e6, 1),
        "peak_python_heap_mb": round(peak / 2**20, 1),
    }


def environment() -> dict:
    versions = {}
    for package in ("pydicom", "numpy", "pillow", "pylibjpeg", "pylibjpeg-openjpeg",
                    "pylibjpeg-libjpeg", "pylibjpeg-rle"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


def markdown(results: list[dict], env: dict) -> str:
    lines = [
        "# Ingest benchmark (`read_dicom`, one frame to a Scan)",
        "",
        f"{env['cpu_count']} CPUs ({env['machine']}), Python {env['python']}, "
        f"pydicom {env['packages']['pydicom']}; median of {results[0]['repeats']} reads after "
        "one warm-up.",
        "",
        "| case | codec | size (MB) | pixels | images/s | median (ms) | Mpixel/s | peak heap (MB) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['codec']} | {r['file_bytes'] / 1e6:.2f} | "
            f"{r['shape'][0]}x{r['shape'][1]} | {r['images_per_s']:.1f} | "
            f"{r['median_s'] * 1000:.0f} | {r['megapixels_per_s']:.1f} | "
            f"{r['peak_python_heap_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"DICOM corpus not found at {args.data}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        for case, codec, relative in CASES:
            path = (uncompressed_copy(args.data / CASES[1][2], Path(tmp)) if relative is None
                    else args.data / relative)
            results.append({"case": case, "codec": codec, **time_case(path, args.repeats)})
            print(f"{case:18s} {codec:26s} {results[-1]['images_per_s']:7.1f} images/s")
    env = environment()
    report = {"benchmark": "ingest", "function": "assistant.dicom.read_dicom",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": env, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "ingest.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "ingest.md", markdown(results, env))
    print(f"wrote {args.out / 'ingest.json'} and {args.out / 'ingest.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
