"""The real app in headless Chromium: upload a chest DICOM, window it, see the findings and a
heatmap, watch a draft appear beside similar prior cases, ask an education question with sources.

Uses Debian's Chromium (/usr/bin/chromium) through Playwright; never a downloaded browser.
Screenshots are kept under test-artifacts/ for review.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import CHEST_DICOM, ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited early with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app did not answer at {url} within {seconds} s")


USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}


def start_app(cache, folder, extra=()) -> tuple[subprocess.Popen, str]:
    """The real app with sign-in (two users), a data folder and short drafts; returns (process, url)."""
    from assistant.auth import add_user

    if not (folder / "users.json").exists():
        for name, password in USERS.items():
            add_user(folder / "users.json", name, password)
    port = free_port()
    env = {**os.environ, "ASSISTANT_CACHE_DIR": str(cache), "GRADIO_TEMP_DIR": str(folder / "uploads")}
    # No background compile of the fast decoder: it would take both cores while the browser waits.
    command = [sys.executable, "app.py", "--port", str(port), "--max-new-tokens", "16",
               "--set", "generation.fast_decode=false",
               "--users", str(folder / "users.json"), "--data-dir", str(folder / "data"), *extra]
    with (folder / "app.log").open("a") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process)
    except Exception:
        process.kill()
        raise
    return process, url


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """A tiny similar-case index (40 IU training reports) and passage index (MedQuAD's asthma
    answers), embedded with the real MiniLM the app queries with: seconds, not prepare's minutes."""
    from assistant.app_retrieval import CASE_INDEX, PASSAGE_INDEX, build_case_index, build_passage_index
    from assistant.cli_index import text_embedder
    from assistant.config import AssistantConfig
    from assistant.retrieval_passages import load_medquad

    folder = tmp_path_factory.mktemp("indexes")
    embedding = text_embedder(AssistantConfig())
    build_case_index(folder / CASE_INDEX, embedding, limit=40)
    build_passage_index(folder / PASSAGE_INDEX, embedding, [r for r in load_medquad() if r.get("focus") == "Asthma"])
    return ["--index", str(folder / CASE_INDEX), "--passages", str(folder / PASSAGE_INDEX)]


@pytest.fixture(scope="module")
def served_app(llm_cache, indexes, tmp_path_factory):
    process, url = start_app(llm_cache["cache"], tmp_path_factory.mktemp("app"), indexes)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(served_app):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


def sign_in(browser, url: str, user: str, password: str):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    return page


@pytest.fixture
def page(browser, served_app):
    page = sign_in(browser, served_app, "alice", USERS["alice"])
    page.wait_for_selector("#draft-button", timeout=30_000)
    yield page
    page.context.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_for_text(page, selector: str, text: str, timeout: int = 30_000) -> None:
    page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                           arg=[selector, text], timeout=timeout)


def draft_and_accept(page, addendum: str) -> None:
    upload(page, CHEST_DICOM)
    page.click("#draft-button")
    page.wait_for_selector("#status :text('Draft complete')", timeout=120_000)
    page.wait_for_function("document.querySelector('#report-editor textarea').value.includes('FINDINGS')")
    editor = page.locator("#report-editor textarea")
    editor.fill(editor.input_value() + "\n" + addendum)
    page.click("#accept-button")
    page.wait_for_selector("#accept-status :text('Accepted by')", timeout=30_000)


def upload(page, path) -> None:
    page.locator("#study-files input[type=file]").set_input_files(str(path))
    page.wait_for_timeout(500)


def test_upload_a_dicom_and_a_draft_appears(page):
    from assistant.safety import DRAFT_LABEL

    upload(page, CHEST_DICOM)
    page.fill("#indication textarea", "cough and fever")
    page.click("#draft-button")
    page.wait_for_selector("#status :text('Draft complete')", timeout=120_000)
    chat = page.locator("#chat").inner_text()
    assert DRAFT_LABEL in chat and "FINDINGS:" in chat
    assert page.locator("#viewer img").count() >= 1  # the image is shown
    screenshot(page, "draft_report")

    # edit -> accept -> export
    editor = page.locator("#report-editor textarea")
    page.wait_for_function("document.querySelector('#report-editor textarea').value.includes('FINDINGS')")
    editor.fill(editor.input_value() + "\nAddendum: reviewed by the radiologist.")
    page.click("#accept-button")
    page.wait_for_selector("#accept-status :text('Accepted by')", timeout=30_000)
    assert "alice" in page.locator("#accept-status").inner_text()
    page.get_by_label("fhir").check()
    page.click("#export-button")
    page.wait_for_selector("#accept-status :text('Exported as fhir')", timeout=30_000)
    with page.expect_download() as download:
        page.locator("#export-file a").first.click()
    bundle = json.loads(open(download.value.path()).read())
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert "Addendum: reviewed" in base64.b64decode(report["presentedForm"][0]["data"]).decode()
    screenshot(page, "accepted_and_exported")


IMAGE_STATS = """(sel) => {
    const img = document.querySelector(sel);
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let brightness = 0, colour = 0;
    for (let i = 0; i < d.length; i += 4) { brightness += d[i + 1]; colour += Math.abs(d[i] - d[i + 2]); }
    const n = d.length / 4;
    return {src: img.src, brightness: brightness / n, colour: colour / n};
}"""


def shown_image(page, previous: str | None = None) -> dict:
    """Mean brightness and colourfulness of the viewer's image (after it changed from `previous`)."""
    page.wait_for_function("(old) => { const img = document.querySelector('#viewer img');"
                           " return img && img.complete && img.naturalWidth > 0 && img.src !== old; }",
                           arg=previous, timeout=30_000)
    return page.evaluate(IMAGE_STATS, "#viewer img")


def test_viewer_windows_findings_and_heatmap(page):
    upload(page, CHEST_DICOM)
    page.wait_for_selector("#status :text('ready')", timeout=60_000)
    own = shown_image(page)
    wait_for_text(page, "#findings-table", "Effusion")
    assert "not a diagnosis" in page.locator("#findings-caption").inner_text()
    assert "held-out AUROC" in page.locator("#findings-table").inner_text()

    page.locator("#viewer-window").get_by_label("lung").check()
    lung = shown_image(page, own["src"])
    assert abs(lung["brightness"] - own["brightness"]) > 5  # the lung window really re-windowed the pixels
    wait_for_text(page, "#viewer-window-note", "Window: lung")

    page.locator("#viewer-heatmap input").click()
    page.get_by_role("option", name="Effusion").click()
    heat = shown_image(page, lung["src"])
    assert heat["colour"] > 2 and lung["colour"] < 0.5  # the overlay adds colour to a gray film
    wait_for_text(page, "#viewer-window-note", "Heatmap: Effusion")
    page.wait_for_timeout(500)  # let the viewer's loading overlay fade before the screenshot
    screenshot(page, "viewer_heatmap")


def test_similar_cases_go_into_the_draft_and_beside_it(page):
    upload(page, CHEST_DICOM)
    page.wait_for_selector("#status :text('ready')", timeout=60_000)
    page.locator("#use-cases input[type=checkbox]").check()
    page.fill("#indication textarea", "The heart is normal in size. The lungs are clear. No pleural effusion.")
    page.click("#draft-button")
    wait_for_text(page, "#similar-note", "similar prior case(s)", timeout=60_000)
    assert "iu-" in page.locator("#similar-cases").inner_text()  # IU training cases with their reports
    page.wait_for_selector("#status :text('Draft complete')", timeout=120_000)
    screenshot(page, "similar_cases")


def test_a_non_dicom_upload_shows_a_clear_error(page, tmp_path):
    bogus = tmp_path / "notes.dcm"
    bogus.write_text("not a dicom file at all")
    upload(page, bogus)  # read (and refused) as soon as it is uploaded
    page.wait_for_selector("#status :text('could not be used')", timeout=30_000)
    assert "Traceback" not in page.content()
    screenshot(page, "non_dicom_error")


@pytest.mark.parametrize("mode,tab,text,expect", [
    ("triage", "Triage", "crushing chest pain spreading to my left arm and I am sweating", "EMERGENCY"),
    ("summarize", "EHR summary", "Type 2 diabetes.\nMedications: metformin 500 mg twice daily.", "Source check"),
    ("educate", "Patient education", "What is asthma?", "nih.gov"),  # a cited MedQuAD source URL
])
def test_each_text_mode_answers_in_the_browser(page, mode, tab, text, expect):
    from assistant.safety import DRAFT_LABEL

    page.get_by_role("tab", name=tab).click()
    page.fill(f"#{mode}-message textarea", text)
    page.click(f"#{mode}-send")
    page.wait_for_selector(f"#{mode}-status :text('Done')", timeout=120_000)
    answer = page.locator(f"#{mode}-chat").inner_text()
    assert DRAFT_LABEL in answer and expect in answer
    screenshot(page, mode)


def test_history_is_per_user_and_a_wrong_password_is_refused(browser, served_app, page):
    page.get_by_role("tab", name="Triage").click()
    page.fill("#triage-message textarea", "alice-only question about a mild rash")
    page.click("#triage-send")
    page.wait_for_selector("#triage-status :text('Done')", timeout=120_000)
    page.get_by_role("tab", name="History").click()
    page.click("#history-refresh")
    wait_for_text(page, "#history-table", "alice-only question")

    bob = sign_in(browser, served_app, "bob", USERS["bob"])
    bob.get_by_role("tab", name="History").click()
    bob.click("#history-refresh")
    bob.wait_for_timeout(1500)
    assert "alice-only" not in bob.locator("#history-table").inner_text()
    screenshot(bob, "history_bob")

    intruder = sign_in(browser, served_app, "bob", "not-the-password")
    intruder.wait_for_timeout(1500)
    assert intruder.locator("#draft-button").count() == 0


def test_sigkill_of_the_server_loses_no_accepted_report(llm_cache, browser, tmp_path):
    import signal

    process, url = start_app(llm_cache["cache"], tmp_path)
    try:
        page = sign_in(browser, url, "alice", USERS["alice"])
        draft_and_accept(page, "Addendum: survives a crash.")
        page.context.close()
    finally:
        process.send_signal(signal.SIGKILL)  # no shutdown hooks, no flush: what was committed must be on disk
        process.wait(timeout=30)
    process, url = start_app(llm_cache["cache"], tmp_path)
    try:
        page = sign_in(browser, url, "alice", USERS["alice"])
        page.get_by_role("tab", name="History").click()
        page.click("#history-refresh")
        wait_for_text(page, "#history-table", "accepted report")
        screenshot(page, "history_after_sigkill")
        page.context.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_triage_escalates_at_once_and_a_draft_gets_an_image_check(page):
    page.get_by_role("tab", name="Triage").click()
    page.fill("#triage-message textarea", "crushing chest pain radiating to my left arm and sweating")
    page.click("#triage-send")
    # The banner comes from an unqueued, rules-only step: it is on screen before the model answers.
    wait_for_text(page, "#triage-chat", "🚨 EMERGENCY", timeout=10_000)
    page.wait_for_selector("#triage-status :text('Done')", timeout=120_000)
    answer = page.locator("#triage-chat").inner_text()
    assert answer.count("🚨 EMERGENCY") == 1 and "emergency" in answer.lower()
    screenshot(page, "triage_emergency")

    page.get_by_role("tab", name="Draft report").click()
    upload(page, CHEST_DICOM)
    page.click("#draft-button")
    page.wait_for_selector("#status :text('Draft complete')", timeout=120_000)
    wait_for_text(page, "#image-check", "Image check")
    screenshot(page, "draft_image_check")
