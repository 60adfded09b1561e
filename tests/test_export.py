"""Exports of an accepted report: Markdown, FHIR R4 (parsed back with fhir.resources R4B), DICOM SR."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
import warnings

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.uid import EnhancedSRStorage

from assistant.dicom import read_scan
from assistant.export import (draft_metadata, impression, report_sections, to_dicom_sr, to_fhir_bundle,
                              to_fhir_diagnostic_report, to_markdown, write_sr)
from assistant.safety import label_draft
from assistant.store import Store
from conftest import CHEST_DICOM

STUDY = "2.25.123456789012345678901234567890"
DRAFT = "FINDINGS:\nThe lungs are clear.\n\nIMPRESSION:\nNo acute disease."
FINAL = ("Technique: PA and lateral.\nFINDINGS:\nThe lungs are clear. Small left effusion (< 1 cm), Ø 8 mm.\n\n"
         "IMPRESSION:\nSmall left effusion.")
TWO_VIEW_CHEST = {"modality": ["CR"], "body_part": ["CHEST"], "views": ["PA", "LL"],
                  "model": "tiny-vlm", "software_version": "0.1.0"}


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "assistant.db")


def _accept(store, final=FINAL, metadata=TWO_VIEW_CHEST, study_key=STUDY, user="dr_jones", draft=None):
    if draft is None:
        session = store.create_session(user, "report")
        draft = store.save_draft(session, user, label_draft(DRAFT), study_key=study_key, metadata=metadata)
    return store.accept_report(draft, user, final)


@pytest.fixture
def report(store):
    return _accept(store)


def test_report_sections_and_impression():
    assert report_sections(FINAL) == [
        ("TECHNIQUE", "PA and lateral."),
        ("FINDINGS", "The lungs are clear. Small left effusion (< 1 cm), Ø 8 mm."),
        ("IMPRESSION", "Small left effusion.")]
    assert report_sections("Free text only.") == [("REPORT", "Free text only.")]
    assert impression(FINAL) == "Small left effusion." and impression("No headings.") == ""


def test_markdown_says_who_accepted_it_and_when(report):
    text = to_markdown(report)
    when = report.accepted_at[:10] + " " + report.accepted_at[11:16] + " UTC"
    assert f"accepted by **dr\\_jones** on {when}" in text
    assert "AI-assisted, clinician-accepted" in text and "**Status:** final (version 1)" in text
    assert "## Findings\n\nThe lungs are clear. Small left effusion" in text
    assert "## Impression\n\nSmall left effusion." in text
    assert "Edited by the clinician" in text and "```diff" not in text
    assert "```diff\n--- ai-draft" in to_markdown(report, include_diff=True)
    assert "Research use only" in text and STUDY in text


def test_fhir_diagnostic_report_parses_back_with_r4b(report):
    resource = to_fhir_diagnostic_report(report)
    json.dumps(resource)  # plain JSON
    parsed = DiagnosticReport.model_validate(resource)
    assert parsed.status == "final" and parsed.id == report.uid
    assert [(c.system, c.code) for c in parsed.code.coding] == [("http://loinc.org", "36643-5")]
    assert parsed.category[0].coding[0].code == "RAD"
    assert parsed.imagingStudy[0].identifier.system == "urn:dicom:uid"
    assert parsed.imagingStudy[0].identifier.value == f"urn:oid:{STUDY}"
    assert parsed.performer[0].display == "dr_jones" and parsed.resultsInterpreter[0].display == "dr_jones"
    assert parsed.issued.isoformat(timespec="milliseconds") == report.accepted_at
    assert parsed.conclusion == "Small left effusion."
    form = parsed.presentedForm[0]  # the model decodes base64Binary to bytes
    data = base64.b64decode(resource["presentedForm"][0]["data"])
    assert data == form.data and data.decode("utf-8") == FINAL and form.contentType.startswith("text/plain")
    assert form.hash == hashlib.sha1(data).digest()
    assert parsed.meta.security[0].code == "AIAST"
    note = resource["extension"][0]
    assert note["url"].endswith("extension-DiagnosticReport.note")
    assert "drafted by an AI model" in note["valueAnnotation"]["text"]
    assert "subject" not in resource  # the store knows no patient


def test_fhir_second_version_is_amended_and_replaces_the_first(store):
    first = _accept(store)
    second = _accept(store, final=FINAL + "\nFollow-up advised.", draft=first.draft_id)
    resource = to_fhir_diagnostic_report(second)
    assert resource["status"] == "amended"
    [replaces] = [e for e in resource["extension"] if e["url"].endswith("diagnosticReport-replaces")]
    assert replaces["valueReference"]["identifier"]["value"] == f"urn:uuid:{first.uid}"


def test_fhir_bundle_names_the_ai_and_the_clinician_in_provenance(report):
    bundle = Bundle.model_validate(to_fhir_bundle(report))
    entries = {entry.resource.get_resource_type(): entry for entry in bundle.entry}
    provenance = entries["Provenance"].resource
    assert provenance.target[0].reference == entries["DiagnosticReport"].fullUrl
    device = provenance.contained[0]
    assert device.get_resource_type() == "Device" and device.deviceName[0].name == "tiny-vlm"
    assert device.version[0].value == "0.1.0"
    roles = {agent.type.coding[0].code: agent.who for agent in provenance.agent}
    assert roles["author"].reference == "#ai" and roles["verifier"].display == "dr_jones"


def test_generic_loinc_code_unless_two_chest_views(store):
    single = _accept(store, metadata={"modality": ["DX"], "body_part": ["CHEST"], "views": ["PA"]})
    assert to_fhir_diagnostic_report(single)["code"]["coding"][0]["code"] == "18748-4"
    unknown = _accept(store, metadata={}, study_key=None)
    resource = to_fhir_diagnostic_report(unknown)
    assert resource["code"]["coding"][0]["code"] == "18748-4" and "imagingStudy" not in resource


def test_exports_are_deterministic(report, tmp_path):
    assert to_fhir_bundle(report) == to_fhir_bundle(report)
    assert to_markdown(report) == to_markdown(report)
    first = write_sr(to_dicom_sr(report), tmp_path / "a.dcm")
    assert first.read_bytes() == write_sr(to_dicom_sr(report), tmp_path / "b.dcm").read_bytes()


def _texts(item) -> list[str]:
    found = [item.TextValue] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found += _texts(child)
    return found


def test_dicom_sr_reads_back_in_the_same_study(report, tmp_path):
    path = write_sr(to_dicom_sr(report), tmp_path / "report.dcm")
    raw = path.read_bytes()
    assert raw[:128] == bytes(128) and raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == EnhancedSRStorage and ds.Modality == "SR"
    assert ds.StudyInstanceUID == STUDY
    assert ds.SeriesInstanceUID != ds.SOPInstanceUID and ds.SOPInstanceUID.startswith("2.25.")
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    observer = ds.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "dr_jones^"
    assert observer.VerificationDateTime.startswith(report.accepted_at[:19].replace("-", "").replace("T", "")
                                                    .replace(":", ""))
    texts = _texts(ds)
    assert "The lungs are clear. Small left effusion (< 1 cm), Ø 8 mm." in texts  # UTF-8 survives
    assert "Small left effusion." in texts and "Technique: PA and lateral." in texts
    assert any("drafted by an AI model (tiny-vlm)" in text for text in texts)
    assert ds.PatientName.family_name == "ANONYMOUS" and ds.PatientID.startswith("ANON-")
    assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.PatientIdentityRemoved == "YES"
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds  # no invented instance references


def test_dicom_sr_second_version_references_its_predecessor(store):
    first = _accept(store)
    second = _accept(store, final="FINDINGS:\nNormal.", draft=first.draft_id)
    first_sr, second_sr = to_dicom_sr(first), to_dicom_sr(second)
    predecessor = second_sr.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == STUDY
    series = predecessor.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert second_sr.InstanceNumber == 2


def test_dicom_sr_refuses_another_study_and_makes_its_own_without_one(store, report):
    other = dataclasses.make_dataclass("S", [("study_key", str)])("2.25.999")
    with pytest.raises(ValueError, match="does not match"):
        to_dicom_sr(report, other)
    same = dataclasses.make_dataclass("S", [("study_key", str)])(STUDY)
    assert to_dicom_sr(report, same).StudyInstanceUID == STUDY
    no_study = _accept(store, study_key=None)
    uid = to_dicom_sr(no_study).StudyInstanceUID
    assert uid.startswith("2.25.") and uid != STUDY
    with pytest.raises(ValueError):
        to_dicom_sr(report, patient_id="x" * 65)


def test_write_sr_zeroes_a_preamble_the_dataset_carries(report, tmp_path):
    ds = to_dicom_sr(report)
    ds.preamble = b"MZ" + bytes(126)  # e.g. copied from a hostile input file
    out = tmp_path / "out"
    out.mkdir()
    raw = write_sr(ds, out / "report.dcm").read_bytes()
    assert raw[:128] == bytes(128)
    assert [p.name for p in out.iterdir()] == ["report.dcm"]  # no temp file left behind


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_dicom_sr_passes_dciodvfy(store, tmp_path):
    first = _accept(store)
    second = _accept(store, final="FINDINGS:\nNormal.", draft=first.draft_id)
    for report in (first, second):
        path = write_sr(to_dicom_sr(report), tmp_path / f"v{report.version}.dcm")
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


@pytest.mark.skipif(not CHEST_DICOM.exists(), reason="shared chest DICOM not available")
def test_no_source_identifier_reaches_any_export(store, tmp_path):
    """Canary: identifiers in the source DICOM header never appear in the exports."""
    with warnings.catch_warnings():  # the file's over-long AccessionNumber makes pydicom warn
        warnings.simplefilter("ignore")
        source = pydicom.dcmread(CHEST_DICOM, stop_before_pixels=True)
        canaries = [str(source.PatientName), str(source.PatientID), str(source.StudyInstanceUID),
                    str(source.get("AccessionNumber", "")), str(source.SeriesInstanceUID)]
    scan = read_scan(CHEST_DICOM)
    session = store.create_session("dr_jones", "report")
    draft = store.save_draft(session, "dr_jones", DRAFT, study_key=scan.study_key,
                             metadata=draft_metadata([scan], model="tiny-vlm"))
    report = store.accept_report(draft, "dr_jones", FINAL)
    assert report.metadata["views"] == ["PA"] and report.metadata["modality"] == ["DX"]
    sr_bytes = write_sr(to_dicom_sr(report, scan), tmp_path / "sr.dcm").read_bytes()
    database = [p.read_bytes().decode("latin-1") for p in store.path.parent.glob(store.path.name + "*")]
    exports = [sr_bytes.decode("latin-1"), json.dumps(to_fhir_bundle(report)),
               to_markdown(report, include_diff=True), *database]
    for canary in filter(None, canaries):
        assert not any(canary in text for text in exports), "a source identifier leaked into an export"
    assert pydicom.dcmread(tmp_path / "sr.dcm").StudyInstanceUID == scan.study_key
