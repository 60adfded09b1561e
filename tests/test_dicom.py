"""Tests for assistant.dicom: the real DICOM corpus, synthetic pixel-level cases, hostile input, PHI."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, pack_bits
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from assistant import dicom
from assistant import dicom_pixels
from assistant.config import DicomConfig
from assistant.dicom import (
    WINDOW_PRESETS,
    CorruptImageError,
    ImageTooLargeError,
    NoPixelDataError,
    NotDicomError,
    Scan,
    ScanError,
    TruncatedPixelDataError,
    UnsupportedTransferSyntaxError,
    apply_window,
    group_studies,
    read_dicom,
    read_image,
    read_scan,
    to_uint8,
    window_scan,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
needs_corpus = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"DICOM test corpus not found at {DATA} (../shared/data/dicom)")
CORPUS = sorted(p for p in DATA.rglob("*") if p.is_file() and p.name != "MANIFEST.tsv") \
    if DATA.is_dir() else []
CHEST = {
    "j2k_cr": "pydicom-data/RG1_J2KI.dcm",  # MONOCHROME1 CR
    "jpegls_cr": "pylibjpeg-data/JPEGLS/RG1_JLSN.dcm",  # the same radiograph, JPEG-LS near-lossless
    "j2k_dx": "pylibjpeg-data/JPEG2000Lossless/966_fixed.dcm",
}


def _manifest() -> dict[str, str]:
    if not (DATA / "MANIFEST.tsv").is_file():
        return {}
    with open(DATA / "MANIFEST.tsv", newline="") as f:
        return {row["path"]: row["pixel_decode_pydicom302"]
                for row in csv.DictReader(f, delimiter="\t")}


MANIFEST = _manifest()


# ---------------------------------------------------------------- helpers


def write_dicom(path: Path, arr: np.ndarray | None, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, tsyntax=ExplicitVRLittleEndian, **tags) -> Path:
    """A minimal valid DICOM file (Part 10) with `arr` as pixel data and extra `tags`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = tags.pop("SOPClassUID", SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = tags.pop("SeriesInstanceUID", generate_uid())
    ds.Modality = tags.pop("Modality", "OT")
    if arr is not None:
        bits = bits_stored or (8 if arr.dtype.itemsize == 1 else 16)
        ds.set_pixel_data(arr, photometric, bits)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if tsyntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    else:
        ds.file_meta.TransferSyntaxUID = tsyntax
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 8, cols: int = 256, hi: int = 4095) -> np.ndarray:
    """Columns rise linearly from 0 to `hi`: column 0 is the minimum, the last the maximum."""
    return np.tile(np.linspace(0, hi, cols).round().astype(np.uint16), (rows, 1))


def assert_scan_ok(scan: Scan) -> None:
    assert isinstance(scan, Scan)
    assert scan.pixels.ndim == 2 and scan.pixels.dtype == np.float32
    assert scan.values.shape == scan.pixels.shape and scan.values.dtype == np.float32
    assert np.isfinite(scan.pixels).all() and np.isfinite(scan.values).all()
    assert scan.pixels.min() >= 0.0 and scan.pixels.max() <= 1.0
    assert 1 <= scan.pixels.shape[0] <= 65535 and 1 <= scan.pixels.shape[1] <= 65535
    assert 0 <= scan.frame_index < scan.n_frames


def assert_safe_message(exc: Exception, *forbidden: str) -> None:
    text = str(exc)
    assert text and "\n" not in text
    for item in forbidden:
        assert item not in text


# ---------------------------------------------------------------- the real corpus


@needs_corpus
@pytest.mark.parametrize("path", CORPUS, ids=lambda p: str(p.relative_to(DATA)))
def test_every_corpus_file_decodes_or_raises_a_scan_error(path: Path) -> None:
    expected = MANIFEST.get(str(path.relative_to(DATA)), "")
    try:
        scan = read_scan(path)
    except ScanError as exc:
        assert type(exc) is not ScanError  # always a specific subclass
        assert_safe_message(exc, str(path), path.name)
        # pydicom 3.0.2 alone decodes these: the reader must not do worse.
        assert not expected.startswith("ok"), f"pydicom decodes it but the reader raised {exc!r}"
        return
    assert_scan_ok(scan)
    assert scan.source_format == "dicom"


@needs_corpus
@pytest.mark.parametrize("name", CHEST.values(), ids=CHEST.keys())
def test_chest_radiographs_decode_bright_is_dense(name: str) -> None:
    scan = read_dicom(DATA / name)
    assert_scan_ok(scan)
    assert scan.modality in ("CR", "DX") and scan.photometric == "MONOCHROME1"
    assert min(scan.pixels.shape) > 1500
    h, w = scan.pixels.shape
    band = scan.pixels[int(0.3 * h): int(0.6 * h)]
    mediastinum = band[:, int(0.45 * w): int(0.55 * w)].mean()
    lung = band[:, int(0.2 * w): int(0.3 * w)].mean()
    assert mediastinum > lung + 0.1  # MONOCHROME1 inverted exactly once: dense is bright


@needs_corpus
def test_j2k_and_jpegls_copies_of_one_radiograph_agree() -> None:
    j2k, jls = read_dicom(DATA / CHEST["j2k_cr"]), read_dicom(DATA / CHEST["jpegls_cr"])
    assert j2k.pixels.shape == jls.pixels.shape
    assert np.abs(j2k.pixels - jls.pixels).mean() < 0.01


@needs_corpus
def test_monochrome1_window_roundtrip_on_real_radiograph() -> None:
    scan = read_dicom(DATA / CHEST["j2k_cr"])
    assert scan.window is not None
    np.testing.assert_allclose(scan.pixels, 1.0 - apply_window(scan.values, *scan.window),
                               atol=1e-6)
    np.testing.assert_allclose(window_scan(scan, scan.window).pixels, scan.pixels, atol=1e-6)


@needs_corpus
@pytest.mark.parametrize("name, error", [
    ("pydicom_test_files/MR_truncated.dcm", TruncatedPixelDataError),
    ("pydicom_test_files/rtplan.dcm", NoPixelDataError),
    ("pydicom_test_files/rtstruct.dcm", NoPixelDataError),
    ("pydicom_test_files/test-SR.dcm", NoPixelDataError),
    ("pydicom_test_files/dicomdirtests/DICOMDIR", NoPixelDataError),
    ("pydicom_test_files/README.txt", NotDicomError),
    ("pydicom_test_files/zipMR.gz", NotDicomError),
    ("pydicom_test_files/badVR.dcm", CorruptImageError),
    ("pydicom_test_files/nested_priv_SQ.dcm", CorruptImageError),
    ("pydicom_test_files/JPEG2000-embedded-sequence-delimiter.dcm", CorruptImageError),
])
def test_broken_corpus_files_raise_the_specific_error(name: str, error: type) -> None:
    with pytest.raises(error):
        read_scan(DATA / name)


@needs_corpus
def test_truncated_message_names_both_lengths() -> None:
    with pytest.raises(TruncatedPixelDataError, match=r"expected 8192 bytes, found 8130"):
        read_dicom(DATA / "pydicom_test_files/MR_truncated.dcm")


@needs_corpus
@pytest.mark.parametrize("codec", ["deflate", "rle", "j2k"])
@pytest.mark.parametrize("stem", ["liver", "liver_nonbyte_aligned"])
def test_segmentation_variants_match_the_uncompressed_original(stem: str, codec: str) -> None:
    # 1-bit, 3 frames: Deflated Image Frame Compression and 1-bit RLE are decoded by the reader
    # itself (pydicom 3.0 cannot); both must match the uncompressed original bit for bit.
    original, variant = DATA / f"pydicom-data/{stem}.dcm", DATA / f"pydicom-data/{stem}_{codec}.dcm"
    for frame in range(3):
        scan = read_dicom(variant, frame=frame)
        np.testing.assert_array_equal(scan.values, read_dicom(original, frame=frame).values)
        assert scan.values.max() == 1.0


LOSSLESS_TWINS = {
    "pydicom-data/OBXXXX1A.dcm": ["pydicom-data/OBXXXX1A_expb.dcm", "pydicom-data/OBXXXX1A_rle.dcm"],
    "pydicom-data/gdcm-US-ALOKA-16.dcm": ["pydicom-data/gdcm-US-ALOKA-16_big.dcm"],
    "pydicom-data/SC_rgb.dcm": ["pydicom-data/SC_rgb_expb.dcm", "pydicom_test_files/SC_rgb_rle.dcm"],
    "pydicom-data/emri_small.dcm": [
        "pydicom-data/emri_small_big_endian.dcm", "pydicom-data/emri_small_RLE.dcm",
        "pydicom-data/emri_small_jpeg_2k_lossless.dcm", "pydicom-data/emri_small_jpeg_ls_lossless.dcm"],
    "pydicom_test_files/MR_small.dcm": [
        "pydicom_test_files/MR_small_bigendian.dcm", "pydicom_test_files/MR_small_expb.dcm",
        "pydicom_test_files/MR_small_implicit.dcm", "pydicom_test_files/MR_small_RLE.dcm",
        "pydicom_test_files/MR_small_jp2klossless.dcm",
        "pydicom_test_files/MR_small_jpeg_ls_lossless.dcm"],
    "pydicom_test_files/rtdose.dcm": ["pydicom_test_files/rtdose_expb.dcm",
                                      "pydicom_test_files/rtdose_rle.dcm"],
    "pydicom-data/693_UNCR.dcm": ["pydicom-data/693_J2KR.dcm"],
    "pydicom-data/MR2_UNCR.dcm": ["pydicom-data/MR2_J2KR.dcm"],
    "pydicom-data/US1_UNCR.dcm": ["pydicom-data/US1_J2KR.dcm"],
}


@needs_corpus
@pytest.mark.parametrize("original, twin", [(o, t) for o, ts in LOSSLESS_TWINS.items() for t in ts])
def test_lossless_encodings_of_one_image_agree(original: str, twin: str) -> None:
    # Byte order, VR encoding and lossless codecs must not change a single value.
    a, b = read_dicom(DATA / original), read_dicom(DATA / twin)
    np.testing.assert_allclose(b.values, a.values, atol=1e-3)
    np.testing.assert_allclose(b.pixels, a.pixels, atol=1e-6)


@needs_corpus
def test_deflated_dataset_is_inflated_under_a_cap() -> None:
    path = DATA / "pydicom_test_files/image_dfl.dcm"  # Deflated Explicit VR Little Endian
    assert_scan_ok(read_dicom(path))
    with pytest.raises(ImageTooLargeError, match="max_inflated_bytes"):
        read_dicom(path, DicomConfig(max_inflated_bytes=10_000))


# ---------------------------------------------------------------- synthetic: values and display


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_monochrome_ramp_orientation(tmp_path: Path, photometric: str) -> None:
    arr = ramp()
    scan = read_dicom(write_dicom(tmp_path / "r.dcm", arr, photometric, 12))
    np.testing.assert_array_equal(scan.values, arr)  # values are never inverted
    expected = arr / 4095.0
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected  # low stored value = bright
    np.testing.assert_allclose(scan.pixels, expected, atol=1e-6)
    assert scan.window is None and scan.photometric == photometric
    assert to_uint8(scan)[0, 0] == (255 if photometric == "MONOCHROME1" else 0)


def test_monochrome1_with_header_window_inverts_once(tmp_path: Path) -> None:
    arr = ramp(hi=99, cols=100)
    scan = read_dicom(write_dicom(tmp_path / "w.dcm", arr, "MONOCHROME1", 12,
                                  WindowCenter=50, WindowWidth=100))
    np.testing.assert_allclose(scan.pixels, 1.0 - arr / 99.0, atol=1e-6)
    np.testing.assert_allclose(window_scan(scan, (50, 100)).pixels, scan.pixels, atol=1e-6)


def test_rescale_slope_intercept(tmp_path: Path) -> None:
    arr = ramp(hi=1000)
    scan = read_dicom(write_dicom(tmp_path / "ct.dcm", arr, bits_stored=12, Modality="CT",
                                  SOPClassUID=CTImageStorage, RescaleSlope=2,
                                  RescaleIntercept=-1024))
    np.testing.assert_allclose(scan.values, arr * 2.0 - 1024.0)
    assert scan.modality == "CT"


def test_header_window_follows_dicom_linear_formula(tmp_path: Path) -> None:
    arr = np.tile(np.arange(-50, 150, dtype=np.int16), (4, 1))
    scan = read_dicom(write_dicom(tmp_path / "w.dcm", arr, bits_stored=16, WindowCenter=50,
                                  WindowWidth=100))
    x = arr.astype(np.float64)
    # PS3.3 C.11.2.1.2.1 with c=50, w=100: 0 at x <= 0, 1 at x > 99, linear between.
    np.testing.assert_allclose(scan.pixels, np.clip(x / 99.0, 0, 1), atol=1e-6)
    assert scan.window == (50.0, 100.0)


def test_window_centre_maps_to_half_and_edges_clip() -> None:
    values = np.array([[-1000.0, 49.5, 1000.0]])
    np.testing.assert_allclose(apply_window(values, 50, 100), [[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(apply_window(values, 50, 100, function="LINEAR_EXACT")[0, 1],
                               0.495, atol=1e-6)
    with pytest.raises(ValueError):
        apply_window(values, 50, 0)


@pytest.mark.parametrize("preset", sorted(WINDOW_PRESETS))
def test_window_presets_on_hu_values(tmp_path: Path, preset: str) -> None:
    stored = np.tile(np.arange(0, 3001, 3, dtype=np.uint16), (4, 1))  # -1024 .. 1976 HU
    scan = read_dicom(write_dicom(tmp_path / "ct.dcm", stored, bits_stored=12, Modality="CT",
                                  RescaleIntercept=-1024, RescaleSlope=1))
    centre, width = WINDOW_PRESETS[preset]
    windowed = window_scan(scan, preset)
    assert windowed.window == (centre, width) and scan.window is None  # a new Scan
    np.testing.assert_allclose(windowed.pixels, apply_window(scan.values, centre, width))
    hu = scan.values[0]
    assert np.all(windowed.pixels[0][hu < centre - width / 2 - 1] == 0.0)
    assert np.all(windowed.pixels[0][hu > centre + width / 2 + 1] == 1.0)
    near = np.argmin(np.abs(hu - centre))
    assert abs(windowed.pixels[0, near] - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown window preset"):
        window_scan(scan, "brain-ish")


def test_voi_lut_sequence_is_used_without_window(tmp_path: Path) -> None:
    arr = ramp(hi=255, cols=256)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", [255 - i for i in range(256)])  # an inverting VOI LUT
    path = write_dicom(tmp_path / "lut.dcm", arr, bits_stored=8, VOILUTSequence=[item])
    scan = read_dicom(path)
    np.testing.assert_allclose(scan.pixels, 1.0 - arr / 255.0, atol=1e-6)


def test_header_window_missing_the_data_falls_back_to_min_max(tmp_path: Path) -> None:
    arr = ramp(hi=4095) + 30000
    scan = read_dicom(write_dicom(tmp_path / "w.dcm", arr, bits_stored=16, WindowCenter=100,
                                  WindowWidth=50))
    assert scan.window is None and scan.pixels.min() == 0.0 and scan.pixels.max() == 1.0


# ---------------------------------------------------------------- synthetic: frames and formats


def _frames(n: int = 5) -> np.ndarray:
    return np.stack([ramp(4, 16, 100) + 1000 * k for k in range(n)])


@pytest.mark.parametrize("tsyntax", [ExplicitVRLittleEndian, RLELossless])
def test_multiframe_choice(tmp_path: Path, tsyntax) -> None:
    path = write_dicom(tmp_path / "mf.dcm", _frames(), bits_stored=16, tsyntax=tsyntax)
    default = read_dicom(path)
    assert (default.frame_index, default.n_frames) == (2, 5)
    assert default.values.min() == 2000
    assert read_dicom(path, frame=0).values.min() == 0
    assert read_dicom(path, DicomConfig(frame=4)).values.min() == 4000
    assert read_dicom(path, DicomConfig(frame=4), frame=1).frame_index == 1
    for bad in (5, -1):
        with pytest.raises(ScanError, match="out of range"):
            read_dicom(path, frame=bad)


def test_one_bit_pixels(tmp_path: Path) -> None:
    mask = np.zeros((10, 13), dtype=np.uint8)  # 130 bits: not a whole number of bytes
    mask[2:7, 3:9] = 1
    path = write_dicom(tmp_path / "bits.dcm", None, SOPClassUID=SecondaryCaptureImageStorage,
                       Rows=10, Columns=13, SamplesPerPixel=1, BitsAllocated=1, BitsStored=1,
                       HighBit=0, PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2",
                       PixelData=pack_bits(mask))
    scan = read_dicom(path)
    np.testing.assert_array_equal(scan.pixels, mask.astype(np.float32))


def test_float_pixels_with_non_finite_values(tmp_path: Path) -> None:
    data = np.linspace(-1.0, 3.0, 64, dtype=np.float32).reshape(8, 8)
    data[0, 0], data[0, 1], data[0, 2] = np.nan, np.inf, -np.inf
    path = write_dicom(tmp_path / "f.dcm", None, Rows=8, Columns=8, SamplesPerPixel=1,
                       BitsAllocated=32, PhotometricInterpretation="MONOCHROME2",
                       FloatPixelData=data.tobytes())
    scan = read_dicom(path)
    assert_scan_ok(scan)
    np.testing.assert_allclose(scan.values[1:], data[1:])
    assert scan.values[0, 1] == data[np.isfinite(data)].max()


def test_palette_colour_becomes_luminance(tmp_path: Path) -> None:
    index = ramp(4, 256, 255).astype(np.uint8)
    lut = (np.arange(256) * 257).astype(np.uint16)
    zeros = np.zeros(256, np.uint16)
    tags = {}
    for colour, data in (("Red", lut), ("Green", zeros), ("Blue", zeros)):
        tags[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        tags[f"{colour}PaletteColorLookupTableData"] = data.tobytes()
    scan = read_dicom(write_dicom(tmp_path / "pal.dcm", index, "PALETTE COLOR", 8, **tags))
    np.testing.assert_allclose(scan.pixels, 0.299 * index / 255.0, atol=1e-4)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_becomes_luminance(tmp_path: Path, photometric: str) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    scan = read_dicom(write_dicom(tmp_path / "c.dcm", stored, photometric, 8))
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0
    np.testing.assert_allclose(scan.pixels, expected, atol=2 / 255)


def test_png_and_jpeg_input(tmp_path: Path) -> None:
    gray = np.tile(np.arange(256, dtype=np.uint8), (32, 1))
    Image.fromarray(gray).save(tmp_path / "g.png")
    png = read_scan(tmp_path / "g.png")
    assert png.source_format == "png" and png.study_key is None
    np.testing.assert_allclose(png.pixels, gray / 255.0, atol=1e-6)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "g.jpg", quality=95)
    jpeg = read_image(tmp_path / "g.jpg")
    assert jpeg.source_format == "jpeg"
    assert np.abs(jpeg.pixels - gray / 255.0).mean() < 0.02
    deep = (np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (8, 1)))
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_allclose(read_scan(tmp_path / "d.png").pixels, deep / 65535.0, atol=1e-6)


def test_dicom_without_preamble_is_still_read(tmp_path: Path) -> None:
    full = write_dicom(tmp_path / "p.dcm", ramp(), bits_stored=12).read_bytes()
    bare = tmp_path / "bare"
    bare.write_bytes(full[132:])  # no preamble, no DICM: only the file meta and dataset
    np.testing.assert_array_equal(read_scan(bare).values, ramp())


# ---------------------------------------------------------------- hostile and broken input


def test_non_dicom_inputs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("Patient was seen today.\n" * 20)
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    with pytest.raises(NotDicomError):
        read_scan(tmp_path / "notes.txt")
    with pytest.raises(NotDicomError):
        read_scan(tmp_path / "random.bin")
    with pytest.raises(NotDicomError, match="empty"):
        read_scan(tmp_path / "empty.dcm")
    with pytest.raises(ScanError):
        read_scan(tmp_path / "junk.dcm")
    with pytest.raises(ScanError, match="directory"):
        read_scan(tmp_path)
    with pytest.raises(ScanError, match="file not found") as info:
        read_scan(tmp_path / "missing-Doe^John.dcm")
    assert_safe_message(info.value, "Doe", str(tmp_path))
    with pytest.raises(CorruptImageError):
        read_image(tmp_path / "notes.txt")


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7, 0.99])
def test_truncated_copies_raise_scan_errors(tmp_path: Path, fraction: float) -> None:
    source = write_dicom(tmp_path / "full.dcm", ramp(64, 64), bits_stored=12)
    data = source.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ScanError) as info:
        read_scan(cut)
    if fraction >= 0.7:  # the cut falls inside the pixel data
        assert isinstance(info.value, TruncatedPixelDataError)
    for name in ("cut.png", "cut.jpg"):
        Image.fromarray(ramp(64, 64, 255).astype(np.uint8)).save(tmp_path / name)
        half = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(half[: len(half) // 2])
        with pytest.raises(CorruptImageError):
            read_scan(tmp_path / name)


@needs_corpus
def test_truncated_copy_of_a_real_compressed_file(tmp_path: Path) -> None:
    data = (DATA / "pydicom_test_files/MR_small_jp2klossless.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 400])
    with pytest.raises(ScanError):
        read_scan(tmp_path / "cut.dcm")


def test_oversize_rejected_before_decoding(tmp_path: Path, monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded despite the size limit")

    monkeypatch.setattr(dicom_pixels, "decode_frame", no_decoding)
    monkeypatch.setattr(dicom, "_pil_gray", no_decoding)
    tiny = DicomConfig(max_pixels=100)
    path = write_dicom(tmp_path / "big.dcm", ramp(), bits_stored=12)
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        read_dicom(path, tiny)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        read_scan(tmp_path / "big.png", tiny)
    with pytest.raises(ImageTooLargeError, match="max_file_bytes"):
        read_scan(path, DicomConfig(max_file_bytes=1000))


def test_deflate_bomb_is_capped(tmp_path: Path) -> None:
    zeros = np.zeros((1000, 1000), np.uint16)  # 2 MB that deflates to a few KB
    path = write_dicom(tmp_path / "bomb.dcm", zeros, bits_stored=16,
                       tsyntax=DeflatedExplicitVRLittleEndian)
    assert path.stat().st_size < 20_000
    with pytest.raises(ImageTooLargeError, match="max_inflated_bytes"):
        read_scan(path, DicomConfig(max_inflated_bytes=1_000_000))
    assert read_scan(path).pixels.shape == (1000, 1000)


def _jpeg_dicom(path: Path, arr: np.ndarray) -> Path:
    """A JPEG Baseline DICOM made from Pillow's encoder (pydicom 3.0 has no JPEG encoder)."""
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
    write_dicom(path, arr, bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _patch_codestream(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_codestream_claiming_huge_dimensions_is_not_decoded(tmp_path: Path, monkeypatch) -> None:
    arr = ramp(64, 64, 255).astype(np.uint8)
    jpeg = _jpeg_dicom(tmp_path / "jpeg.dcm", arr)
    np.testing.assert_allclose(read_dicom(jpeg).values, arr, atol=4)
    j2k = write_dicom(tmp_path / "j2k.dcm", arr, bits_stored=8)
    ds = pydicom.dcmread(j2k)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(j2k, enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom(j2k).values, arr)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoder reached")

    monkeypatch.setattr(dicom_pixels, "decoding_plugins", no_decoding)
    # JPEG SOF0: precision 8, then rows and columns (64 x 64 -> 60000 x 60000).
    _patch_codestream(jpeg, b"\xff\xc0\x00\x0b\x08\x00\x40\x00\x40",
                      b"\xff\xc0\x00\x0b\x08\xea\x60\xea\x60")
    # JPEG 2000 SIZ: Xsiz and Ysiz follow Lsiz and Rsiz.
    siz = pydicom.dcmread(j2k).PixelData
    at = siz.find(b"\xff\x4f\xff\x51") + 8
    _patch_codestream(j2k, siz[at - 8: at + 8], siz[at - 8: at] + b"\x00\x00\xea\x60" * 2)
    for path in (jpeg, j2k):
        with pytest.raises(CorruptImageError, match="decompression bomb"):
            read_dicom(path)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each broken file
def test_mutated_files_only_ever_raise_scan_errors(tmp_path: Path) -> None:
    # A seeded mini-fuzz over every code path's input: native, RLE (a Rust decoder that
    # panics with a BaseException on some input), deflated, JPEG, JPEG 2000, PNG.
    arr = ramp(32, 32, 255).astype(np.uint8)
    sources = [write_dicom(tmp_path / "n.dcm", _frames(3), bits_stored=16),
               write_dicom(tmp_path / "r.dcm", _frames(3), bits_stored=16, tsyntax=RLELossless),
               write_dicom(tmp_path / "d.dcm", arr, tsyntax=DeflatedExplicitVRLittleEndian),
               _jpeg_dicom(tmp_path / "j.dcm", arr)]
    Image.fromarray(arr).save(tmp_path / "p.png")
    blobs = [p.read_bytes() for p in sources] + [(tmp_path / "p.png").read_bytes()]
    rng = np.random.default_rng(1234)
    case = tmp_path / "case"
    for _ in range(400):
        data = bytearray(blobs[rng.integers(len(blobs))])
        if rng.random() < 0.5:
            data = data[: rng.integers(1, len(data))]
        for at in rng.integers(0, len(data), rng.integers(1, 12)):
            data[at] = rng.integers(256)
        case.write_bytes(bytes(data))
        try:
            assert_scan_ok(read_scan(case, DicomConfig(max_pixels=1_000_000)))
        except ScanError as exc:
            assert_safe_message(exc, str(tmp_path))


def test_rust_decoder_panic_is_a_scan_error(tmp_path: Path) -> None:
    # pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on a segment that runs past
    # the frame; it must surface as a ScanError and still let pydicom's RLE decoder try.
    # A short first segment (pydicom's decoder rejects it) and a 128-byte literal run for a
    # 16-pixel frame (pylibjpeg-rle panics on it).
    short, long = bytes([0x03]) + bytes(4), bytes([0x7F]) + bytes(128)
    header = struct.pack("<16I", 2, 64, 64 + len(short), *([0] * 13))
    path = write_dicom(tmp_path / "rle.dcm", np.zeros((4, 4), np.uint16), bits_stored=16)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = pydicom.encaps.encapsulate([header + short + long])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CorruptImageError):
        read_dicom(path)


def test_unknown_transfer_syntax_is_unsupported(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "video.dcm", ramp(), bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedTransferSyntaxError, match="unsupported transfer syntax"):
        read_dicom(path)


def test_gdcm_is_never_among_the_plugins_tried() -> None:
    class FakeDecoder:
        UID = pydicom.uid.JPEGBaseline8Bit
        available_plugins = ("gdcm", "pillow", "pylibjpeg")  # pydicom sorts them by name
        missing_dependencies: list[str] = []

    assert dicom_pixels.decoding_plugins(FakeDecoder()) == ["pylibjpeg", "pillow"]
    FakeDecoder.available_plugins = ("pydicom", "pylibjpeg")  # RLE
    assert dicom_pixels.decoding_plugins(FakeDecoder()) == ["pylibjpeg", "pydicom"]
    FakeDecoder.available_plugins = ("gdcm",)
    FakeDecoder.missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and "
                                        "pylibjpeg-libjpeg>=2.1"]
    with pytest.raises(UnsupportedTransferSyntaxError, match="install pylibjpeg>=2.0"):
        dicom_pixels.decoding_plugins(FakeDecoder())


def test_only_scan_errors_escape_for_odd_arguments(tmp_path: Path) -> None:
    with pytest.raises(ScanError):
        read_scan(3)  # an int would otherwise open a file descriptor
    path = write_dicom(tmp_path / "x.dcm", ramp(), bits_stored=12)
    with pytest.raises(ScanError):
        read_dicom(path, frame="2")


# ---------------------------------------------------------------- PHI


CANARIES = {
    "PatientName": "CANARYSURNAME^CANARYGIVEN",
    "PatientID": "CANARY-PID-4711",
    "PatientBirthDate": "19010203",
    "InstitutionName": "CANARY GENERAL HOSPITAL",
    "AccessionNumber": "CANARYACC99",
}


def _phi_copy(tmp_path: Path, source: Path | None) -> tuple[Path, Dataset]:
    if source is None:  # no corpus: a synthetic file stands in for the real one
        source = write_dicom(tmp_path / "src.dcm", ramp(), bits_stored=12)
    ds = pydicom.dcmread(source)
    for keyword, value in CANARIES.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{CANARIES['PatientID']}_{CANARIES['PatientName']}.dcm"
    ds.save_as(path)
    return path, ds


def test_no_patient_identifier_leaves_the_reader(tmp_path: Path, caplog) -> None:
    real = DATA / "pydicom_test_files/CT_small.dcm"
    path, ds = _phi_copy(tmp_path, real if real.is_file() else None)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = read_scan(path)
        again = read_scan(path)
    texts = [repr(scan), *caplog.messages, *(str(w.message) for w in caught)]
    texts += [str(getattr(scan, f.name)) for f in dataclasses.fields(scan)
              if not isinstance(getattr(scan, f.name), np.ndarray)]
    for canary in [*CANARIES.values(), *CANARIES["PatientName"].split("^"),
                   str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]:
        assert not any(canary in text for text in texts), canary
    for f in dataclasses.fields(scan):
        assert isinstance(getattr(scan, f.name), (np.ndarray, str, int, tuple, type(None)))
    assert scan.study_key.startswith("2.25.") and scan.study_key != ds.StudyInstanceUID
    assert scan.study_key == again.study_key and scan.series_key != scan.study_key
    assert len(scan.study_key) <= 64  # still a valid UID


def test_error_messages_hold_no_identifiers(tmp_path: Path) -> None:
    path, _ = _phi_copy(tmp_path, None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ScanError) as info:
        read_scan(path)
    assert_safe_message(info.value, *CANARIES.values(), path.name, str(tmp_path))
    # No chained pydicom/OS exception (whose text may hold identifiers) reaches a traceback.
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_code_string_fields_drop_free_text(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "v.dcm", ramp(), bits_stored=12, ViewPosition="pa",
                       BodyPartExamined="Chest of Mr. Smith", ImageLaterality="L")
    scan = read_dicom(path)
    assert (scan.view_position, scan.body_part, scan.laterality) == ("PA", None, "L")


# ---------------------------------------------------------------- grouping and import hygiene


def test_group_studies_by_study_then_view() -> None:
    base = Scan(pixels=np.zeros((2, 2), np.float32), values=np.zeros((2, 2), np.float32),
                modality="CR", body_part="CHEST", view_position=None, laterality=None,
                photometric="MONOCHROME2", frame_index=0, n_frames=1, source_format="dicom",
                study_key="2.25.1", series_key=None, window=None)
    scans = [dataclasses.replace(base, view_position=v, study_key=k) for k, v in [
        ("2.25.1", "PA"), ("2.25.2", "AP"), ("2.25.1", "LL"), ("2.25.1", "LATERAL"),
        ("2.25.1", None), (None, "PA"), (None, "LL"), ("2.25.1", "AP")]]
    studies = group_studies(scans)
    assert [s.study_key for s in studies] == ["2.25.1", "2.25.2", None, None]
    first = studies[0]
    assert [s.view_position for s in first.frontal] == ["PA", "AP"]
    assert [s.view_position for s in first.lateral] == ["LL", "LATERAL"]
    assert [s.view_position for s in first.other] == [None]
    assert group_studies([]) == []


def test_dicom_module_does_not_import_torch() -> None:
    code = "import sys, assistant.dicom; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-500:]
