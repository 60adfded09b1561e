"""The real app in headless Chromium: upload a chest DICOM, watch a draft appear.

Uses Debian's Chromium (/usr/bin/chromium) through Playwright; never a downloaded browser.
Screenshots are kept under test-artifacts/ for review.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def served_app(llm_cache, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "ASSISTANT_CACHE_DIR": str(llm_cache["cache"]),
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("uploads"))}
    log = (tmp_path_factory.mktemp("logs") / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--max-new-tokens", "16"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/", process)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def page(served_app):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served_app)
        yield page
        browser.close()


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
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "draft_report.png"), full_page=True)


def test_a_non_dicom_upload_shows_a_clear_error(page, tmp_path):
    bogus = tmp_path / "notes.dcm"
    bogus.write_text("not a dicom file at all")
    upload(page, bogus)
    page.click("#draft-button")
    page.wait_for_selector("#status :text('could not be used')", timeout=30_000)
    assert "Traceback" not in page.content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "non_dicom_error.png"), full_page=True)


@pytest.mark.parametrize("mode,tab,text,expect", [
    ("triage", "Triage", "crushing chest pain spreading to my left arm and I am sweating", "EMERGENCY"),
    ("summarize", "EHR summary", "Type 2 diabetes.\nMedications: metformin 500 mg twice daily.", "Source check"),
    ("educate", "Patient education", "What is asthma?", "Sources"),
])
def test_each_text_mode_answers_in_the_browser(page, mode, tab, text, expect):
    from assistant.safety import DRAFT_LABEL

    page.get_by_role("tab", name=tab).click()
    page.fill(f"#{mode}-message textarea", text)
    page.click(f"#{mode}-send")
    page.wait_for_selector(f"#{mode}-status :text('Done')", timeout=120_000)
    answer = page.locator(f"#{mode}-chat").inner_text()
    assert DRAFT_LABEL in answer and expect in answer
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{mode}.png"), full_page=True)
