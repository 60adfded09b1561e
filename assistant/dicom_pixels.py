"""Low-level DICOM reading for `assistant.dicom`: safe parsing, frame decoding, LUTs, errors.

Everything here takes bytes or a pydicom Dataset and returns plain numpy arrays; the public
surface (Scan, read_scan, windowing) lives in `assistant.dicom`, which re-exports the errors.
Nothing here formats a message from header values or pydicom's own exception text: either can
carry patient identifiers, and every message must be safe to show and to log.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, unpack_bits
from pydicom.pixels.utils import as_pixel_options
from pydicom.encaps import get_frame
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from assistant.config import DicomConfig

PIXEL_TAGS = (Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))  # int, float, double
REQUIRED_PIXEL_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
                           "PhotometricInterpretation")
# Tags only a real DICOM object would carry: a random file forced through the parser rarely
# produces any of them, which separates "not DICOM" from "DICOM without an image".
_DICOM_EVIDENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality",
                   "DirectoryRecordSequence")
# python-gdcm aborts the whole process on some corrupt JPEG streams (ECOSYSTEM.md).
_EXCLUDED_PLUGINS = frozenset({"gdcm"})
_PLUGIN_PREFERENCE = ("pylibjpeg", "pydicom", "pyjpegls", "pillow")  # pydicom's, minus gdcm
# JPEG start-of-frame markers (SOF0-15 but DHT, JPG, DAC) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
# Deflated Image Frame Compression: newer than pydicom 3.0, which has no decoder for it.
DEFLATED_IMAGE_FRAME = UID("1.2.840.10008.1.2.8.1")


class ScanError(ValueError):
    """Base of every reader error. Messages are one line and never hold paths or identifiers."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class NotDicomError(ScanError):
    """Not DICOM (nor PNG/JPEG via read_scan), or empty."""


class NoPixelDataError(ScanError):
    """A DICOM object without an image: SR, RT plan, DICOMDIR, waveform..."""


class TruncatedPixelDataError(ScanError):
    """Fewer pixel bytes than the header promises."""


class UnsupportedTransferSyntaxError(ScanError):
    """No installed (and allowed) decoder handles the encoding."""


class ImageTooLargeError(ScanError):
    """Over a DicomConfig limit; raised before decoding or inflating."""


class CorruptImageError(ScanError):
    """Undecodable data, or pixel tags missing or inconsistent."""


# ---------------------------------------------------------------- parsing


def parse_dataset(data: bytes, config: DicomConfig) -> Dataset:
    """Parse DICOM bytes; Deflated files are inflated here under a size cap (never by pydicom)."""
    fp = io.BytesIO(data)
    preamble = read_preamble(fp, True)  # force: files without the 128-byte preamble are legal
    meta = _read_meta(fp)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        body = _inflate(data[fp.tell():], config.max_inflated_bytes)
        dataset = read_dataset(io.BytesIO(body), False, True)
        # The inflated body is plain Explicit VR Little Endian; say so, so decoders accept it.
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, dataset, preamble, meta, False, True)
        ds.set_original_encoding(False, True, dataset.original_character_set)
    else:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if not _looks_like_dicom(ds, preamble):
        raise NotDicomError("not a DICOM file: no DICM marker and no DICOM header found")
    return ds


def _read_meta(fp: io.BytesIO) -> FileMetaDataset:
    # Read the meta group exactly as dcmread will (explicit VR, then implicit VR if that fails):
    # if the two disagreed, dcmread could find a Deflated syntax here and inflate without a cap.
    start = fp.tell()
    for implicit in (False, True):
        fp.seek(start)
        meta = FileMetaDataset(read_dataset(fp, implicit, True, stop_when=_not_group_2))
        try:
            list(meta)  # converting every element exposes a wrong VR guess
            return meta
        except NotImplementedError:
            continue
    raise CorruptImageError("the DICOM file meta information is unreadable")


def _not_group_2(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2


def _inflate(body: bytes, cap: int) -> bytes:
    # pydicom inflates everything at once; a 408 KB file grew to ~900 MB. Stop at the cap.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(body, cap + 1)
    if len(out) > cap or inflater.unconsumed_tail:
        raise ImageTooLargeError(
            f"deflated DICOM inflates past the {cap} byte limit (DicomConfig.max_inflated_bytes)")
    return out


def _looks_like_dicom(ds: Dataset, preamble: bytes | None) -> bool:
    if preamble is not None or ds.file_meta.get("TransferSyntaxUID"):
        return True
    return any(keyword in ds for keyword in _DICOM_EVIDENCE)


def require_image(ds: Dataset) -> None:
    """Raise unless `ds` carries pixel data and the tags needed to interpret it."""
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise NoPixelDataError(f"the DICOM file holds no image ({_sop_description(ds)})")
    missing = [k for k in REQUIRED_PIXEL_KEYWORDS if ds.get(k) in (None, "")]
    if missing:
        raise CorruptImageError(f"image pixel module incomplete: missing {', '.join(missing)}")
    if int(ds.Rows) <= 0 or int(ds.Columns) <= 0:
        raise CorruptImageError("image has zero rows or columns")
    if int(ds.BitsAllocated) not in (1, 8, 16, 32, 64) or int(ds.SamplesPerPixel) not in (1, 3):
        raise CorruptImageError("unsupported BitsAllocated or SamplesPerPixel value")


def _sop_description(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    text = str(uid or "").strip("\x00 ")
    name = UID(text).name if _is_uid(text) else text
    if name and name != text:  # a registered SOP class name, never free text from the file
        return f"SOP class: {name}"
    return "e.g. a structured report or RT plan"


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax, inferred from the parsed encoding when the file meta lacks it."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax:
        return UID(str(tsyntax))
    element = ds.get(PIXEL_TAGS[0])
    if element is not None and element.is_undefined_length:
        raise CorruptImageError("compressed pixel data but no transfer syntax in the file meta")
    implicit, little = ds.original_encoding[:2]
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian


def is_encapsulated(tsyntax: UID, ds: Dataset) -> bool:
    if tsyntax == DEFLATED_IMAGE_FRAME:
        return True
    if tsyntax.is_transfer_syntax:
        return tsyntax.is_encapsulated
    return ds[PIXEL_TAGS[0]].is_undefined_length if PIXEL_TAGS[0] in ds else False


def check_size(ds: Dataset, tsyntax: UID, n_frames: int, config: DicomConfig) -> None:
    """Reject decompression bombs and truncated native data before any decoding."""
    n_pixels = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * n_frames
    if n_pixels > config.max_pixels:
        raise ImageTooLargeError(
            f"image has {n_pixels} pixel samples, over the limit of {config.max_pixels} "
            "(DicomConfig.max_pixels)")
    if is_encapsulated(tsyntax, ds):
        return
    expected = (n_pixels * int(ds.BitsAllocated) + 7) // 8
    if ds.PhotometricInterpretation == "YBR_FULL_422":  # PS3.3 C.7.6.3.1.2: 2 of 3 samples
        expected = expected // 3 * 2
    found = len(ds[next(t for t in PIXEL_TAGS if t in ds)].value or b"")
    if found < expected:
        raise TruncatedPixelDataError(
            f"pixel data truncated: expected {expected} bytes, found {found}")


# ---------------------------------------------------------------- decoding


def frame_count(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, "", 0):
        return 1  # absent (or the common non-conformant 0): a single frame
    try:
        n_frames = int(value)
    except (TypeError, ValueError):
        raise CorruptImageError("NumberOfFrames is not a valid integer") from None
    if n_frames < 1:
        raise CorruptImageError("NumberOfFrames is not a positive integer")
    return n_frames


def decode_frame(ds: Dataset, tsyntax: UID, index: int, n_frames: int,
                 config: DicomConfig) -> tuple[np.ndarray, str]:
    """One decoded frame (rows, cols[, samples]) and its photometric after pydicom's processing."""
    options = as_pixel_options(ds, number_of_frames=n_frames)
    if tsyntax == DEFLATED_IMAGE_FRAME:
        return _decode_deflated_frame(ds, index, options, config)
    if tsyntax == RLELossless and int(ds.BitsAllocated) == 1:
        return _decode_rle_1bit(ds, index, n_frames), str(ds.PhotometricInterpretation)
    if tsyntax.is_encapsulated and tsyntax != RLELossless:
        check_codestream(get_frame(ds.PixelData, index, number_of_frames=n_frames), config)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"unsupported transfer syntax {tsyntax.name}: no pydicom decoder exists for it; "
            "convert the file to Explicit VR Little Endian (e.g. with dcmtk's dcmconv)") from None
    for plugin in decoding_plugins(decoder):
        try:
            arr, props = decoder.as_array(ds, index=index, validate=True,
                                          decoding_plugin=plugin, **options)
            return arr, str(props.get("photometric_interpretation", ds.PhotometricInterpretation))
        except BaseException as exc:  # noqa: BLE001 - try the next plugin
            if not is_failure(exc):
                raise
    if not tsyntax.is_encapsulated:
        raise CorruptImageError("could not unpack the native pixel data: the image pixel "
                                "description does not match the data")
    raise CorruptImageError(
        f"could not decode the {tsyntax.name} pixel data: every installed decoder rejected it "
        "(corrupt stream, or a codec feature pylibjpeg and pillow lack)")


def check_codestream(frame: bytes, config: DicomConfig) -> None:
    """Reject a JPEG/JPEG-LS/JPEG 2000 frame whose own header declares a bomb.

    Decoders allocate from the codestream's dimensions, not the DICOM header's, so a small
    header is no protection against a codestream that claims 60000 x 60000. The DICOM header
    already passed the limit, so a codestream over it contradicts the header: corrupt.
    """
    declared = _codestream_samples(bytes(frame[:65536]))
    if declared is not None and declared > config.max_pixels:
        raise CorruptImageError(
            f"compressed frame declares {declared} pixel samples, more than its DICOM header "
            f"and over the limit of {config.max_pixels}; not decoded (possible decompression bomb)")


def _codestream_samples(head: bytes) -> int | None:
    if head[:2] != b"\xff\xd8":  # JPEG 2000: the SIZ segment follows SOC (maybe in a JP2 box)
        at = head.find(b"\xff\x4f\xff\x51")
        if at < 0 or len(head) < at + 42:
            return None
        x, y, x0, y0 = struct.unpack(">4I", head[at + 8: at + 24])
        return max(x - x0, 0) * max(y - y0, 0) * struct.unpack(">H", head[at + 40: at + 42])[0]
    pos = 2
    while pos + 9 < len(head) and head[pos] == 0xFF:  # JPEG / JPEG-LS: walk to the SOF marker
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF_MARKERS:
            rows, cols = struct.unpack(">HH", head[pos + 5: pos + 9])
            return rows * cols * head[pos + 9]
        else:
            pos += 2 + struct.unpack(">H", head[pos + 2: pos + 4])[0]
    return None


def is_failure(exc: BaseException) -> bool:
    """An error from parsing or decoding, as opposed to an interrupt or exit.

    Rust decoders (pylibjpeg-rle) panic on some corrupt input, and pyo3's PanicException
    derives from BaseException, so `except Exception` alone lets it escape.
    """
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def decoding_plugins(decoder) -> list[str]:
    """Plugins to try one by one, in pydicom's order, never an excluded one.

    One at a time (rather than pydicom's "all") so a panic in one plugin still lets the
    next one try, and so gdcm is skipped even when it is installed. pydicom's
    `available_plugins` is alphabetical, so its preference order is restated here.
    """
    if not decoder.UID.is_encapsulated:
        return [""]  # native data: pydicom unpacks it without plugins
    rank = {name: i for i, name in enumerate(_PLUGIN_PREFERENCE)}
    available = sorted((p for p in decoder.available_plugins if p not in _EXCLUDED_PLUGINS),
                       key=lambda p: (rank.get(p, len(rank)), p))
    if not available:
        raise UnsupportedTransferSyntaxError(
            f"unsupported transfer syntax {decoder.UID.name}: install {_missing(decoder)}")
    return available


def _missing(decoder) -> str:
    # pydicom lists e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1".
    for line in decoder.missing_dependencies:
        plugin, _, needs = line.partition(" - requires ")
        if plugin not in _EXCLUDED_PLUGINS and needs:
            return needs
    return "a pylibjpeg plugin (pylibjpeg-libjpeg, pylibjpeg-openjpeg or pylibjpeg-rle)"


def _decode_deflated_frame(ds: Dataset, index: int, options: dict,
                           config: DicomConfig) -> tuple[np.ndarray, str]:
    # Deflated Image Frame Compression (2023) postdates pydicom 3.0: each frame is a raw
    # deflate stream of the native frame, so inflate it (capped) and unpack it as native data.
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel)
                * int(ds.BitsAllocated) + 7) // 8
    frame = get_frame(ds.PixelData, index, number_of_frames=options["number_of_frames"])
    native = _inflate(frame, min(expected + 1, config.max_inflated_bytes))[:expected]  # + pad
    if len(native) < expected:
        raise TruncatedPixelDataError(
            f"pixel data truncated: expected {expected} bytes, found {len(native)}")
    options = {**options, "number_of_frames": 1, "pixel_keyword": "PixelData"}
    arr, props = get_decoder(ExplicitVRLittleEndian).as_array(native, **options)
    return arr, str(props.get("photometric_interpretation", ds.PhotometricInterpretation))


def _decode_rle_1bit(ds: Dataset, index: int, n_frames: int) -> np.ndarray:
    # pydicom's RLE decoders refuse BitsAllocated 1 (segmentations); each frame is one
    # PackBits segment of the bit-packed frame, so decode it and unpack the bits here.
    rows, cols = int(ds.Rows), int(ds.Columns)
    frame = get_frame(ds.PixelData, index, number_of_frames=n_frames)
    offsets = np.frombuffer(frame[:64], "<u4")
    if len(offsets) < 2 or offsets[0] != 1 or not 64 <= offsets[1] <= len(frame):
        raise CorruptImageError("RLE frame header is invalid for 1-bit data")
    packed = _packbits_decode(frame[int(offsets[1]):], (rows * cols + 7) // 8)
    bits = unpack_bits(packed, as_array=True)[: rows * cols]
    return bits.reshape(rows, cols)


def _packbits_decode(src: bytes, expected: int) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(src) and len(out) < expected:
        n = src[pos]
        if n < 128:  # copy the next n + 1 bytes literally
            out += src[pos + 1: pos + n + 2]
            pos += n + 2
        elif n > 128:  # repeat the next byte 257 - n times
            out += src[pos + 1: pos + 2] * (257 - n)
            pos += 2
        else:
            pos += 1
    if len(out) < expected:
        raise TruncatedPixelDataError(
            f"pixel data truncated: expected {expected} bytes, found {len(out)}")
    return bytes(out[:expected])


# ---------------------------------------------------------------- values and LUTs


def frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The functional-group item (e.g. FrameVOILUTSequence) for a frame of an enhanced object."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index),
                      ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups) or []
        if i < len(items) and items[i].get(sequence):
            return items[i].get(sequence)[0]
    return None


def modality_values(arr: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Stored values -> modality values (e.g. HU): Modality LUT or rescale slope/intercept."""
    if _usable_lut(ds.get("ModalityLUTSequence")):
        return apply_modality_lut(arr, ds).astype(np.float32)
    source = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else (
        frame_item(ds, index, "PixelValueTransformationSequence") or ds)
    slope = _finite_float(source.get("RescaleSlope"), 1.0)
    intercept = _finite_float(source.get("RescaleIntercept"), 0.0)
    # float32 holds every 16-bit value exactly and halves the memory of float64 temporaries.
    values = arr.astype(np.float32)
    return values * np.float32(slope) + np.float32(intercept) if (slope, intercept) != (1, 0) \
        else values


def header_window(ds: Dataset, index: int) -> tuple[float, float, str] | None:
    """The first window (centre, width, function) in the header or the frame's VOI macro."""
    source = ds if "WindowCenter" in ds else frame_item(ds, index, "FrameVOILUTSequence")
    if source is None:
        return None
    centre = _finite_float(_first(source.get("WindowCenter")), None)
    width = _finite_float(_first(source.get("WindowWidth")), None)
    if centre is None or width is None or width <= 0:
        return None  # an unusable window falls back to the next VOI option
    function = str(source.get("VOILUTFunction") or "LINEAR").strip().upper()
    return centre, width, function


def voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first VOI LUT applied to modality values, scaled to [0, 1]; None when absent."""
    items = ds.get("VOILUTSequence")
    if not _usable_lut(items):
        return None  # absent, or an empty shell some writers leave behind
    item = items[0]
    n_entries, first_map = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    raw = item.LUTData
    if isinstance(raw, bytes):  # OW: 16-bit words in the dataset's byte order
        little = ds.original_encoding[1] is not False
        lut = np.frombuffer(raw[: 2 * n_entries], "<u2" if little else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(raw, dtype=np.float64))
    if lut.size == 0:
        return None
    lut = lut.astype(np.float64)
    # pydicom's apply_voi indexes in the LUT's own dtype, which wraps for 8-bit LUTs with
    # more than 256 entries; index in int64 instead.
    idx = np.clip(np.rint(values) - first_map, 0, lut.size - 1).astype(np.int64)
    out = lut[idx]
    lo, hi = lut.min(), lut.max()
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def _usable_lut(items) -> bool:
    if not items:
        return False
    descriptor, data = items[0].get("LUTDescriptor"), items[0].get("LUTData")
    return descriptor is not None and len(descriptor) == 3 and data is not None and len(data) > 0


def colour_luminance(arr: np.ndarray, ds: Dataset, photometric: str) -> tuple[np.ndarray, float]:
    """(luminance, full-scale value) for PALETTE COLOR, RGB and not-yet-converted YBR frames."""
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if _big_endian_lut(ds) and arr.dtype.itemsize == 2:
            arr = arr.byteswap()  # pydicom 3.0.2 reads big-endian OW LUT data as little-endian
        full = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
    else:
        full = float(2 ** int(ds.get("BitsStored") or ds.BitsAllocated) - 1)
    arr = arr.astype(np.float64)
    if photometric.startswith("YBR_FULL") or photometric.startswith("YBR_PARTIAL"):
        return arr[..., 0], full  # Y already is the luminance
    return arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114, full  # ITU-R 601


def _big_endian_lut(ds: Dataset) -> bool:
    return ds.original_encoding[1] is False and "RedPaletteColorLookupTableData" in ds


def _first(value):
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0] if len(value) else None
    return value


def _finite_float(value, default):
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if np.isfinite(result) else default
