"""Report-workflow load scenario: N signed-in users, each in their own headless-Chromium context
(one browser, many contexts), upload a chest radiograph, draft, edit, accept and (every other
user) export a report at the same time; then every accepted report is looked up in the app's store.

Driven through the browser on purpose: the draft a user accepts is the one the `.then` step after
drafting recorded in their browser session, which API calls cannot reach (/accept_report refuses).
Used by `benchmarks/concurrency.py --scenario report|both` (real models) and by
tests/test_concurrency.py (tiny model, a few users). Debian's Chromium only; never a downloaded one.
"""

from __future__ import annotations

import asyncio
import secrets
import string
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHEST_DICOM = ROOT.parent / "shared" / "data" / "dicom" / "pydicom-data" / "RG1_J2KI.dcm"  # a real CR, 677 kB
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
EXPORT_CYCLE = ("markdown", "fhir", "dicom-sr")
POLL_MS = 250  # in-page polling: the default (every animation frame) in 16 pages would eat the 2 cores

# Watches the draft chat in the page: the furthest queue place shown, when the job left the queue
# (the bot message appears, empty) and when the first model text shows (a line that is neither the
# draft label nor the empty FINDINGS heading the draft starts with). Browser clock, milliseconds.
OBSERVER_JS = """(label) => {
  const chat = document.querySelector('#chat');
  const seen = window.__bench = {clicked: null, position: 0, started: null, first: null};
  document.querySelector('#draft-button').addEventListener('click', () => { seen.clicked ??= Date.now(); }, true);
  const update = () => {
    const tracker = chat.querySelector('[data-testid="status-tracker"]');
    const place = /queue:\\s*(\\d+)\\s*\\/\\s*\\d+/.exec(tracker ? tracker.innerText : '');
    if (place) seen.position = Math.max(seen.position, +place[1]);
    const rows = chat.querySelectorAll('.bot-row');
    if (!rows.length) return;
    seen.started ??= Date.now();
    const body = rows[rows.length - 1].innerText.split('\\n').map(l => l.trim())
      .filter(l => l && l !== label && l !== 'FINDINGS:');
    if (body.length) seen.first ??= Date.now();
  };
  new MutationObserver(update).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


@dataclass(frozen=True)
class BenchUser:
    name: str
    password: str
    marker: str  # unique text added to the draft before accepting: proves whose report is whose
    export_format: str | None  # every other user also exports, cycling through the formats


def make_users(count: int, users_file: Path | None = None) -> list[BenchUser]:
    """`count` users with random passwords (added to `users_file` when given) and unique markers.

    Markers are letters and a short number only, so PHI masking (which runs on accept) keeps them.
    """
    run = "".join(secrets.choice(string.ascii_lowercase) for _ in range(6))
    users = [BenchUser(f"bench-{i:02d}", secrets.token_urlsafe(12), f"Load-test marker {run} for user {i:02d}.",
                       EXPORT_CYCLE[(i // 2) % len(EXPORT_CYCLE)] if i % 2 == 0 else None) for i in range(count)]
    if users_file is not None:
        from assistant.auth import add_user

        for user in users:
            add_user(users_file, user.name, user.password)
    return users


class StartLine:
    """All users start uploading together once every one of them signed in (or failed to)."""

    def __init__(self, count: int):
        self.left, self.event = count, asyncio.Event()

    def arrive(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.event.set()


def _ms_left(deadline: float) -> float:
    return max(1_000.0, (deadline - time.monotonic()) * 1000)


async def _wait_text(page, selector: str, wanted: str, deadline: float) -> str:
    """The element's text once it contains `wanted` or a ⚠️ notice (the app's way to say no)."""
    handle = await page.wait_for_function(
        "([sel, text]) => { const t = document.querySelector(sel)?.innerText || '';"
        " return (t.includes(text) || t.includes('⚠️')) ? t : false; }",
        arg=[selector, wanted], polling=POLL_MS, timeout=_ms_left(deadline))
    text = await handle.json_value()
    if wanted not in text:
        raise RuntimeError(text.strip()[:160])
    return text


async def sign_in(page, url: str, user: BenchUser, deadline: float) -> None:
    await page.goto(url, timeout=_ms_left(deadline))
    # Either page may come first: the login form (sign-in on) or the app itself (sign-in off).
    await page.wait_for_selector("#draft-button, input[type=password]", timeout=_ms_left(deadline))
    if await page.locator("input[type=password]").count():
        await page.get_by_label("username").fill(user.name)
        await page.get_by_label("password").fill(user.password)
        await page.get_by_role("button", name="Login").click()
    await page.wait_for_selector("#draft-button", timeout=_ms_left(deadline))


async def draft_accept_export(page, user: BenchUser, out: dict, dicom: Path, indication: str,
                              deadline: float) -> None:
    """The clinician's path, recording in `out` the step reached and the browser-side timings."""
    from assistant.safety import DRAFT_LABEL

    out["step"] = "upload"
    await page.wait_for_selector("#chat", timeout=_ms_left(deadline))  # the page renders in parts
    await page.evaluate(OBSERVER_JS, DRAFT_LABEL)
    begin = time.monotonic()
    await page.locator("#study-files input[type=file]").set_input_files(str(dicom))
    await _wait_text(page, "#status", "ready", deadline)  # reading the upload waits in the model queue too
    out["upload_s"] = round(time.monotonic() - begin, 3)
    out["step"] = "draft"
    await page.fill("#indication textarea", indication)
    await page.click("#draft-button")
    await _wait_text(page, "#status", "Draft complete", deadline)
    await page.wait_for_function("document.querySelector('#report-editor textarea').value.trim().length > 0",
                                 polling=POLL_MS, timeout=_ms_left(deadline))
    out.update(_draft_timings(await page.evaluate("window.__bench")))
    out["step"] = "accept"
    editor = page.locator("#report-editor textarea")
    await editor.fill(await editor.input_value() + "\n" + user.marker)
    await page.click("#accept-button")
    await _wait_text(page, "#accept-status", "Accepted by", deadline)
    out["accepted"] = True
    if user.export_format:
        out["step"] = "export"
        await page.locator("#export-format").get_by_label(user.export_format, exact=True).check()
        await page.click("#export-button")
        status = await _wait_text(page, "#accept-status", f"Exported as {user.export_format}", deadline)
        out["export_file"] = status.rsplit(":", 1)[-1].strip()
    out["step"] = "done"
    out["latency_s"] = round(time.monotonic() - begin, 3)


def _draft_timings(seen: dict) -> dict:
    """Seconds from the Draft click: leaving the queue and the first draft text (TTFT, queue included)."""
    clicked = seen.get("clicked")
    if clicked is None or seen.get("started") is None:
        return {"queue_position": seen.get("position", 0)}
    first = seen.get("first") or seen["started"]  # no visible model text at all: count the queue exit
    return {"queue_position": seen.get("position", 0), "queue_wait_s": round((seen["started"] - clicked) / 1000, 3),
            "ttft_s": round((first - clicked) / 1000, 3)}


async def one_user(browser, url: str, user: BenchUser, out: dict, dicom: Path, start: StartLine,
                   deadline: float) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    arrived = False
    try:
        page = await context.new_page()
        await sign_in(page, url, user, deadline)
        start.arrive()
        arrived = True
        await start.event.wait()
        await draft_accept_export(page, user, out, dicom, "cough and fever for three days", deadline)
    except Exception as err:  # noqa: BLE001 - a user's failure is a result, not a crash of the benchmark
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    finally:
        if not arrived:
            start.arrive()
        await context.close()


async def run_users(url: str, users: list[BenchUser], timeout: float, dicom: Path = CHEST_DICOM) -> list[dict]:
    """Every user at once in one Chromium; a user still busy at `timeout` seconds is stopped and
    reported with the step it was on."""
    from playwright.async_api import async_playwright

    outcomes = [{"user": user.name, "step": "sign-in", "accepted": False, "export_format": user.export_format}
                for user in users]
    deadline = time.monotonic() + timeout
    start = StartLine(len(users))
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            tasks = [asyncio.create_task(one_user(browser, url, u, o, dicom, start, deadline))
                     for u, o in zip(users, outcomes)]
            done, pending = await asyncio.wait(tasks, timeout=timeout + 30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            await browser.close()
    for outcome in outcomes:
        if outcome["step"] != "done" and "error" not in outcome:
            outcome["error"] = f"timed out after {timeout:.0f} s"
    return outcomes


def verify(data_dir: Path, users: list[BenchUser], outcomes: list[dict]) -> dict:
    """Look every user's accepted report up in the store (and their export in their folder).

    `accepted_expected`: users whose browser showed "Accepted by"; `lost`: of those, reports not in
    the store exactly once with the user's own marker; `unexpected`: stored reports beyond that
    (duplicates, or markers under the wrong user).
    """
    from assistant.store import Store

    store = Store.open(data_dir / "assistant.db")
    expected = found = unexpected = exports_ok = 0
    for user, outcome in zip(users, outcomes):
        reports = store.accepted_reports(user.name)
        mine = [r for r in reports if user.marker in r.final_text]
        outcome["stored_reports"] = len(reports)
        expected += outcome["accepted"]
        found += outcome["accepted"] and len(mine) == 1
        unexpected += len(reports) - min(len(mine), 1)
        if outcome.get("export_file"):
            exported = data_dir / "exports" / user.name / outcome["export_file"]
            outcome["export_verified"] = exported.is_file() and user.marker.encode() in exported.read_bytes()
            exports_ok += outcome["export_verified"]
    return {"accepted_expected": expected, "accepted_found": found, "lost": expected - found,
            "unexpected_reports": unexpected, "exports_expected": sum(bool(o.get("export_file")) for o in outcomes),
            "exports_verified": exports_ok, "integrity_check": store.integrity_check()}
