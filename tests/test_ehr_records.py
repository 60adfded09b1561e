"""ehr_records / ehr_synthea / ehr_fhir: records become de-identified text with facts; bad uploads fail in one line."""

from __future__ import annotations

import csv
import datetime
import json
import re
import zipfile

import pytest

from assistant.ehr_records import (
    SECTIONS,
    Entry,
    PatientRecord,
    RecordError,
    age_text,
    clean_name,
    patient_ids,
    record_from_upload,
    reference_summary,
    render,
    render_patient,
    short_key,
    synthea_dirs,
    synthea_split,
)
from assistant.grounding import ground_summary
from assistant.phi import KINDS, mask_phi
from conftest import ROOT, SHARED_DATA

needs_synthea = pytest.mark.skipif(not (SHARED_DATA / "synthea").is_dir(), reason="needs ../shared/data/synthea")
BUNDLE = ROOT / "tests" / "data" / "fhir_bundle_one_patient.json"
D = datetime.date
PLACEHOLDER = re.compile(r"\[(?:%s)\]" % "|".join(KINDS))

PATIENTS = ("Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,LAST,SUFFIX,MAIDEN,MARITAL,RACE,ETHNICITY,"
            "GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,ZIP,LAT,LON,HEALTHCARE_EXPENSES,HEALTHCARE_COVERAGE\n"
            "p1,1950-02-03,,999-55-1234,S99912345,,Mr.,Zebulon123,Farquharson456,,,M,white,nonhispanic,M,"
            "Boston MA US,77 Canary Wharf Road,Quincy,Massachusetts,Norfolk County,02169,42.2,-71.0,1000,200\n")
CONDITIONS = ("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n"
              "2001-05-01,,p1,e1,38341003,Hypertension\n"
              "2010-01-01,2010-01-20,p1,e2,444814009,Viral sinusitis (disorder)\n"
              "2015-03-03,,p1,e3,44054006,Diabetes\n")
MEDICATIONS = ("START,STOP,PATIENT,PAYER,ENCOUNTER,CODE,DESCRIPTION,BASE_COST,PAYER_COVERAGE,DISPENSES,TOTALCOST,"
               "REASONCODE,REASONDESCRIPTION\n"
               "2001-05-01T10:00:00Z,,p1,x,e1,314076,lisinopril 10 MG Oral Tablet,1,1,1,1,38341003,Hypertension\n"
               "2010-01-01T10:00:00Z,2010-01-11T10:00:00Z,p1,x,e2,308182,Amoxicillin 250 MG Oral Capsule,1,1,1,1,,\n")
OBSERVATIONS = ("DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,VALUE,UNITS,TYPE\n"
                "2020-06-01T09:00:00Z,p1,e4,4548-4,Hemoglobin A1c/Hemoglobin.total in Blood,7.1234,%,numeric\n"
                "2019-06-01T09:00:00Z,p1,e5,4548-4,Hemoglobin A1c/Hemoglobin.total in Blood,6.5,%,numeric\n"
                "2020-06-01T09:00:00Z,p1,e4,QALY,QALY,60.0,a,numeric\n"
                "2020-06-01T09:00:00Z,p1,e4,72166-2,Tobacco smoking status NHIS,Never smoker,{nominal},text\n")
ALLERGIES = "START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n1990-01-01,,p1,e0,300913006,Shellfish allergy\n"
IDENTIFIERS = ("Zebulon", "Farquharson", "999-55-1234", "Canary Wharf", "Quincy", "02169", "1950", "S99912345", "p1")


def write_export(folder, **tables):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():
        (folder / f"{name}.csv").write_text(text)
    return folder


def test_clean_names_ages_and_short_keys():
    assert clean_name("Viral sinusitis (disorder)") == "Viral sinusitis"
    assert age_text(D(1950, 2, 3), D(2020, 2, 2)) == "69" and age_text(D(1950, 2, 3), D(2020, 2, 3)) == "70"
    assert age_text(D(1920, 1, 1), D(2015, 1, 1)) == "90 or older"  # exact ages over 89 identify people
    assert age_text(D(1950, 1, 1), datetime.date.min) is None and age_text(None, D(2000, 1, 1)) is None
    assert short_key("medications", "lisinopril 10 MG Oral Tablet") == "lisinopril"
    assert short_key("medications", "0.4 ML Enoxaparin sodium 100 MG/ML Prefilled Syringe") == "Enoxaparin"
    assert short_key("medications", "Warfarin Sodium 5 MG Oral Tablet") == "Warfarin"
    assert short_key("results", "Hemoglobin [Mass/volume] in Blood") == "Hemoglobin"
    assert short_key("results", "Pain severity - 0-10 verbal numeric rating [Score] - Reported") == "Pain severity"


def test_render_uses_ages_never_dates_and_splits_active_from_past():
    record = PatientRecord(sex="female", birth=D(1960, 1, 1), conditions=(
        Entry("Hypertension", D(2000, 6, 1)), Entry("Fever (finding)", D(2019, 1, 1), D(2019, 1, 5))),
        medications=(Entry("lisinopril 10 MG Oral Tablet", D(2000, 6, 1), reason="Hypertension"),),
        observations=(Entry("Body Weight", D(2020, 1, 1), value="80 kg"),))
    out = render(record, "synthea")
    assert out.text.startswith("Patient: female, age 60.\n")  # the record's latest event is the "now"
    assert "- Hypertension (since age 40).\n" in out.text and "- Fever (resolved by age 59).\n" in out.text
    assert "- lisinopril 10 MG Oral Tablet, for Hypertension (since age 40).\n" in out.text
    assert "Allergies:\n- None recorded." in out.text
    assert not re.search(r"\b(19|20)\d\d\b", out.text)  # no calendar year anywhere
    assert [f.name for f in out.section("problems")] == ["Hypertension"]
    assert [f.name for f in out.facts if f.section == "past_problems"] == ["Fever"]
    assert out.section("results")[0].value == "80 kg" and out.age == 60 and out.sex == "female"
    earlier = render(record, "synthea", as_of=D(2019, 1, 2))  # the record as it stood then
    assert "- Fever (since age 59)." in earlier.text and "Body Weight" not in earlier.text


def test_reference_summary_is_fully_grounded_in_the_record():
    record = record_from_upload(BUNDLE)
    summary = reference_summary(record)
    assert summary.startswith("Problems:\n- Hypertension (since age 44).\n")
    assert [line for line in summary.splitlines() if line.endswith(":")] == [
        "Problems:", "Medications:", "Allergies:", "Recent results:", "Follow-up:"]
    checks = ground_summary(summary, record.text)
    assert checks and all(c.source is not None for c in checks)


def test_synthea_csv_export_renders_without_identifiers(tmp_path):
    folder = write_export(tmp_path / "export", patients=PATIENTS, conditions=CONDITIONS, medications=MEDICATIONS,
                          observations=OBSERVATIONS, allergies=ALLERGIES)
    assert patient_ids(folder) == ["p1"]
    record = render_patient(folder, "p1")
    for identifier in IDENTIFIERS:
        assert identifier not in record.text
    assert record.text.startswith("Patient: male, age 70.")
    assert "- Hemoglobin A1c/Hemoglobin.total in Blood: 7.123 % (age 70)." in record.text  # latest value only
    assert "6.5 %" not in record.text and "QALY" not in record.text
    assert "- Tobacco smoking status NHIS: Never smoker (age 70)." in record.text
    assert {f.key for f in record.section("medications")} == {"lisinopril"}  # amoxicillin was stopped
    assert [f.name for f in record.section("allergies")] == ["Shellfish allergy"]
    assert mask_phi(record.text) == record.text  # nothing the PHI masker would have to hide
    with pytest.raises(RecordError, match="no such patient"):
        render_patient(folder, "p2")


def test_fhir_bundle_renders_without_identifiers():
    record = record_from_upload(BUNDLE)
    assert record.source == "fhir" and record.text.startswith("Patient: female, age 60.")
    raw = BUNDLE.read_text()
    for identifier in ("Marisol", "Quigleyton", "999-12-3456", "MRN48151623", "555-867-5309", "Wallaby",
                       "Springfield", "01103", "1961", "Blakewell", "5d0a1c1e"):
        assert identifier in raw and identifier not in record.text
    assert [f.name for f in record.section("problems")] == ["Hypertension"]
    assert "Pulmonary embolism" not in record.text  # refuted
    assert [f.statement for f in record.section("medications")] == [
        "lisinopril 10 MG Oral Tablet, for Hypertension (since age 44)"]  # via Medication and reason references
    assert "Amoxicillin" not in record.text  # stopped
    assert record.section("allergies")[0].statement == "Allergy to peanuts, reaction: Hives (moderate)"
    results = {f.name: f.value for f in record.section("results")}
    assert results == {"Hemoglobin A1c/Hemoglobin.total in Blood": "6.1 %", "Systolic Blood Pressure": "138 mmHg",
                       "Diastolic Blood Pressure": "84 mmHg"}  # panel components become results
    assert record.section("follow_up")[0].statement.startswith("Lifestyle education regarding hypertension, for "
                                                               "Hypertension")
    assert "- General examination of patient, ambulatory visit (age 60)." in record.text


def test_upload_of_csv_files_and_of_a_zip(tmp_path):
    files = []
    for name, text in (("patients", PATIENTS), ("conditions", CONDITIONS), ("medications", MEDICATIONS)):
        path = tmp_path / f"{name}.csv"
        path.write_text(text)
        files.append(path)
    from_files = record_from_upload(files)
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in files:
            handle.write(path, f"csv/{path.name}")
        handle.writestr("csv/claims.csv", "Id,PATIENTID\nx,p1\n")  # other Synthea tables are ignored
    assert record_from_upload(archive).text == from_files.text
    assert from_files.source == "csv" and "Hypertension (since age 51)" in from_files.text
    # A lone conditions table (renamed by the browser) is recognised by its columns: no ages without patients.csv.
    lone = tmp_path / "upload-1.csv"
    lone.write_text(CONDITIONS)
    text = record_from_upload(lone).text
    assert text.startswith("Patient: sex not stated, age not stated.") and "- Hypertension.\n" in text


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("content, expected", [
    ("", "is empty"),
    ("{not json", "not valid JSON"),
    ('{"resourceType": "Patient", "gender": "female"}', 'got Patient resourceType'),
    ('{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Condition", '
     '"code": {"text": 1}}}]}', "not a valid FHIR R4 Bundle: entry.0.resource"),
    ('{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Spaceship"}}]}',
     "unknown resourceType"),
    ("START,STOP,PATIENT\n2020-01-01,,p1\n", "no Synthea table found"),
    ("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n2020-31-01,,p1,e,1,Asthma\n", "row 2: START is not a date"),
    ("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n2020-01-01,,p1,e,1,Asthma\n2020-01-01,,p2,e,1,Gout\n",
     "holds 2 patients"),
    ("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n2020-01-01,,p1,e,1,Asthma,extra\n", "more fields than"),
])
def test_malformed_uploads_fail_with_one_line(tmp_path, content, expected):
    path = tmp_path / "upload.json" if content.startswith("{") else tmp_path / "upload.csv"
    path.write_text(content)
    with pytest.raises(RecordError) as err:
        record_from_upload(path)
    assert expected in _one_line(err)
    assert "2020-31-01" not in str(err.value)  # values from the file are never quoted


def test_hostile_uploads_are_refused(tmp_path):
    binary = tmp_path / "scan.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage\x00" * 10)
    with pytest.raises(RecordError, match="not UTF-8"):
        record_from_upload(binary)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(RecordError, match="not a readable zip"):
        record_from_upload(broken)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as handle:
        for n in range(70):
            handle.writestr(f"t{n}.csv", "a\n")
    with pytest.raises(RecordError, match="too large"):
        record_from_upload(many)
    with pytest.raises(RecordError, match="cannot be read"):
        record_from_upload(tmp_path / "missing.json")


def test_multi_patient_bundle_needs_a_patient_id():
    bundle = json.loads(BUNDLE.read_text())
    other = {"fullUrl": "urn:uuid:other", "resource": {"resourceType": "Patient", "id": "other", "gender": "male",
                                                      "birthDate": "1990-01-01"}}
    bundle["entry"].append(other)
    bundle["entry"].append({"resource": {"resourceType": "Condition", "code": {"text": "Gout"},
                                         "subject": {"reference": "urn:uuid:other"}}})
    from assistant.ehr_fhir import record_from_bundle

    with pytest.raises(RecordError, match="holds 2 patients"):
        record_from_bundle(json.dumps(bundle))
    mine = render(record_from_bundle(bundle, "5d0a1c1e-0000-4000-8000-000000000001"), "fhir")
    theirs = render(record_from_bundle(bundle, "other"), "fhir")
    assert "Gout" not in mine.text and "Hypertension" in mine.text
    assert "Gout" in theirs.text and "Hypertension" not in theirs.text


@needs_synthea
def test_shared_synthea_exports_render_de_identified():
    from assistant.ehr_synthea import SyntheaExport

    folders = synthea_dirs()
    assert [f.name for f in folders] == ["ablack3_cancer_modules_107pt", "invitae_default_10pt"]
    for folder in folders:
        export = SyntheaExport.load(folder)
        with (folder / "patients.csv").open(newline="") as handle:
            people = list(csv.DictReader(handle))
        for person in people:
            record = export.render(person["Id"])
            secrets = [person["FIRST"], person["LAST"], person["SSN"], person["ADDRESS"], person["BIRTHDATE"],
                       person["Id"], person["ZIP"]]
            assert not [s for s in secrets if s and s in record.text]
            assert not PLACEHOLDER.search(record.text)  # the masker found nothing clinical to hide
            assert len(record.text) < 8000  # fits the summariser's prompt budget untruncated


@needs_synthea
def test_synthea_split_is_seeded_disjoint_and_skips_empty_records():
    split = synthea_split()
    again = synthea_split()
    assert split.test == again.test and split.train == again.train
    assert not {r.patient_id for r in split.test} & {r.patient_id for r in split.train}
    assert len(split.test) + len(split.train) + split.excluded_empty == 117
    assert 8 <= len(split.test) <= 20 and split.excluded_empty > 0
    other = synthea_split(seed=14)
    assert {r.patient_id for r in other.test} != {r.patient_id for r in split.test}
    record = render_patient(split.test[0].export, split.test[0].patient_id)
    assert {f.section for f in record.facts} <= {*SECTIONS, "past_problems"}
    assert record.facts and re.fullmatch(r"[0-9a-f]{12}", split.test[0].key)


def test_record_text_and_target_fit_the_summarize_prompt():
    from assistant.ehr_records import summary_continuation
    from assistant.prompts import render as render_prompt

    record = record_from_upload(BUNDLE)
    prompt = render_prompt("summarize", record=record.text)
    assert "Allergy to peanuts" in prompt
    # prompt + target continuation is exactly the prompt followed by the whole reference summary
    assert prompt + summary_continuation(record) == prompt.removesuffix("Problems:\n") + reference_summary(record)


def test_csv_with_a_byte_order_mark_reads_like_plain_utf8(tmp_path):
    path = tmp_path / "conditions.csv"  # Excel's "CSV UTF-8" starts with a BOM
    path.write_bytes("\ufeff".encode() + CONDITIONS.encode())
    assert "- Diabetes.\n" in record_from_upload(path).text


def test_free_text_repeating_the_patient_is_masked(tmp_path):
    bundle = json.loads(BUNDLE.read_text())
    bundle["entry"][1]["resource"]["code"]["text"] = "Hypertension, per Marisol Quigleyton at 42 Wallaby Way"
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    record = record_from_upload(path)
    assert "Marisol" not in record.text and "Wallaby" not in record.text
    assert record.section("problems")[0].statement.startswith("Hypertension, per [NAME]")
    conditions = CONDITIONS.replace("Diabetes", "Diabetes (told by Zebulon at 77 Canary Wharf Road)")
    folder = write_export(tmp_path / "export", patients=PATIENTS, conditions=conditions)
    text = render_patient(folder, "p1").text
    assert "Zebulon" not in text and "Canary Wharf" not in text and "Diabetes (told by [NAME]" in text
