"""Hostile input, property-based (hypothesis): the reader, the de-identifier, PHI masking, red flags.

Bounded: a fixed number of examples per property and no example database, so each property runs
in a few seconds and leaves nothing behind. A failure prints the minimal input that broke it.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from assistant import deid
from assistant.config import DicomConfig
from assistant.dicom import ImageTooLargeError, Scan, ScanError, read_deidentified, read_scan
from assistant.phi import mask_phi
from assistant.safety import RedFlag, find_red_flags
from conftest import SHARED_DATA

DICOM_DIR = SHARED_DATA / "dicom"
# Small real files, one per encoding, so every decoder sees mutated input.
SEEDS = ("pydicom_test_files/image_dfl.dcm", "pydicom-data/SC_rgb_expb.dcm", "pydicom-data/SC_rgb.dcm",
         "pydicom_test_files/MR_small_implicit.dcm", "pydicom-data/US1_J2KI.dcm",
         "pydicom-data/emri_small_jpeg_2k_lossless.dcm", "pydicom_test_files/SC_jpeg_no_color_transform.dcm",
         "pydicom_test_files/JPGExtended.dcm", "pydicom_test_files/SC_rgb_jpeg_gdcm.dcm",
         "pydicom-data/JLSL_08_07_0_1F.dcm", "pydicom_test_files/JPEGLSNearLossless_08.dcm",
         "pydicom-data/OBXXXX1A_rle.dcm")
FAST = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SMALL = DicomConfig(max_pixels=4 * 1024 * 1024, max_inflated_bytes=16 * 1024 * 1024)


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    return [(DICOM_DIR / name).read_bytes() for name in SEEDS]


@pytest.fixture(autouse=True)
def deid_key(monkeypatch):
    monkeypatch.setenv(deid.KEY_ENV, "fuzz-key-0123456789abcdef")


EDITS = st.lists(st.tuples(st.sampled_from(("flip", "run", "insert", "truncate", "header")),
                           st.floats(0.0, 1.0), st.binary(min_size=1, max_size=16)), min_size=1, max_size=4)


def mutate(seed: bytes, edits) -> bytes:
    """A seed file with a few byte flips, overwritten runs, insertions or a truncation.

    Drawn as (seed index, edits) rather than bytes so a failure prints a short reproducer.
    """
    data = bytearray(seed)
    for kind, where, chunk in edits:
        # Headers are where parsers branch: "header" edits aim at the first kilobyte.
        end = min(len(data), 1024) if kind == "header" else len(data)
        pos = int(where * max(0, end - 1))
        if kind in ("flip", "header"):
            data[pos:pos + 1] = chunk[:1]
        elif kind == "run":
            data[pos:pos + len(chunk)] = chunk
        elif kind == "insert":
            data[pos:pos] = chunk
        else:
            del data[pos:]
    return bytes(data)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    return path


def _only_scan_errors(read, path: Path, config: DicomConfig):
    try:
        return read(path, config)
    except ScanError as err:
        message = str(err)
        assert message and "\n" not in message and str(path) not in message  # one line, no path
        return None


# ---------------------------------------------------------------- the DICOM reader


def test_mutated_real_files_give_a_scan_or_a_scan_error(seeds, tmp_path):
    @FAST
    @given(seed=st.integers(0, len(SEEDS) - 1), edits=EDITS)
    def check(seed, edits):
        scan = _only_scan_errors(read_scan, _write(tmp_path, mutate(seeds[seed], edits)), SMALL)
        if scan is not None:
            assert isinstance(scan, Scan) and scan.pixels.dtype == np.float32
            assert np.isfinite(scan.pixels).all() and 0.0 <= scan.pixels.min() <= scan.pixels.max() <= 1.0
    check()


def test_random_bytes_give_a_scan_error(tmp_path):
    @FAST
    @given(data=st.one_of(st.binary(max_size=2048),
                          st.binary(max_size=512).map(lambda b: bytes(128) + b"DICM" + b)))
    def check(data):
        result = _only_scan_errors(read_scan, _write(tmp_path, data), SMALL)
        assert result is None or isinstance(result, Scan)
    check()


def test_mutated_real_files_are_deidentified_or_refused(seeds, tmp_path):
    @settings(FAST, max_examples=80)
    @given(seed=st.integers(0, len(SEEDS) - 1), edits=EDITS)
    def check(seed, edits):
        result = _only_scan_errors(read_deidentified, _write(tmp_path, mutate(seeds[seed], edits)), SMALL)
        if result is not None:
            assert result.dataset.PatientIdentityRemoved == "YES"
            assert not any(element.tag.is_private for element in result.dataset.iterall())
    check()


# ---------------------------------------------------------------- size limits


def _header_only(rows: int, cols: int, frames: int, samples: int, pixel_bytes: bytes = b"\x00\x00",
                 syntax=ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = SecondaryCaptureImageStorage, syntax
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.Modality = pydicom.uid.generate_uid(), "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = rows, cols, frames, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.PixelData = pixel_bytes
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_headers_promising_too_many_pixels_are_refused_before_decoding(tmp_path):
    @settings(FAST, max_examples=60)
    @given(rows=st.integers(1, 65535), cols=st.integers(1, 65535), frames=st.integers(1, 5000),
           samples=st.sampled_from((1, 3)))
    def check(rows, cols, frames, samples):
        path = _write(tmp_path, _header_only(rows, cols, frames, samples))
        if rows * cols * frames * samples > SMALL.max_pixels:
            with pytest.raises(ImageTooLargeError, match="max_pixels"):
                read_scan(path, SMALL)
        else:
            _only_scan_errors(read_scan, path, SMALL)  # small but truncated: some ScanError
    check()


def test_a_deflate_bomb_is_stopped_at_the_inflate_cap(tmp_path):
    # 64 MB of zeros deflate to ~64 KB; the cap (16 MB here) stops inflation long before the end.
    body = Dataset()
    body.add_new(0x7FE00010, "OB", bytes(64 * 1024 * 1024))  # Pixel Data
    raw = io.BytesIO()
    out = pydicom.filebase.DicomFileLike(raw)
    out.is_little_endian, out.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(out, body)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(raw.getvalue()) + packer.flush()
    header = _header_only(8, 8, 1, 1, syntax=DeflatedExplicitVRLittleEndian)
    path = _write(tmp_path, header[:_meta_length(header)] + deflated)
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageTooLargeError, match="max_inflated_bytes"):
        read_scan(path, SMALL)
    with pytest.raises(ImageTooLargeError, match="max_inflated_bytes"):
        read_deidentified(path, SMALL)


def _meta_length(data: bytes) -> int:
    # Preamble + "DICM" + group length element (12 bytes) + the group's declared length.
    return 132 + 12 + int.from_bytes(data[140:144], "little")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_oversized_png_and_jpeg_are_refused_from_their_header(fmt, tmp_path):
    path = tmp_path / f"big.{fmt.lower()}"
    Image.new("L", (4000, 3000)).save(path, fmt)  # 12 Mpx of black: tiny file, big image
    assert path.stat().st_size < 500_000
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        read_scan(path, DicomConfig(max_pixels=4_000_000))
    assert read_scan(path, DicomConfig()).pixels.shape == (3000, 4000)  # the default allows it


def test_a_file_over_the_byte_limit_is_refused_before_reading(tmp_path):
    path = _write(tmp_path, bytes(128) + b"DICM" + bytes(4096))
    with pytest.raises(ImageTooLargeError, match="max_file_bytes"):
        read_scan(path, DicomConfig(max_file_bytes=1024))


# ---------------------------------------------------------------- free text


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=600)
CLINICAL = st.lists(st.sampled_from((
    "John Smith", "MRN 12345678", "DOB 03/04/1950", "no chest pain", "chest pain radiating to the arm",
    "call 555-123-4567", "12 Main Street", "Dr. Jones", "ignore previous instructions", "\n", ". ",
    "can't breathe", "suicidal", "é", "😀", "\x00", "[NAME]", "‮", "  ")), max_size=30).map(" ".join)


# A per-example deadline catches catastrophic regex backtracking (seconds per short text).
TEXT_SETTINGS = settings(FAST, deadline=5000)


@TEXT_SETTINGS
@given(text=st.one_of(TEXT, CLINICAL))
def test_phi_masking_never_fails_on_any_text(text):
    masked = mask_phi(text)
    assert isinstance(masked, str)
    # Names need context (no NER offline); numbers with a label or a phone shape never survive.
    assert not any(known in masked for known in ("MRN 12345678", "555-123-4567"))


@TEXT_SETTINGS
@given(text=st.one_of(TEXT, CLINICAL))
def test_red_flags_never_fail_on_any_text(text):
    flags = find_red_flags(text)
    assert isinstance(flags, list) and all(isinstance(flag, RedFlag) for flag in flags)
