"""Export a clinician-accepted report: Markdown, FHIR R4 (DiagnosticReport + Provenance), DICOM SR.

Status, decided once for all three formats: the clinician read, edited and accepted the text, so
the report is theirs and complete: FHIR `final` (`amended` for a later version of the same draft),
DICOM SR PreliminaryFlag FINAL and VerificationFlag VERIFIED with the accepting user as the
verifying observer. The AI's part is never hidden: FHIR carries the AIAST security label, a note
and a Provenance naming the AI as author and the clinician as verifier; the SR names the AI as a
device observer and says so in a comment; the Markdown says it in its status line.

The SR is COMPLETE (dciodvfy allows VERIFIED only on COMPLETE documents) but lists no Current
Requested Procedure Evidence: the de-identifying reader keeps no SOP Instance UIDs, only study and
series pseudonyms, and inventing instance references would be worse than omitting them. dciodvfy
and DCMTK's dsrdump accept the result.

Privacy: exports hold only what the store holds (masked text, pseudonymised study UID) plus
placeholders: PatientName "ANONYMOUS", a PatientID derived from the study pseudonym, empty dates.

Which study the SR references, decided for a hospital deployment: `to_dicom_sr` (what is stored,
downloaded and shown) uses the de-identified StudyInstanceUID, the keyed pseudonym
`deid.remap_uid` gives and that every de-identified copy of the images carries, so it joins the
*de-identified* study. An SR pushed back to the hospital's PACS must attach to the *real* study:
`for_pacs` is that trusted re-identification step. It takes the original identifiers
(`dicom.read_study_identity`, held in memory by the side that received the images, never
stored), refuses unless they hash to the report's study pseudonym under the deployment key (an
SR can never be filed into another patient's study), and restores the original study UID and
patient/study module. Nothing identifying is kept in the store for this.

Exports are deterministic: UIDs and ids derive from the report's uid and every time from
`accepted_at`, so exporting the same report twice gives the same objects (a PACS or FHIR server
sees a resend, not a new report).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import html
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from datetime import datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import EnhancedSRStorage

from assistant.deid import METHOD as DEID_METHOD
from assistant.deid import StudyIdentity, remap_uid
from assistant.dicom import FRONTAL_VIEWS, LATERAL_VIEWS, Scan, Study
from assistant.store import AcceptedReport

__all__ = ["draft_metadata", "to_markdown", "to_fhir_diagnostic_report", "to_fhir_bundle", "to_dicom_sr",
           "for_pacs", "write_sr", "report_sections", "impression"]

_MANUFACTURER = "clinical-assistant (research use only)"
_SR_SERIES_NUMBER = 999  # SR series sort after image series in viewers
_LOINC = "http://loinc.org"
_XR_CHEST_2_VIEWS = ("36643-5", "XR Chest 2 Views")
_IMAGING_STUDY = ("18748-4", "Diagnostic imaging study")
_AIAST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
          "display": "Artificial Intelligence asserted"}  # HL7 AI Transparency on FHIR label
_RAD = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                    "display": "Radiology"}]}
# R4 DiagnosticReport has no `note`; the official R5->R4 cross-version extension carries one.
_NOTE_EXTENSION = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.note"
_REPLACES_EXTENSION = "http://hl7.org/fhir/StructureDefinition/diagnosticReport-replaces"
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_HEADING = re.compile(r"^[ \t]*(FINDINGS|IMPRESSIONS?|CONCLUSIONS?|RECOMMENDATIONS?|COMPARISON|TECHNIQUE"
                      r"|INDICATIONS?|HISTORY|EXAMINATION)[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE)
_CONCLUDING = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"}
# Patient and General Study attributes restored in the PACS copy (the study UID is set apart).
_PACS_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


# ---------------------------------------------------------------------- shared pieces


def draft_metadata(scans: Iterable[Scan], model: str | None = None) -> dict[str, Any]:
    """Non-identifying facts about a draft's inputs, for `Store.save_draft(metadata=...)`; the
    exports read them back (LOINC code, views, the AI's name). The software version is taken now,
    at draft time, so a report's exports stay the same after an upgrade."""
    scans = list(scans)
    try:
        version = importlib_metadata.version("clinical-assistant")
    except importlib_metadata.PackageNotFoundError:
        version = None
    values = {"modality": sorted({s.modality for s in scans if s.modality}),
              "body_part": sorted({s.body_part for s in scans if s.body_part}),
              "views": [s.view_position or "unknown" for s in scans], "model": model,
              "software_version": version}
    return {key: value for key, value in values.items() if value}


def report_sections(text: str) -> list[tuple[str, str]]:
    """[(HEADING, body)] in order; text before the first heading is under "REPORT"; empty bodies
    are dropped."""
    matches = list(_HEADING.finditer(text))
    sections = [("REPORT", text[: matches[0].start()] if matches else text)]
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections.append((match.group(1).upper(), text[match.end():end]))
    return [(heading, body.strip()) for heading, body in sections if body.strip()]


def impression(text: str) -> str:
    """The concluding section(s) of a report, "" when it has none."""
    return "\n\n".join(body for heading, body in report_sections(text) if heading in _CONCLUDING)


def _status(report: AcceptedReport) -> str:
    return "final" if report.version == 1 else "amended"


def _model(report: AcceptedReport) -> str:
    return str(report.metadata.get("model") or "clinical-assistant AI model")


def _values(report: AcceptedReport, key: str) -> list[str]:
    value = report.metadata.get(key) or []
    return [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def _code(report: AcceptedReport) -> tuple[str, str]:
    """LOINC 36643-5 only when the inputs prove a two-view chest radiograph, else the generic code."""
    views = set(_values(report, "views"))
    modality = set(_values(report, "modality"))
    chest_xray = "CHEST" in _values(report, "body_part") and modality and modality <= {"CR", "DX"}
    if chest_xray and views & FRONTAL_VIEWS and views & LATERAL_VIEWS:
        return _XR_CHEST_2_VIEWS
    return _IMAGING_STUDY


def _utc(report: AcceptedReport) -> datetime:
    return datetime.fromisoformat(report.accepted_at)


def _derived_uid(report_uid: str, part: str) -> str:
    # A UUID-derived "2.25." UID (PS3.5 B.2), stable for a given report and purpose.
    return "2.25." + str(uuid.uuid5(uuid.UUID(report_uid), part).int)


def _provenance_sentence(report: AcceptedReport) -> str:
    when = _utc(report).strftime("%Y-%m-%d %H:%M UTC")
    replaces = f", replacing version {report.version - 1}" if report.version > 1 else ""
    return (f"AI-assisted report: drafted by an AI model ({_model(report)}), then reviewed, edited "
            f"where needed and accepted by {report.user} on {when} (version {report.version}"
            f"{replaces}). Research use only; the accepting clinician is responsible for the content.")


# ---------------------------------------------------------------------- Markdown


def to_markdown(report: AcceptedReport, *, include_diff: bool = False) -> str:
    """A readable report; render it with a sanitising Markdown renderer (the text is free text)."""
    when = _utc(report).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {_code(report)[1]} — report", "",
             f"**Status:** {_status(report)} (version {report.version}) — AI-assisted, clinician-accepted: "
             f"drafted by an AI model ({_md(_model(report))}), accepted by **{_md(report.user)}** "
             f"on {when}.", ""]
    facts = [f"**Study:** {report.study_key} (pseudonymised UID)" if report.study_key else "",
             "**Modality:** " + ", ".join(_values(report, "modality")) if _values(report, "modality") else "",
             "**Views:** " + ", ".join(_values(report, "views")) if _values(report, "views") else ""]
    if any(facts):
        lines += [" · ".join(f for f in facts if f), ""]
    for heading, body in report_sections(report.final_text):
        lines += [f"## {heading.title()}", "", body, ""]
    lines += ["## Changes from the AI draft", "", _diff_summary(report.diff), ""]
    if include_diff and report.diff:
        fence = "`" * max(3, _longest_backtick_run(report.diff) + 1)
        lines += [f"{fence}diff", report.diff, fence, ""]
    lines.append("_Research use only. The AI draft was reviewed and accepted by the clinician named above, "
                 "who is responsible for this report._")
    return "\n".join(lines) + "\n"


def _diff_summary(diff: str) -> str:
    # Skip the two file headers by position: a removed line "-- x" also starts with "---".
    body = [line for line in diff.splitlines()[2:] if not line.startswith("@@")]
    added = sum(line.startswith("+") for line in body)
    removed = sum(line.startswith("-") for line in body)
    if not added and not removed:
        return "Accepted without edits."
    return f"Edited by the clinician: {added} line(s) added, {removed} line(s) removed."


def _md(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)  # inline values must not become markup


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


# ---------------------------------------------------------------------- FHIR R4


def to_fhir_diagnostic_report(report: AcceptedReport) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport (JSON dict), validated with fhir.resources' R4B models.

    No `subject`: the store holds no patient identity. The study is referenced by its
    pseudonymised DICOM UID as an identifier, not by a server id this code cannot know.
    """
    return _validated(DiagnosticReport, _diagnostic_report(report))


def to_fhir_bundle(report: AcceptedReport) -> dict[str, Any]:
    """A `collection` Bundle: the DiagnosticReport and a Provenance naming the AI (a contained
    Device, agent "author") and the accepting clinician (agent "verifier"). R4 allows a Device
    only as a Provenance agent, not as DiagnosticReport.performer or resultsInterpreter."""
    provenance_id = str(uuid.uuid5(uuid.UUID(report.uid), "provenance"))
    bundle = {
        "resourceType": "Bundle", "id": str(uuid.uuid5(uuid.UUID(report.uid), "bundle")),
        "type": "collection", "timestamp": report.accepted_at,
        "entry": [{"fullUrl": f"urn:uuid:{report.uid}", "resource": _diagnostic_report(report)},
                  {"fullUrl": f"urn:uuid:{provenance_id}", "resource": _provenance(report, provenance_id)}],
    }
    return _validated(Bundle, bundle)


def _validated(model: type, resource: dict[str, Any]) -> dict[str, Any]:
    return json.loads(model.model_validate(resource).model_dump_json())


def _diagnostic_report(report: AcceptedReport) -> dict[str, Any]:
    clinician = [{"type": "Practitioner", "display": report.user}]
    code, display = _code(report)
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": report.uid, "meta": {"security": [_AIAST]},
        "text": {"status": "generated", "div": _narrative(report)},
        "extension": [{"url": _NOTE_EXTENSION, "valueAnnotation": {
            "authorString": report.user, "time": report.accepted_at, "text": _provenance_sentence(report)}}],
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{report.uid}"}],
        "status": _status(report), "category": [_RAD],
        "code": {"coding": [{"system": _LOINC, "code": code, "display": display}], "text": display},
        "issued": report.accepted_at, "performer": clinician, "resultsInterpreter": clinician,
        "presentedForm": [_attachment(report)],
    }
    if report.replaces_uid:
        resource["extension"].append({"url": _REPLACES_EXTENSION, "valueReference": {
            "type": "DiagnosticReport",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{report.replaces_uid}"}}})
    if report.study_key:
        resource["imagingStudy"] = [{"type": "ImagingStudy", "identifier": {
            "system": "urn:dicom:uid", "value": f"urn:oid:{report.study_key}"}}]
    if conclusion := impression(report.final_text):
        resource["conclusion"] = conclusion
    return resource


def _attachment(report: AcceptedReport) -> dict[str, Any]:
    data = report.final_text.encode("utf-8")
    return {"contentType": "text/plain; charset=utf-8", "data": base64.b64encode(data).decode("ascii"),
            "size": len(data), "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),
            "title": f"Accepted report, version {report.version}", "creation": report.accepted_at}


def _narrative(report: AcceptedReport) -> str:
    return ('<div xmlns="http://www.w3.org/1999/xhtml">'
            f"<p>{html.escape(_provenance_sentence(report))}</p>"
            f"<pre>{html.escape(report.final_text)}</pre></div>")


def _provenance(report: AcceptedReport, provenance_id: str) -> dict[str, Any]:
    device: dict[str, Any] = {
        "resourceType": "Device", "id": "ai",
        "deviceName": [{"name": _model(report), "type": "model-name"}],
        "note": [{"text": "Research-use AI that drafted the report text for clinician review."}],
    }
    if version := report.metadata.get("software_version"):
        device["version"] = [{"value": str(version)}]
    return {
        "resourceType": "Provenance", "id": provenance_id, "contained": [device],
        "target": [{"reference": f"urn:uuid:{report.uid}"}], "recorded": report.accepted_at,
        "agent": [
            {"type": {"coding": [{"system": _PARTICIPANT, "code": "author", "display": "Author"}]},
             "who": {"reference": "#ai", "display": _model(report)}},
            {"type": {"coding": [{"system": _PARTICIPANT, "code": "verifier", "display": "Verifier"}]},
             "who": {"type": "Practitioner", "display": report.user}},
        ],
    }


# ---------------------------------------------------------------------- DICOM SR


def to_dicom_sr(report: AcceptedReport, study: Study | Scan | None = None, *,
                patient_id: str | None = None, verifying_organization: str = "Unspecified") -> Dataset:
    """An Enhanced SR (the lowest SR IOD that holds text and observers) in the report's study.

    `study` (a Study or Scan) is only a cross-check: its pseudonymised key must match the report's,
    so an SR can never be filed into another study. Without any study key (PNG/JPEG input) the SR
    gets a study of its own. `patient_id` may name the pseudonym the archive already uses.
    """
    study_uid = _sr_study_uid(report, study)
    sop_uid, series_uid = _derived_uid(report.uid, "sop"), _derived_uid(report.uid, "series")
    when = _utc(report)
    sr = hd.sr.EnhancedSR(
        # highdicom takes patient and study attributes from the first evidence dataset.
        evidence=[_placeholder_source(study_uid, series_uid, sop_uid, patient_id)], record_evidence=False,
        content=_sr_content(report), series_instance_uid=series_uid, series_number=_SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=report.version, manufacturer=_MANUFACTURER,
        is_complete=True, is_final=True, is_verified=True,
        verifying_observer_name=_person_name(report.user), verifying_organization=verifying_organization,
        previous_versions=_predecessors(report, study_uid), specific_character_set="ISO_IR 192",
        series_description="AI-assisted report, clinician-accepted", content_date=when.date(),
        content_time=when.time(), series_date=when.date(), series_time=when.time())
    # The placeholder was only the patient/study source: it must not appear as evidence.
    if "CurrentRequestedProcedureEvidenceSequence" in sr:
        del sr.CurrentRequestedProcedureEvidenceSequence
    stamp = when.strftime("%Y%m%d%H%M%S.%f+0000")
    sr.VerifyingObserverSequence[0].VerificationDateTime = stamp
    for equipment in sr.get("ContributingEquipmentSequence", []):
        equipment.ContributionDateTime = stamp  # highdicom stamps "now"; keep exports deterministic
    sr.InstanceCreationDate, sr.InstanceCreationTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    sr.TimezoneOffsetFromUTC = "+0000"  # every date/time above is UTC
    sr.PatientIdentityRemoved = "YES"
    sr.DeidentificationMethod = [*DEID_METHOD, "placeholder patient module"]
    return sr


def for_pacs(sr: Dataset, identity: StudyIdentity, key: bytes) -> Dataset:
    """A copy of `sr` filed in the original study, for the hospital's own PACS only.

    `identity` holds the study's original identifiers (`dicom.read_study_identity`); `key` is the
    deployment's de-identification key (`deid.load_key`). Raises ValueError unless the original
    StudyInstanceUID maps to the SR's study under that key. Never store or log the result.
    """
    original = identity.study_uid
    if not original or remap_uid(original, key) != str(sr.StudyInstanceUID):
        raise ValueError("the original study does not match the report's study; refusing to file the SR there")
    out = copy.deepcopy(sr)
    out.StudyInstanceUID = original
    for item in out.get("PredecessorDocumentsSequence", []):
        item.StudyInstanceUID = original  # earlier versions live in the same (original) study
    for keyword in _PACS_IDENTITY:
        setattr(out, keyword, identity.values.get(keyword, ""))
    out.PatientIdentityRemoved = "NO"
    for keyword in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in out:
            delattr(out, keyword)
    return out


def write_sr(ds: Dataset, path: str | os.PathLike) -> Path:
    """Write `ds` as a DICOM file with a zeroed preamble, atomically (temp file, fsync, rename)."""
    path = Path(path)
    ds.preamble = bytes(128)  # the 128-byte preamble can carry an executable: never pass one on
    # mkstemp: a private (0600) name no other writer can collide with, on the same file system.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            pydicom.dcmwrite(f, ds, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _sr_study_uid(report: AcceptedReport, study: Study | Scan | None) -> str:
    key = getattr(study, "study_key", None)
    if key and report.study_key and key != report.study_key:
        raise ValueError("the study does not match the report's study; refusing to file the SR there")
    return key or report.study_key or _derived_uid(report.uid, "study")


def _placeholder_source(study_uid: str, series_uid: str, sop_uid: str, patient_id: str | None) -> Dataset:
    if patient_id is not None and (not patient_id or len(patient_id) > 64 or "\\" in patient_id):
        raise ValueError("patient_id must be a pseudonym of 1-64 characters without backslashes")
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPInstanceUID, ds.SOPClassUID = sop_uid, EnhancedSRStorage
    ds.PatientName = "ANONYMOUS^"  # caret: a single-component name, as PN intends
    ds.PatientID = patient_id or "ANON-" + hashlib.sha256(study_uid.encode()).hexdigest()[:16].upper()
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName"):
        setattr(ds, keyword, "")  # type 2: present and empty; nothing identifying is known here
    return ds


def _predecessors(report: AcceptedReport, study_uid: str) -> list[Dataset] | None:
    # The previous version's UIDs derive from its uid, so they can be referenced without a lookup.
    if not report.replaces_uid:
        return None
    ds = Dataset()
    ds.StudyInstanceUID, ds.SOPClassUID = study_uid, EnhancedSRStorage
    ds.SeriesInstanceUID = _derived_uid(report.replaces_uid, "series")
    ds.SOPInstanceUID = _derived_uid(report.replaces_uid, "sop")
    return [ds]


def _sr_content(report: AcceptedReport) -> hd.sr.ContainerContentItem:
    root = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report"))
    model = _model(report)
    items: list[Dataset] = [
        *hd.sr.ObserverContext(codes.DCM.Person, hd.sr.PersonObserverIdentifyingAttributes(
            name=_person_name(report.user))),
        *hd.sr.ObserverContext(codes.DCM.Device, hd.sr.DeviceObserverIdentifyingAttributes(
            uid="2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "clinical-assistant:" + model).int),
            name=model[:64], manufacturer_name="clinical-assistant")),
        hd.sr.TextContentItem(codes.DCM.Comment, _provenance_sentence(report), relationship_type="CONTAINS"),
    ]
    groups = {"Findings": [], "Impressions": []}
    for heading, body in report_sections(report.final_text):
        section = "Impressions" if heading in _CONCLUDING else "Findings"
        prefix = "" if heading in _CONCLUDING | {"FINDINGS", "REPORT"} else f"{heading.title()}: "
        groups[section].append(prefix + body)
    for section, texts in groups.items():
        if texts:
            container = hd.sr.ContainerContentItem(getattr(codes.DCM, section), relationship_type="CONTAINS")
            concept = codes.DCM.Impression if section == "Impressions" else codes.DCM.Finding
            container.ContentSequence = [hd.sr.TextContentItem(concept, text, relationship_type="CONTAINS")
                                         for text in texts]
            items.append(container)
    root.ContentSequence = items
    return root


def _person_name(user: str) -> str:
    # PN: backslash, caret and "=" are delimiters; the trailing caret marks a single-component name.
    clean = re.sub(r"[\\^=\x00-\x1f\x7f]", "_", user).strip()[:63] or "unknown"
    return clean + "^"
