"""What the app's image viewer shows: window presets, display images, heatmap overlays, and the
finding-probability table with its caption. Gradio-free (the viewer UI is `app_viewer.py`).

Window presets: `dicom.WINDOW_PRESETS` are Hounsfield-unit windows and fit CT only. A radiograph's
stored values are detector units whose range differs per device, so for CR/DX/PNG/JPEG the same
three names are *relative* windows: percentile ranges of this image's own values, chosen to give
contrast to the lucent lungs, the dense mediastinum, or the densest (bone) end. Either way the
pixels are re-windowed from `Scan.values` by `dicom.window_scan`, so MONOCHROME1 is still inverted
exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .config import VisionConfig
from .dicom import WINDOW_PRESETS, Scan, to_uint8, window_scan
from .vision import resolve_weights
from .vision_heatmap import overlay

OWN_WINDOW = "DICOM window"  # the window the reader applied: the header's, its VOI LUT, or min-max
WINDOWS = (OWN_WINDOW, *WINDOW_PRESETS)
# Density percentiles (display orientation, bright = dense) for projection images; see the docstring.
RELATIVE_WINDOWS = {"lung": (1.0, 80.0), "mediastinum": (35.0, 99.0), "bone": (55.0, 99.9)}
MAX_SIDE = 1024  # display copy only: keeps PNG encoding and transfer fast; the model sees the original
FRONTAL = frozenset({"PA", "AP"})


def windowed(scan: Scan, window: str) -> Scan:
    """The scan re-windowed for display with a preset name (OWN_WINDOW: as read)."""
    if window == OWN_WINDOW:
        return scan
    if window not in WINDOW_PRESETS:
        raise ValueError(f"unknown window {window!r}: choose one of {', '.join(WINDOWS)}")
    if (scan.modality or "").upper() == "CT":
        return window_scan(scan, window)
    return window_scan(scan, relative_window(scan, window))


def relative_window(scan: Scan, window: str) -> tuple[float, float]:
    """(centre, width) in the scan's own value units spanning the preset's density percentiles."""
    low, high = RELATIVE_WINDOWS[window]
    if scan.photometric == "MONOCHROME1":  # low stored values display bright (dense)
        low, high = 100.0 - high, 100.0 - low
    step = max(1, int(np.sqrt(scan.values.size / 250_000)))  # a quarter-million samples are plenty
    lo, hi = np.percentile(scan.values[::step, ::step], [low, high])
    return float(lo + hi) / 2.0, max(float(hi - lo), 1e-3)


def display_image(scan: Scan, window: str = OWN_WINDOW, heat: np.ndarray | None = None,
                  max_side: int = MAX_SIDE) -> np.ndarray:
    """(h, w) uint8 grayscale, or (h, w, 3) with a heatmap overlaid, at most max_side pixels."""
    gray = _shrink(to_uint8(windowed(scan, window)), max_side)
    if heat is None:
        return gray
    return overlay(gray, _resize_float(heat, gray.shape))


def window_caption(scan: Scan, window: str) -> str:
    shown = windowed(scan, window)
    if shown.window is None:
        return f"Window: {window} (no window in the file: full range of the stored values)."
    centre, width = shown.window
    kind = "" if window == OWN_WINDOW or (scan.modality or "").upper() == "CT" else \
        " (relative: percentiles of this image, since radiograph values are not Hounsfield units)"
    return f"Window: {window}, centre {centre:.4g}, width {width:.4g}{kind}."


def _shrink(gray: np.ndarray, max_side: int) -> np.ndarray:
    height, width = gray.shape
    scale = max_side / max(height, width)
    if scale >= 1:
        return gray
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR, reducing_gap=3.0))


def _resize_float(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if heat.shape == tuple(shape):
        return heat
    image = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32), mode="F")
    return np.asarray(image.resize(shape[::-1], Image.BILINEAR))


# ---- finding probabilities ------------------------------------------------------------------

def finding_metrics(vision: VisionConfig) -> dict:
    """The held-out metrics in the weights folder's metadata.json ({} when there are none)."""
    folder = resolve_weights(vision)
    path = folder / "metadata.json" if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("metrics", {}).get("nih_test", {})
    except (OSError, ValueError, AttributeError):
        return {}


def finding_rows(findings: Sequence[tuple[str, float]], metrics: dict) -> list[list[str]]:
    """Table rows, most probable first: finding, probability, held-out AUROC of that output."""
    per = metrics.get("per_finding", {})
    rows = []
    for name, prob in sorted(findings, key=lambda item: -item[1]):
        auroc = (per.get(name) or {}).get("auroc")
        rows.append([name.replace("_", " "), f"{prob:.2f}", f"{auroc:.2f}" if auroc else "not measured"])
    return rows


def finding_caption(metrics: dict, weights: str | Path | None, view: str | None, trained: bool) -> str:
    """The warning shown with the table: where the numbers come from and how weak they are."""
    if not trained:
        return ("No trained finding head for this vision model, so no finding probabilities are shown "
                "(the draft is still made from the image).")
    auroc = (metrics.get("normal_vs_abnormal_auroc") or {}).get("noisy_or")
    quality = f"normal-vs-abnormal AUROC {auroc:.2f} on held-out patients" if auroc else "accuracy not documented"
    name = Path(weights).name if weights else "vision model"
    text = (f"⚠️ **Weak research model, not a diagnosis.** These probabilities come from `{name}`, a small "
            f"vision model trained here on a few hundred chest X-rays ({quality}; 'not measured' means too few "
            "test cases). For research and review only. The heatmap shows where the model looked, not where "
            "disease is.")
    if (view or "").upper() not in FRONTAL:
        text += " It was trained on frontal views; for this image (lateral or view unknown) the numbers mean even less."
    return text
