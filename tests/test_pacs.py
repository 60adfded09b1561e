"""PACS integration against a real Orthanc with its DICOMweb plugin (Debian `orthanc`,
`orthanc-dicomweb`): STOW a chest radiograph, find it (QIDO), pull it (WADO), draft, accept, push
the SR back (STOW) and read it back from the same study; plus the failures users will meet.

Each test uploads its own copy of the radiograph with fresh UIDs and canary identifiers, so the
one Orthanc of this module serves every test independently, and no canary may reach a log line
or the terminal.
"""

from __future__ import annotations

import http.server
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from assistant import deid
from assistant.cli import main
from assistant.cli_pacs import accept, push_report, stream_draft
from assistant.dicom import read_scan, read_study_identity
from assistant.export import report_sections
from assistant.pacs import ENV_PASSWORD, ENV_USER, Pacs, PacsError
from assistant.pipeline import Assistant
from assistant.store import Store
from assistant.workflow import Workflow
from conftest import CHEST_DICOM_MONO1

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # dpkg -L orthanc-dicomweb
USER, PASSWORD = "pacs", "test-password"
KEY = "pacs-test-key-0123456789abcdef"
CANARY_NAME, CANARY_ID = "Canaryson^Janet", "MRN-CANARY-4711"
FINAL = "FINDINGS:\nThe lungs are clear. No effusion.\n\nIMPRESSION:\nNo acute disease."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A throwaway Orthanc on a free loopback port: DICOMweb on, DIMSE off, one test user."""
    binary = shutil.which("Orthanc") or shutil.which("/usr/sbin/Orthanc")
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb, or make browser-deps)")
    assert ORTHANC_PLUGIN.exists(), "orthanc-dicomweb is missing: apt-get install orthanc-dicomweb"
    folder, port = tmp_path_factory.mktemp("orthanc"), _free_port()
    config = {"Name": "test-pacs", "HttpPort": port, "RemoteAccessAllowed": False,
              "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "DicomServerEnabled": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
              "Plugins": [str(ORTHANC_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(f"http://127.0.0.1:{port}/system", process, folder / "orthanc.log")
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            if requests.get(url, auth=(USER, PASSWORD), timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    pytest.fail(f"Orthanc did not answer within {seconds} s")


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv(deid.KEY_ENV, KEY)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    monkeypatch.setenv("ASSISTANT_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def pacs(orthanc, env):
    return Pacs.from_env(orthanc, timeout=10)


@pytest.fixture
def study(pacs):
    """A fresh study on the PACS: the chest radiograph with new UIDs and canary identifiers."""
    ds = pydicom.dcmread(CHEST_DICOM_MONO1)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = CANARY_NAME, CANARY_ID + ds.StudyInstanceUID[-6:], "ACC42"
    pacs.push(ds)  # STOW-RS: the same call that later files the report
    return ds


def _texts(item) -> list[str]:
    found = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found += _texts(child)
    return found


def _no_canary(*texts: str) -> None:
    for text in texts:
        assert "canary" not in text.lower(), text


# ---------------------------------------------------------------------- the round trip


def test_search_pull_draft_accept_push_and_read_back(pacs, study, tiny_vlm, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # every library's debug lines too: none may carry an identifier
    matches = pacs.search(patient_id=study.PatientID)
    assert [m.study_uid for m in matches] == [study.StudyInstanceUID]
    assert matches[0].modalities == ("CR",) and matches[0].n_instances == 1
    assert study.StudyInstanceUID in {m.study_uid for m in pacs.search(modality="cr", study_date="20040826")}

    with pacs.pulled(study.StudyInstanceUID, max_images=3) as paths:
        folder = paths[0].parent
        scans = [read_scan(path) for path in paths]
        identity = read_study_identity(paths[0])
    assert not folder.exists()  # the identifying files are gone once read
    assert scans[0].study_key == deid.remap_uid(study.StudyInstanceUID, KEY.encode())
    assert (scans[0].modality, scans[0].body_part) == ("CR", "CHEST")

    workflow = Workflow(Store(tmp_path / "db.sqlite"), tmp_path / "exports")
    draft = stream_draft(Assistant(tiny_vlm), scans, "cough")
    (tmp_path / "final.txt").write_text(FINAL)
    report = accept(workflow, "dr_jones", scans, draft, str(tmp_path / "final.txt"))
    push_report(pacs, report, identity, KEY.encode(), scans)

    sr = [i for i in pacs.instances(study.StudyInstanceUID) if i.modality == "SR"]
    assert len(sr) == 1  # filed in the original study, beside the image
    back = pacs.retrieve(study.StudyInstanceUID, sr[0])
    assert back.StudyInstanceUID == study.StudyInstanceUID and back.PatientID == study.PatientID
    assert back.VerificationFlag == "VERIFIED" and back.Modality == "SR"
    texts = "\n".join(_texts(back))
    for _, body in report_sections(FINAL):
        assert body in texts
    _no_canary(caplog.text, *capsys.readouterr())


def test_cli_draft_accept_push(pacs, study, orthanc, tiny_vlm, monkeypatch, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(Assistant, "from_config", classmethod(lambda cls, config, progress=True: cls(tiny_vlm)))
    (tmp_path / "final.txt").write_text(FINAL)
    argv = ["pacs", "draft", "--url", orthanc, study.StudyInstanceUID, "--indication", "cough",
            "--accept", "--user", "dr_jones", "--final", str(tmp_path / "final.txt"), "--push"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "AI-generated draft" in out and "stored in the PACS study as DICOM SR" in err
    sr = [i for i in pacs.instances(study.StudyInstanceUID) if i.modality == "SR"]
    assert "No acute disease." in "\n".join(_texts(pacs.retrieve(study.StudyInstanceUID, sr[0])))
    _no_canary(caplog.text, out, err)

    # The same report again through `push` (a resend: same SOP instance, no second SR).
    assert main(["pacs", "push", "--url", orthanc, "--study", study.StudyInstanceUID, "--report", "1",
                 "--user", "dr_jones"]) == 0
    assert sum(i.modality == "SR" for i in pacs.instances(study.StudyInstanceUID)) == 1


def test_cli_search_and_pull_show_no_patient_data(study, orthanc, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert main(["pacs", "search", "--url", orthanc, "--patient-id", study.PatientID]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [study.StudyInstanceUID, "CR", "1", "series,", "1", "instance(s)"]
    assert main(["pacs", "pull", "--url", orthanc, study.StudyInstanceUID, "--out", str(tmp_path / "pulled")]) == 0
    pulled = pydicom.dcmread(tmp_path / "pulled" / "image-001.dcm")
    assert pulled.SOPInstanceUID == study.SOPInstanceUID and pulled.preamble == bytes(128)
    _no_canary(caplog.text, out, err, *capsys.readouterr())


def test_push_refuses_a_report_of_another_study(pacs, study, orthanc, tmp_path, capsys):
    store = Store(tmp_path / "data" / "assistant.db")
    draft = store.save_draft(None, "dr_jones", "FINDINGS: clear.", study_key=deid.remap_uid("1.2.3.4", KEY.encode()))
    report = store.accept_report(draft, "dr_jones", "FINDINGS: clear.")
    assert main(["pacs", "push", "--url", orthanc, "--study", study.StudyInstanceUID, "--report", str(report.id),
                 "--user", "dr_jones"]) == 2
    assert "refusing to file the SR there" in capsys.readouterr().err
    assert all(i.modality != "SR" for i in pacs.instances(study.StudyInstanceUID))


# ---------------------------------------------------------------------- failures, one clear line each


def test_unknown_study_is_a_clear_error(pacs, orthanc, tmp_path, capsys):
    with pytest.raises(PacsError, match="no such study on the PACS"):
        pacs.pull("1.2.3.4.5", tmp_path)
    with pytest.raises(PacsError, match="no such study on the PACS"):
        pacs.study_identity("1.2.3.4.5")
    assert main(["pacs", "pull", "--url", orthanc, "1.2.3.4.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such study") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(PacsError, match="not a DICOM study UID"):
        pacs.pull("../../system", tmp_path)


def test_server_down_is_a_clear_error(env, capsys, caplog):
    caplog.set_level(logging.DEBUG)  # the retry's warning must not quote the query either
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    with pytest.raises(PacsError, match=r"cannot reach the PACS at http://127\.0\.0\.1:\d+/dicom-web .*is it running"):
        Pacs(url, timeout=2).search(patient_id="X")
    assert main(["pacs", "search", "--url", url, "--patient-id", "SECRET-ID-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the PACS") and err.count("\n") == 1
    assert "SECRET-ID-1" not in err + caplog.text


def test_wrong_password_is_a_clear_error(orthanc):
    with pytest.raises(PacsError, match=r"refused access \(HTTP 401\).*ASSISTANT_PACS_USER") as err:
        Pacs(orthanc, user=USER, password="wrong", timeout=5).search(patient_id="X")
    assert "wrong" not in str(err.value)


def test_a_silent_server_times_out(caplog):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        start = time.monotonic()
        with pytest.raises(PacsError, match="did not answer in time"):
            Pacs(url, timeout=0.5).search(patient_id="SECRET-ID-2")
        assert time.monotonic() - start < 5  # two attempts of 0.5 s and one short back-off
    assert "SECRET-ID-2" not in caplog.text


class _WebPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>not a PACS</html>")

    def log_message(self, *args):
        pass


def test_a_server_that_is_not_dicomweb_is_a_clear_error(orthanc):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _WebPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PacsError, match="did not answer as a DICOMweb service"):
            Pacs(f"http://127.0.0.1:{server.server_port}/", timeout=5).search(patient_id="X")
    finally:
        server.shutdown()
        server.server_close()
    # Orthanc's own REST root lists studies as id strings, not DICOM JSON.
    with pytest.raises(PacsError, match="not a DICOMweb|HTTP 404"):
        Pacs(orthanc.removesuffix("/dicom-web"), user=USER, password=PASSWORD, timeout=5).instances("1.2.3")


def test_bad_options_are_clear_errors(orthanc, env, capsys):
    with pytest.raises(PacsError, match="at least one filter"):
        Pacs(orthanc).search()
    with pytest.raises(PacsError, match="YYYYMMDD"):
        Pacs(orthanc).search(study_date="26 Aug 2004")
    with pytest.raises(PacsError, match="must start with http"):
        Pacs("ftp://pacs.example/dicom-web")
    assert main(["pacs", "draft", "--url", orthanc, "1.2.3", "--push"]) == 2
    assert "--push and --final need --accept" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_draft_with_the_real_default_model(study, orthanc, llm_cache, capsys):
    argv = ["pacs", "draft", "--url", orthanc, study.StudyInstanceUID, "--max-new-tokens", "12",
            "--accept", "--user", "dr_jones", "--push"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("AI-generated draft") and "stored in the PACS study" in err
    _no_canary(out, err)
