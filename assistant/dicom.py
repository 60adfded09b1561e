"""Read DICOM, PNG and JPEG files into a `Scan`: display-ready pixels plus safe, non-identifying tags.

Orientation rule: `Scan.values` are the true modality values (e.g. HU) and are never inverted;
`Scan.pixels` is always in display orientation (bright = dense). MONOCHROME1 is inverted in one
place only, `_display`, which both the reader and `window_scan` use, so it happens exactly once.

Only non-identifying attributes leave the reader: no dataset, header or UID is kept on a Scan,
UIDs become keyed one-way pseudonyms (`deid.remap_uid`, the same UIDs a de-identified copy of
the file carries), and error messages never include paths or header values. A whole dataset
leaves only through `read_deidentified` (PS3.15 basic profile, `assistant.deid`).
Every failure surfaces as a `ScanError` subclass.

Hostile input: sizes are checked before reading, decoding (header and codestream) and
inflating (DicomConfig limits); gdcm is never used (it aborts the process on corrupt JPEG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps
from pydicom.multival import MultiValue

from assistant import deid  # also switches off pydicom's value-quoting validation warnings
from assistant import dicom_pixels as px
from assistant.config import DicomConfig
from assistant.dicom_pixels import (
    CorruptImageError,
    ImageTooLargeError,
    NoPixelDataError,
    NotDicomError,
    ScanError,
    TruncatedPixelDataError,
    UnsupportedTransferSyntaxError,
)

__all__ = [
    "Scan", "Study", "WINDOW_PRESETS", "read_scan", "read_dicom", "read_image", "apply_window",
    "window_scan", "to_uint8", "group_studies", "ScanError", "NotDicomError",
    "NoPixelDataError", "TruncatedPixelDataError", "UnsupportedTransferSyntaxError",
    "ImageTooLargeError", "CorruptImageError", "read_deidentified", "read_study_identity",
]

# (centre, width) in HU, for CT-like modality values.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (400.0, 1800.0),
}
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Code String (CS) syntax: anything else in a "CS" tag is malformed or free text, and free
# text can hold names, so it is dropped rather than passed on.
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")


@dataclass(frozen=True, eq=False)  # arrays: compare/hash by identity, not elementwise
class Scan:
    pixels: np.ndarray  # (H, W) float32 in [0, 1], display orientation (bright = dense)
    values: np.ndarray  # (H, W) float32 modality values (HU for CT), before VOI, never inverted
    modality: str | None
    body_part: str | None
    view_position: str | None
    laterality: str | None
    photometric: str | None
    frame_index: int
    n_frames: int
    source_format: str  # "dicom" | "png" | "jpeg"
    study_key: str | None  # pseudonym of StudyInstanceUID, never the UID itself
    series_key: str | None
    window: tuple[float, float] | None  # (centre, width) in modality units that made `pixels`


@dataclass(frozen=True)
class Study:
    study_key: str | None
    frontal: list[Scan] = field(default_factory=list)
    lateral: list[Scan] = field(default_factory=list)
    other: list[Scan] = field(default_factory=list)


# ---------------------------------------------------------------- reading


def read_scan(path: str | os.PathLike, config: DicomConfig = DicomConfig(), *,
              frame: int | None = None) -> Scan:
    """Read a DICOM, PNG or JPEG file, chosen by content (never by file name)."""
    data = _read_bytes(path, config)
    kind = _sniff(data)
    if kind in ("png", "jpeg"):
        return _image_from_bytes(data, config)
    try:
        return _dicom_from_bytes(data, config, frame)
    except NotDicomError:
        raise NotDicomError("not a DICOM, PNG or JPEG file") from None


def read_dicom(path: str | os.PathLike, config: DicomConfig = DicomConfig(), *,
               frame: int | None = None) -> Scan:
    """Read one frame of a DICOM image (`frame`, else `config.frame`, else the middle one)."""
    return _dicom_from_bytes(_read_bytes(path, config), config, frame)


def read_image(path: str | os.PathLike, config: DicomConfig = DicomConfig()) -> Scan:
    """Read a PNG or JPEG file as a grayscale Scan."""
    data = _read_bytes(path, config)
    if _sniff(data) not in ("png", "jpeg"):
        raise CorruptImageError("not a PNG or JPEG image")
    return _image_from_bytes(data, config)


def _read_bytes(path: str | os.PathLike, config: DicomConfig) -> bytes:
    # Read once, capped, and parse from memory: no window between the size check and the read.
    if not isinstance(path, (str, os.PathLike)):  # an int would open a file descriptor
        raise ScanError("path must be a str or os.PathLike")
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ScanError("not a regular file")
            if info.st_size > config.max_file_bytes:
                raise ImageTooLargeError(f"file is larger than {config.max_file_bytes} bytes "
                                         "(DicomConfig.max_file_bytes)")
            # Sized from the file, not the cap: read(n) allocates n bytes up front.
            data = f.read(min(info.st_size, config.max_file_bytes) + 1)
    except ScanError:
        raise
    except FileNotFoundError:
        raise ScanError("file not found") from None
    except IsADirectoryError:
        raise ScanError("expected a file but got a directory") from None
    except PermissionError:
        raise ScanError("file not readable: permission denied") from None
    except (OSError, TypeError, ValueError) as exc:  # OSError text names the path
        raise ScanError(f"file could not be read ({type(exc).__name__})") from None
    if len(data) > config.max_file_bytes:
        raise ImageTooLargeError(
            f"file is larger than {config.max_file_bytes} bytes (DicomConfig.max_file_bytes)")
    if not data:
        raise NotDicomError("the file is empty")
    return data


def _sniff(data: bytes) -> str:
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    return "unknown"  # maybe DICOM without the preamble: the DICOM parser decides


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Turn any non-ScanError into CorruptImageError; the original text may hold PHI."""
    try:
        yield
    except ScanError:
        raise
    except MemoryError:
        raise ImageTooLargeError(f"out of memory while {what}") from None
    except BaseException as exc:  # noqa: BLE001 - the reader's contract: only ScanErrors escape
        if not px.is_failure(exc):
            raise  # KeyboardInterrupt, SystemExit and the like
        raise CorruptImageError(f"malformed file: {type(exc).__name__} while {what}") from None


def _dicom_from_bytes(data: bytes, config: DicomConfig, frame: int | None) -> Scan:
    key = _deid_key(config)
    with _errors("parsing the DICOM header"):
        ds = px.parse_dataset(data, config)
        px.require_image(ds)
        tsyntax = px.transfer_syntax(ds)
        n_frames = px.frame_count(ds)
        px.check_size(ds, tsyntax, n_frames, config)
        index = _frame_index(frame if frame is not None else config.frame, n_frames)
        tags = _safe_tags(ds, key)
    with _errors("decoding the pixel data"):
        arr, photometric = px.decode_frame(ds, tsyntax, index, n_frames, config)
        values, pixels, window = _dicom_pixels(arr, ds, index, photometric)
    return Scan(pixels=pixels, values=values, frame_index=index, n_frames=n_frames,
                source_format="dicom", window=window, **tags)


def _frame_index(frame: int | None, n_frames: int) -> int:
    if frame is None:
        return n_frames // 2  # the middle frame is the most representative of a stack
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise ScanError("frame must be an integer")
    if not 0 <= frame < n_frames:
        raise ScanError(f"frame {frame} out of range: the image has {n_frames} frame(s), "
                        f"indices 0 to {n_frames - 1}")
    return int(frame)


def _safe_tags(ds, key: bytes) -> dict:
    """The only header values that leave the reader: code strings and UID pseudonyms."""
    return {
        "modality": _code_string(_raw_text(ds, "Modality")),
        "body_part": _code_string(_raw_text(ds, "BodyPartExamined")),
        "view_position": _code_string(_raw_text(ds, "ViewPosition")),
        "laterality": _code_string(_raw_text(ds, "ImageLaterality")
                                   or _raw_text(ds, "Laterality")),
        "photometric": _code_string(_raw_text(ds, "PhotometricInterpretation")),
        "study_key": _pseudonym(_raw_text(ds, "StudyInstanceUID"), key),
        "series_key": _pseudonym(_raw_text(ds, "SeriesInstanceUID"), key),
    }


def _raw_text(ds, keyword: str) -> str | None:
    # Read the stored bytes rather than the converted value: conversion validates the value
    # and pydicom's validation warnings quote it, which would put a UID in the logs.
    element = ds.get_item(keyword)
    value = None if element is None else element.value
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace").split("\\")[0]
    elif isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    text = str(value).strip("\x00 ") if value is not None else ""
    return text or None


def _code_string(text: str | None) -> str | None:
    text = (text or "").upper()
    return text if _CODE_STRING.fullmatch(text) else None


def _pseudonym(uid: str | None, key: bytes) -> str | None:
    """The UID a de-identified copy carries: keyed (HMAC), stable within a deployment, one-way."""
    text = (uid or "").strip("\x00 ")
    return deid.remap_uid(text, key) if text else None


def _deid_key(config: DicomConfig) -> bytes:
    # Outside `_errors`: a missing key is a deployment problem, not a malformed file.
    try:
        return deid.load_key(config.deid_key_file)
    except deid.DeidKeyError as exc:
        raise ScanError(str(exc)) from None


# ---------------------------------------------------------------- whole datasets


def read_deidentified(path: str | os.PathLike, config: DicomConfig = DicomConfig()) -> deid.DeidResult:
    """A PS3.15 basic-profile copy of a DICOM file (header only changed; pixels untouched), for
    anything that stores, indexes, shows or exports the dataset itself. Check
    `needs_pixel_review` before release: burned-in text is flagged, not removed."""
    data = _read_bytes(path, config)
    key = _deid_key(config)
    with _errors("de-identifying the DICOM header"):
        return deid.deidentify(px.parse_dataset(data, config), key, in_place=True)


def read_study_identity(path: str | os.PathLike,
                        config: DicomConfig = DicomConfig()) -> deid.StudyIdentity:
    """The original study identifiers, only for filing a result back into the hospital's PACS
    (`export.for_pacs`); keep the result in memory on the trusted side, never store or log it."""
    data = _read_bytes(path, config)
    with _errors("reading the study identifiers"):
        return deid.study_identity(px.parse_dataset(data, config))


def _dicom_pixels(arr: np.ndarray, ds, index: int, photometric: str):
    """(values, pixels, window) for one decoded frame."""
    if arr.ndim == 3 or photometric == "PALETTE COLOR":  # colour: luminance only, no window
        lum, full = px.colour_luminance(arr, ds, photometric)
        values = _finite(lum)
        return values, np.clip(values / full, 0.0, 1.0).astype(np.float32), None
    if arr.ndim != 2:
        raise CorruptImageError(f"decoded frame has unexpected shape {arr.shape}")
    values = _finite(px.modality_values(arr, ds, index))
    window = px.header_window(ds, index)
    if window is not None:
        pixels = apply_window(values, window[0], window[1], function=window[2])
        # A header window that misses the data entirely (seen in the wild) would give a blank
        # image; ignore it and fall through to the VOI LUT or min-max.
        if pixels.min() < pixels.max() or values.min() == values.max():
            return values, _display(pixels, photometric), (window[0], window[1])
    lut = px.voi_lut(values, ds)
    pixels = lut if lut is not None else _min_max(values)
    return values, _display(pixels, photometric), None


def _finite(values: np.ndarray) -> np.ndarray:
    # Float pixel data may hold NaN/inf; downstream code needs finite numbers everywhere.
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if finite.all():
        return values
    if not finite.any():
        raise CorruptImageError("the image holds no finite pixel values")
    lo, hi = values[finite].min(), values[finite].max()
    return np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _display(pixels: np.ndarray, photometric: str | None) -> np.ndarray:
    # The only place MONOCHROME1 is inverted. Presentation LUT Shape INVERSE is deliberately
    # ignored: DX requires it alongside MONOCHROME1, so honouring both would invert twice.
    pixels = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
    return 1.0 - pixels if photometric == "MONOCHROME1" else pixels


# ---------------------------------------------------------------- PNG / JPEG


def _image_from_bytes(data: bytes, config: DicomConfig) -> Scan:
    fmt = _sniff(data)
    with _errors(f"decoding the {fmt.upper()} image"):
        try:
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
                width, height = img.size  # header only: nothing decoded yet
                n_pixels = width * height * len(img.getbands())
                if n_pixels > config.max_pixels:
                    raise ImageTooLargeError(
                        f"image has {n_pixels} pixel samples, over the limit of "
                        f"{config.max_pixels} (DicomConfig.max_pixels)")
                values, lo, hi = _pil_gray(ImageOps.exif_transpose(img))
        except Image.DecompressionBombError:
            raise ImageTooLargeError("image exceeds Pillow's decompression-bomb limit") from None
    pixels = np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(values)
    return Scan(pixels=pixels.astype(np.float32), values=values, modality=None, body_part=None,
                view_position=None, laterality=None, photometric=None, frame_index=0,
                n_frames=1, source_format=fmt, study_key=None, series_key=None, window=None)


def _pil_gray(img: Image.Image) -> tuple[np.ndarray, float, float]:
    """(values, black, white): 16-bit and float grayscale keep their depth; the rest -> 'L'."""
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32), 0.0, 65535.0
    if img.mode in ("I", "F"):
        values = _finite(np.asarray(img, dtype=np.float32))
        if img.mode == "I" and values.min() >= 0 and values.max() <= 65535:
            return values, 0.0, 65535.0  # how Pillow opens some 16-bit PNGs
        return values, float(values.min()), float(values.max())
    return np.asarray(img.convert("L")).astype(np.float32), 0.0, 255.0  # ITU-R 601 luma


# ---------------------------------------------------------------- windowing and display


def apply_window(values: np.ndarray, centre: float, width: float, *,
                 function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) to float32 in [0, 1].

    LINEAR uses the standard's (width - 1) form, which needs width >= 1; narrower windows
    (possible with float data) use LINEAR_EXACT. SIGMOID is supported for header windows.
    """
    centre, width = float(centre), float(width)
    if not (np.isfinite(centre) and np.isfinite(width)) or width <= 0:
        raise ValueError("window width must be a positive finite number")
    x = np.asarray(values, dtype=np.float32)  # python-float scalars keep float32 (NEP 50)
    function = function.upper()
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - centre) / width, -80, 80)))
    elif function == "LINEAR_EXACT" or width < 1:
        out = (x - centre) / width + 0.5
    elif width == 1:
        out = (x > centre - 0.5).astype(np.float32)
    else:
        out = (x - (centre - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def window_scan(scan: Scan, preset_or_tuple: str | tuple[float, float]) -> Scan:
    """A new Scan with `pixels` re-windowed from `values` (a preset name or (centre, width))."""
    if isinstance(preset_or_tuple, str):
        if preset_or_tuple not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {preset_or_tuple!r}; "
                             f"choose one of {', '.join(WINDOW_PRESETS)}")
        centre, width = WINDOW_PRESETS[preset_or_tuple]
    else:
        centre, width = (float(v) for v in preset_or_tuple)
    pixels = _display(apply_window(scan.values, centre, width), scan.photometric)
    return dataclasses.replace(scan, pixels=pixels, window=(centre, width))


def to_uint8(scan: Scan) -> np.ndarray:
    """(H, W) uint8 for display, from the already display-oriented pixels."""
    return np.rint(np.clip(scan.pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def group_studies(scans: Sequence[Scan]) -> list[Study]:
    """Group by study pseudonym (first-seen order), then by view.

    A scan without a study key (PNG/JPEG, or DICOM lacking the UID) becomes its own study:
    guessing that two anonymous images belong together could mix up patients.
    """
    studies: dict[object, Study] = {}
    for i, scan in enumerate(scans):
        key = scan.study_key if scan.study_key is not None else ("unkeyed", i)
        study = studies.setdefault(key, Study(scan.study_key))
        if scan.view_position in FRONTAL_VIEWS:
            study.frontal.append(scan)
        elif scan.view_position in LATERAL_VIEWS:
            study.lateral.append(scan)
        else:
            study.other.append(scan)
    return list(studies.values())
