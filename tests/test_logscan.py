"""No PHI reaches a log (or an index, an export or a temp file) during an end-to-end session.

The real app (default models, short answers) runs as a subprocess at its most verbose log level
(`--log-level DEBUG`: every library's records too), signed in, with its own data folder and Gradio
temp dir. One browser session plants unique canary identifiers everywhere a user can put them:
the DICOM header (patient name, id, birth date, accession number, institution, referring
physician) and the upload's file name, the indication, a triage message, a pasted EHR note, an
uploaded FHIR record, an education question. The report is drafted, edited, accepted and exported
in every format. Then every file the app wrote is scanned: its stdout/stderr log, everything in
the data folder (store, exports; logs and indexes if any), and Gradio's temp dir, whose raw
uploads must already be gone. None may hold a canary in any form we know the app writes.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from conftest import CHEST_DICOM_MONO1
from test_browser import CHROMIUM, USERS, sign_in, start_app, upload, wait_for_text

pytestmark = [pytest.mark.slow, pytest.mark.browser]

# DICOM header canaries. The app never exports for PACS (that is `assistant pacs`, not the UI), so
# no export may carry them either: every export is the de-identified one.
DICOM_TAGS = {"PatientName": "QUAXLEY^ZEBULON", "PatientID": "PID7391846", "PatientBirthDate": "19370412",
              "AccessionNumber": "ACC8264019", "InstitutionName": "VORPALWOOD INFIRMARY",
              "ReferringPhysicianName": "FROBISHER^IGNATIUS"}
INDICATION = "Patient Mortimer Snodgrass, phone (617) 555-0142, MRN 4417329: cough and fever for three days"
TRIAGE = "I am worried about Mr. Barnaby Wolfensberger, phone 0161 496 0777, who has a sore throat and mild fever."
EHR_NOTE = ("Name: Cordelia Pennyfeather\nDOB: 03/14/1941\nAddress: 42 Quillfeather Lane, Springfield\n"
            "MRN: 5582907\nType 2 diabetes. Metformin 500 mg twice daily.")
QUESTION = "My daughter Clementine Hargreave has asthma. What is asthma?"
# Searched case-insensitively, also with separators dropped (a phone or date re-typed).
CANARIES = ("Quaxley", "Zebulon", "7391846", "19370412", "1937-04-12", "8264019", "Vorpalwood", "Frobisher",
            "Ignatius", "Mortimer", "Snodgrass", "555-0142", "4417329", "Barnaby", "Wolfensberger", "496 0777",
            "Cordelia", "Pennyfeather", "03/14/1941", "Quillfeather", "5582907", "Clementine", "Hargreave",
            "Araminta", "Thistlewaite", "1952-09-30", "Gorsemoor", "9034417", "555-0199")


def canary_dicom(folder: Path) -> Path:
    """A real chest radiograph whose header names the canary patient (the file name does too)."""
    import pydicom

    ds = pydicom.dcmread(CHEST_DICOM_MONO1)
    for keyword, value in DICOM_TAGS.items():
        setattr(ds, keyword, value)
    path = folder / "QUAXLEY_ZEBULON_chest.dcm"
    ds.save_as(path)
    return path


def canary_bundle(folder: Path) -> Path:
    """A FHIR R4 Bundle: an identified patient with one condition whose note repeats the name."""
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:mrn", "value": "MRN-9034417"}],
               "name": [{"family": "Thistlewaite", "given": ["Araminta"]}], "gender": "female",
               "birthDate": "1952-09-30", "telecom": [{"system": "phone", "value": "555-0199"}],
               "address": [{"line": ["17 Gorsemoor Road"], "city": "Springfield", "postalCode": "01103"}]}
    condition = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "urn:uuid:p1"},
                 "code": {"text": "Asthma"}, "onsetDateTime": "2001-05-04",
                 "note": [{"text": "Araminta Thistlewaite reports night cough."}]}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": patient}, {"fullUrl": "urn:uuid:c1", "resource": condition}]}
    path = folder / "THISTLEWAITE_record.json"
    path.write_text(json.dumps(bundle))
    return path


def leaks(text: str) -> list[str]:
    """The canaries found in `text` (case-insensitive; also with spaces, dashes and slashes dropped)."""
    folded = text.casefold()
    squeezed = re.sub(r"[\s/().-]", "", folded)
    return [c for c in CANARIES if c.casefold() in folded or re.sub(r"[\s/().-]", "", c.casefold()) in squeezed]


def readable(path: Path) -> str:
    """A file as text, with any base64 attachment inside JSON decoded too (FHIR presentedForm)."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".json":
        text += "\n" + "\n".join(_decoded_attachments(text))
    return text + "\n" + raw.decode("latin-1")  # UTF-8 and single-byte text in DICOM files alike


def _decoded_attachments(text: str) -> list[str]:
    found = []
    for value in re.findall(r'"data"\s*:\s*"([A-Za-z0-9+/=]+)"', text):
        try:
            found.append(base64.b64decode(value).decode("utf-8", errors="replace"))
        except ValueError:
            pass
    return found


def scan(folder: Path, skip_names: set[str] = frozenset()) -> dict[str, list[str]]:
    """{relative path: canaries} for every file under `folder` whose name or contents hold one."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip_names):
        hits = leaks(str(path.relative_to(folder))) + leaks(readable(path))
        if hits:
            found[str(path.relative_to(folder))] = sorted(set(hits))
    return found


def send(page, mode: str, tab: str, text: str | None = None) -> None:
    """Send a message in a text tab (the message box already filled when `text` is None)."""
    page.get_by_role("tab", name=tab).click()
    if text is not None:
        page.fill(f"#{mode}-message textarea", text)
    page.click(f"#{mode}-send")
    page.wait_for_selector(f"#{mode}-status :text('Done')", timeout=180_000)


def report_session(page, dicom: Path) -> None:
    upload(page, dicom)
    page.wait_for_selector("#status :text('ready')", timeout=120_000)
    page.fill("#indication textarea", INDICATION)
    page.click("#draft-button")
    page.wait_for_selector("#status :text('Draft complete')", timeout=180_000)
    page.wait_for_function("document.querySelector('#report-editor textarea').value.trim().length > 0")
    editor = page.locator("#report-editor textarea")
    editor.fill(editor.input_value() + "\nDiscussed with Dr. Frobisher; patient Mortimer Snodgrass informed.")
    page.click("#accept-button")
    page.wait_for_selector("#accept-status :text('Accepted by')", timeout=60_000)
    for fmt in ("markdown", "fhir", "dicom-sr"):
        page.locator("#export-format").get_by_label(fmt, exact=True).check()
        page.click("#export-button")
        wait_for_text(page, "#accept-status", f"Exported as {fmt}", timeout=60_000)


def text_sessions(page, bundle: Path) -> None:
    send(page, "triage", "Triage", TRIAGE)
    send(page, "summarize", "EHR summary", EHR_NOTE)
    page.locator("#summarize-upload input[type=file]").set_input_files(str(bundle))
    page.wait_for_function("document.querySelector('#summarize-message textarea').value.includes('Active problems')",
                           timeout=60_000)
    send(page, "summarize", "EHR summary")
    send(page, "educate", "Patient education", QUESTION)


@pytest.fixture
def session_files(llm_cache, tmp_path, monkeypatch):
    """Run one canary-laden session against a DEBUG-logging app; returns its folder once it stopped."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    dicom, bundle = canary_dicom(inputs), canary_bundle(inputs)
    folder = tmp_path / "app"
    folder.mkdir()
    monkeypatch.setenv("ASSISTANT_DATA_DIR", str(folder / "data"))  # the de-identification key lands there too
    process, url = start_app(llm_cache["cache"], folder, ("--log-level", "DEBUG"))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                       "--disable-background-networking", "--disable-sync"])
            page = sign_in(browser, url, "alice", USERS["alice"])
            page.wait_for_selector("#draft-button", timeout=60_000)
            report_session(page, dicom)
            text_sessions(page, bundle)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return folder, {dicom.name, bundle.name}


def test_no_canary_reaches_logs_data_or_temp_files(session_files):
    folder, uploaded = session_files
    log = (folder / "app.log").read_text(errors="replace")
    assert "DEBUG" in log  # the most verbose level really was on
    assert not leaks(log), [line for line in log.splitlines() if leaks(line)][:5]
    assert not scan(folder / "data")
    assert not [p for p in (folder / "uploads").rglob("*") if p.name in uploaded], "a raw upload stayed on disk"
    assert not scan(folder / "uploads", skip_names=uploaded)
    exports = list((folder / "data" / "exports").rglob("*"))
    assert {".md", ".json", ".dcm"} <= {p.suffix for p in exports}  # all three formats were scanned
