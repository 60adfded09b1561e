"""DICOM de-identification (PS3.15 basic profile) on the real files in ../shared/data/dicom.

Canary PHI is injected into copies of real radiographs and must not survive anywhere in the
de-identified bytes, in warnings or in logs; every file of the corpus is handled; UIDs stay
consistent within a study; pixel data is unchanged; the SR for the PACS attaches to the real study.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from assistant import deid
from assistant.config import DicomConfig
from assistant.dicom import ScanError, read_deidentified, read_scan, read_study_identity
from assistant.export import for_pacs, to_dicom_sr
from assistant.safety import label_draft
from assistant.store import Store
from conftest import CHEST_DICOM, CHEST_DICOM_MONO1, SHARED_DATA

DICOM_DIR = SHARED_DATA / "dicom"
KEY = b"unit-test-key-0123456789abcdef"
CANARIES = {  # keyword -> injected value; none may survive in any form
    "PatientName": "Canaryson^Janet^Q", "PatientID": "MRN-CANARY-4711", "PatientBirthDate": "19470312",
    "PatientAddress": "12 Canary Wharf Road", "OtherPatientIDs": "OTHERCANARY99",
    "AccessionNumber": "ACCCANARY42", "InstitutionName": "Canary General Hospital",
    "ReferringPhysicianName": "Drcanary^Referrer", "OperatorsName": "Techcanary^Op",
    "StudyDescription": "CXR for Janet Canaryson", "ImageComments": "pt Janet Canaryson MRN-CANARY-4711",
    "StudyID": "SIDCANARY7", "PatientTelephoneNumbers": "555-0199-CANARY",
}
# The canary tokens a leak would show (names, ids, dates), searched case-insensitively.
TOKENS = ("canary", "19470312", "4711", "555-0199")


@pytest.fixture(autouse=True)
def deid_key(monkeypatch):
    monkeypatch.setenv(deid.KEY_ENV, KEY.decode())


def corpus_files() -> list[Path]:
    return sorted(p for p in DICOM_DIR.rglob("*") if p.is_file() and p.suffix not in (".tsv", ".md", ".txt"))


def with_canaries(src: Path, dst: Path, **extra) -> Path:
    """A copy of a real file carrying canary PHI at the top level, in a sequence and in a private tag."""
    ds = pydicom.dcmread(src)
    for keyword, value in {**CANARIES, **extra}.items():
        setattr(ds, keyword, value)
    request = Dataset()
    request.AccessionNumber, request.RequestedProcedureDescription = "ACCCANARY42", "canary request"
    request.StudyInstanceUID = ds.StudyInstanceUID
    ds.RequestAttributesSequence = [request]
    ds.private_block(0x0029, "CANARY CORP", create=True).add_new(0x10, "LO", "Canaryson private")
    ds.save_as(dst)
    return dst


def dataset_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    return buffer.getvalue()


def walk(ds: Dataset):
    for element in ds.iterall():
        yield element


# ---------------------------------------------------------------- the profile on every corpus file


def test_every_corpus_file_is_deidentified_or_refused_with_a_scan_error():
    files = corpus_files()
    assert len(files) >= 250
    done = 0
    for path in files:
        try:
            result = read_deidentified(path)
        except ScanError:
            continue
        done += 1
        _assert_profile_applied(result.dataset, path)
    assert done >= 250  # only the non-DICOM and hopelessly broken files are refused


def _assert_profile_applied(ds: Dataset, path: Path) -> None:
    dummies = {str(v) for v in deid._DUMMY.values()} | {"0", ""}
    for element in walk(ds):
        assert not element.tag.is_private, f"{path.name}: private tag {element.tag} survived"
        action = deid.profile_action(element.tag)
        if action is None or element.VR == "SQ":
            continue
        assert action != "X", f"{path.name}: {element.keyword or element.tag} (X) survived"
        value = element.value
        values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            text = "" if v is None else str(v)
            ok = (text in dummies or text.startswith("ANON-") or text.startswith("2.25.")
                  or isinstance(v, (int, float)) and v == 0
                  or isinstance(v, bytes) and not v.strip(b"\x00"))
            assert ok, f"{path.name}: {element.keyword or element.tag} ({action}) kept a value"
    assert ds.PatientIdentityRemoved == "YES"
    assert list(ds.DeidentificationMethod) == list(deid.METHOD)
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


@pytest.mark.parametrize("src", [CHEST_DICOM, CHEST_DICOM_MONO1,
                                 DICOM_DIR / "pylibjpeg-data" / "JPEGLS" / "RG1_JLSN.dcm",
                                 DICOM_DIR / "pydicom-data" / "693_UNCI.dcm"])
def test_injected_phi_survives_nowhere_in_the_deidentified_bytes(src, tmp_path):
    original = with_canaries(src, tmp_path / "in.dcm")
    assert b"Canaryson" in original.read_bytes()  # the canaries really are there before
    result = read_deidentified(original)
    out = dataset_bytes(result.dataset).lower()
    for token in TOKENS:
        assert token.encode() not in out, f"{token!r} leaked"
    source = pydicom.dcmread(original)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert str(source[keyword].value).encode() not in out  # every instance UID is remapped
    assert result.dataset.file_meta.MediaStorageSOPInstanceUID == result.dataset.SOPInstanceUID
    assert result.dataset.preamble == bytes(128)
    assert result.counts["removed"] >= 5 and result.counts["uid"] >= 3


def test_free_text_outside_the_table_is_cleaned_with_the_objects_own_identifiers(tmp_path):
    src = with_canaries(CHEST_DICOM, tmp_path / "in.dcm")
    ds = pydicom.dcmread(src)
    item = Dataset()  # an SR-style text item: Text Value is not in E.1-1, so only "C" catches it
    item.TextValue = "Seen with Janet Canaryson (MRN-CANARY-4711) on 03/12/2024."
    ds.ContentSequence = [item]
    ds.save_as(src)
    text = str(read_deidentified(src).dataset.ContentSequence[0].TextValue)
    assert "Canaryson" not in text and "4711" not in text and "03/12/2024" not in text
    assert text.startswith("Seen with")


def test_nothing_identifying_reaches_warnings_or_logs(tmp_path, caplog):
    # A malformed UID makes pydicom's validation warn with the value quoted; the de-identifier
    # must never convert such a value.
    src = with_canaries(CHEST_DICOM, tmp_path / "in.dcm")
    raw = src.read_bytes()
    ds = pydicom.dcmread(src)
    bad = raw.replace(str(ds.StudyInstanceUID).encode(), b"1.2.CANARY.9"[: len(str(ds.StudyInstanceUID))]
                      .ljust(len(str(ds.StudyInstanceUID)), b"9"))
    src.write_bytes(bad)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        read_deidentified(src)
        read_scan(src)
    said = " ".join(str(w.message) for w in caught) + caplog.text
    for token in TOKENS:
        assert token not in said.lower()


# ---------------------------------------------------------------- UIDs


STUDIES = {
    "CT 693": ["pydicom-data/693_J2KR.dcm", "pydicom-data/693_UNCI.dcm", "pydicom-data/693_UNCR.dcm"],
    "MR2": ["pydicom-data/MR2_J2KI.dcm", "pydicom-data/MR2_J2KR.dcm", "pydicom-data/MR2_UNCI.dcm"],
    "RG1": ["pydicom-data/RG1_J2KI.dcm", "pylibjpeg-data/JPEGLS/RG1_JLSN.dcm"],
}


@pytest.mark.parametrize("name", STUDIES)
def test_uids_are_consistent_across_the_files_of_one_study(name):
    files = [DICOM_DIR / f for f in STUDIES[name]]
    originals = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    results = [read_deidentified(f).dataset for f in files]
    study_uids = {str(r.StudyInstanceUID) for r in results}
    assert len(study_uids) == 1 and study_uids != {str(originals[0].StudyInstanceUID)}
    for original, result, path in zip(originals, results, files):
        assert read_scan(path).study_key == str(result.StudyInstanceUID)  # reader and copy agree
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if keyword in original:
                assert str(result[keyword].value) == deid.remap_uid(str(original[keyword].value), KEY)
        assert result.SOPClassUID == original.SOPClassUID  # class UIDs name no instance
        assert len(str(result.StudyInstanceUID)) <= 64


def test_remapped_uids_are_keyed_stable_and_valid():
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    first, again, other = deid.remap_uid(uid, KEY), deid.remap_uid(uid, KEY), deid.remap_uid(uid, b"x" * 32)
    assert first == again and first != other and first.startswith("2.25.")
    assert pydicom.uid.UID(first).is_valid and len(first) <= 64
    assert deid.remap_uid(uid + "1", KEY) != first


def test_references_between_files_stay_consistent(tmp_path):
    a = pydicom.dcmread(CHEST_DICOM)
    b = pydicom.dcmread(CHEST_DICOM)
    b.SOPInstanceUID = pydicom.uid.generate_uid()
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = a.SOPClassUID, a.SOPInstanceUID
    b.ReferencedImageSequence = [ref]
    out_a, out_b = (deid.deidentify(ds, KEY).dataset for ds in (a, b))
    assert out_b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out_a.SOPInstanceUID
    assert out_b.SOPInstanceUID != out_a.SOPInstanceUID


# ---------------------------------------------------------------- pixels, burned-in text


@pytest.mark.parametrize("src", [CHEST_DICOM, CHEST_DICOM_MONO1, DICOM_DIR / "pydicom-data" / "693_UNCI.dcm"])
def test_pixel_data_is_unchanged(src, tmp_path):
    original = pydicom.dcmread(src)
    result = read_deidentified(src)
    assert result.dataset.PixelData == original.PixelData
    copy_path = tmp_path / "deid.dcm"
    pydicom.dcmwrite(copy_path, result.dataset)
    before, after = read_scan(src), read_scan(copy_path)
    assert np.array_equal(before.pixels, after.pixels) and before.study_key != after.study_key


def test_burned_in_annotation_is_flagged_not_hidden(tmp_path):
    ds = pydicom.dcmread(CHEST_DICOM)
    ds.BurnedInAnnotation = "YES"
    assert deid.deidentify(ds, KEY).burned_in == "yes" and deid.deidentify(ds, KEY).needs_pixel_review
    ds.BurnedInAnnotation = "NO"
    assert not deid.deidentify(ds, KEY).needs_pixel_review
    del ds.BurnedInAnnotation
    ds.Modality = "US"
    assert deid.deidentify(ds, KEY).burned_in == "possible"
    ds.Modality = "CR"
    assert deid.deidentify(ds, KEY).burned_in == "unknown"
    assert deid.deidentify(ds, KEY).dataset.get("BurnedInAnnotation") is None  # nothing invented


def test_the_input_dataset_is_left_untouched_unless_in_place():
    ds = pydicom.dcmread(CHEST_DICOM, stop_before_pixels=True)
    ds.PatientName = "Canaryson^Janet"
    deid.deidentify(ds, KEY)
    assert ds.PatientName == "Canaryson^Janet"
    deid.deidentify(ds, KEY, in_place=True)
    assert ds.PatientName == ""


# ---------------------------------------------------------------- the key


def test_key_file_is_created_once_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(deid.KEY_ENV)
    path = tmp_path / "keys" / "deid.key"
    key = deid.load_key(path)
    assert len(key) >= 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert deid.load_key(path) == key
    assert read_scan(CHEST_DICOM, DicomConfig(deid_key_file=str(path))).study_key == \
        deid.remap_uid(str(pydicom.dcmread(CHEST_DICOM, stop_before_pixels=True).StudyInstanceUID), key)


def test_bad_keys_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(deid.KEY_ENV, "short")
    with pytest.raises(ScanError, match="at least 16 characters"):
        read_scan(CHEST_DICOM)
    monkeypatch.delenv(deid.KEY_ENV)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ScanError, match="key file is not usable"):
        read_scan(CHEST_DICOM, DicomConfig(deid_key_file=str(blocker / "deid.key")))
    with pytest.raises(deid.DeidKeyError):
        deid.deidentify(Dataset(), b"short")


# ---------------------------------------------------------------- identity and the SR for the PACS


def test_study_identity_never_shows_its_values(tmp_path):
    identity = read_study_identity(with_canaries(CHEST_DICOM, tmp_path / "in.dcm"))
    assert identity.values["PatientID"] == "MRN-CANARY-4711"
    assert "CANARY" not in repr(identity).upper() and "CANARY" not in f"{identity}".upper()


def test_sr_is_stored_in_the_deidentified_study_and_pushed_to_the_real_one(tmp_path):
    src = with_canaries(CHEST_DICOM, tmp_path / "in.dcm")
    scan, identity = read_scan(src), read_study_identity(src)
    store = Store(tmp_path / "db.sqlite")
    session = store.create_session("dr_jones", "report")
    draft = store.save_draft(session, "dr_jones", label_draft("FINDINGS: clear."), study_key=scan.study_key)
    report = store.accept_report(draft, "dr_jones", "FINDINGS: Clear lungs.")
    stored = to_dicom_sr(report, scan)
    assert stored.StudyInstanceUID == scan.study_key == str(read_deidentified(src).dataset.StudyInstanceUID)
    assert b"anary" not in dataset_bytes(stored)

    pacs = for_pacs(stored, identity, KEY)
    original = pydicom.dcmread(src, stop_before_pixels=True)
    assert pacs.StudyInstanceUID == original.StudyInstanceUID
    assert (pacs.PatientID, pacs.AccessionNumber) == ("MRN-CANARY-4711", "ACCCANARY42")
    assert str(pacs.PatientName) == "Canaryson^Janet^Q" and pacs.PatientIdentityRemoved == "NO"
    assert "DeidentificationMethod" not in pacs and stored.StudyInstanceUID == scan.study_key  # a copy

    second = to_dicom_sr(store.accept_report(draft, "dr_jones", "FINDINGS: Clear lungs. No effusion."), scan)
    pacs_second = for_pacs(second, identity, KEY)  # a new version joins its predecessor in the real study
    assert pacs_second.PredecessorDocumentsSequence[0].StudyInstanceUID == original.StudyInstanceUID
    assert second.PredecessorDocumentsSequence[0].StudyInstanceUID == scan.study_key

    other = read_study_identity(with_canaries(CHEST_DICOM_MONO1, tmp_path / "other.dcm"))
    with pytest.raises(ValueError, match="refusing to file"):
        for_pacs(stored, other, KEY)
    with pytest.raises(ValueError, match="refusing to file"):
        for_pacs(stored, identity, b"another-deployment-key-000000")


def test_profile_table_is_the_standards():
    # Spot checks against PS3.15 Table E.1-1 (basic profile column).
    expected = {(0x0010, 0x0010): "Z", (0x0010, 0x0030): "Z", (0x0008, 0x0050): "Z",
                (0x0020, 0x000D): "U", (0x0008, 0x0018): "U", (0x0008, 0x1030): "X",
                (0x0020, 0x4000): "X", (0x0010, 0x1010): "X", (0x0008, 0x0080): "X/Z/D",
                (0x0040, 0xA730): "D", (0x6000, 0x3000): "X", (0x6002, 0x4000): "X"}
    for tag, action in expected.items():
        assert deid.profile_action(Tag(tag)) == action, tag
    assert deid.profile_action(Tag(0x0028, 0x0010)) is None  # Rows: kept
    assert len(deid.profile_table()[0]) > 500
