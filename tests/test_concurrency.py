"""Load limits of the app: one generation at a time, a bounded queue, "busy" beyond it.

An in-process app with the tiny model, its triage answer slowed down and instrumented, hit by
several gradio_client users at once on loopback (benchmarks/concurrency.py does the same with the
real models and 16 users). Then accepted reports under load: simultaneous acceptances through the
workflow, identical uploads from two sessions, and the benchmark's browser scenario on a tiny model.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import app
from assistant.config import AppConfig, AssistantConfig
from assistant.pipeline import Assistant
from assistant.store import Store
from assistant.workflow import Workflow


class Gauge:
    """Counts answers running at once (thread-safe)."""

    def __init__(self):
        self.lock, self.active, self.peak, self.done = threading.Lock(), 0, 0, 0

    def slow_answer(self, seconds: float):
        def triage(history, message):
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            try:
                time.sleep(seconds)
                yield f"answer to: {message}"
            finally:
                with self.lock:
                    self.active -= 1
                    self.done += 1
        return triage


def serve(tiny_vlm, tmp_path, gauge: Gauge, seconds: float, **app_fields):
    from test_browser import free_port

    config = AssistantConfig().override({f"app.{k}": v for k, v in app_fields.items()})
    assistant = Assistant(tiny_vlm)
    assistant.config = config  # only the serving limits differ from the tiny model's config
    assistant.triage = gauge.slow_answer(seconds)
    blocks = app.build_app(assistant, Workflow(Store.open(tmp_path / "db.sqlite"), tmp_path / "exports"))
    blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                  ssr_mode=False)
    return blocks


def ask(url: str, message: str, gate: threading.Barrier | None = None) -> dict:
    """One user: connect, wait for the others (`gate`), submit, watch the queue position."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    if gate is not None:
        gate.wait(timeout=60)  # connecting is slow on a busy machine: submit together afterwards
    start, rank = time.monotonic(), 0
    job = client.submit(None, message, api_name="/triage")
    try:
        while not job.done():
            status = job.status()
            rank = max(rank, status.rank or 0)
            time.sleep(0.05)
        history, _, status_line = job.result()
        return {"ok": True, "rank": rank, "seconds": time.monotonic() - start, "status": status_line}
    except Exception as err:  # noqa: BLE001 - the user-visible outcome is what is tested
        return {"ok": False, "error": str(err), "seconds": time.monotonic() - start}


def test_defaults_are_one_generation_and_a_bounded_queue():
    assert AppConfig().max_concurrent_generations == 1 and 1 <= AppConfig().max_queue_size <= 64


def test_users_wait_in_line_one_generation_at_a_time(tiny_vlm, tmp_path):
    gauge = Gauge()
    blocks = serve(tiny_vlm, tmp_path, gauge, seconds=0.4)
    try:
        gate = threading.Barrier(5)
        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(lambda i: ask(blocks.local_url, f"question {i}", gate), range(5)))
    finally:
        blocks.close()
    assert all(o["ok"] and o["status"].startswith("✅") for o in outcomes), outcomes
    assert gauge.peak == 1 and gauge.done == 5  # never two generations at once
    assert max(o["rank"] for o in outcomes) >= 1  # someone was told they were behind others
    assert max(o["seconds"] for o in outcomes) >= 4 * 0.4  # the last one waited for the others


def test_beyond_the_queue_users_are_told_busy_and_the_app_keeps_serving(tiny_vlm, tmp_path):
    gauge = Gauge()
    blocks = serve(tiny_vlm, tmp_path, gauge, seconds=2.0, max_queue_size=2)
    try:
        gate = threading.Barrier(7)
        with ThreadPoolExecutor(7) as pool:
            outcomes = list(pool.map(lambda i: ask(blocks.local_url, f"question {i}", gate), range(7)))
        busy = [o for o in outcomes if not o["ok"]]
        assert busy and all("queue is full" in o["error"].lower() for o in busy), outcomes
        assert all(o["seconds"] < 2.0 for o in busy)  # refused at once, not after one answer's wait
        assert sum(o["ok"] for o in outcomes) >= 2 and gauge.peak == 1
        assert ask(blocks.local_url, "after the rush")["ok"]  # still usable afterwards
    finally:
        blocks.close()



# ---- accepted reports under load: none lost when many users accept at once ----------------------


def test_simultaneous_accepts_and_exports_lose_no_report(tmp_path):
    """12 users accept their drafts at the same instant (one of them twice over, from two tabs),
    then export at once: every acceptance is stored exactly once, versions stay unique."""
    workflow = Workflow(Store.open(tmp_path / "db.sqlite"), tmp_path / "exports")
    users = [f"user-{i:02d}" for i in range(12)]
    drafts = {user: workflow.record_draft(user, [], "FINDINGS: clear lungs.") for user in users}
    jobs = [(user, f"Accepted text of {user}.") for user in users] + [(users[0], "Second tab of user-00.")]
    gate = threading.Barrier(len(jobs))

    def accept(job):
        user, text = job
        gate.wait(timeout=30)
        return workflow.accept(user, drafts[user], text)

    with ThreadPoolExecutor(len(jobs)) as pool:
        reports = list(pool.map(accept, jobs))
        formats = ("markdown", "fhir", "dicom-sr")
        paths = list(pool.map(lambda i: workflow.export(reports[i].user, reports[i].id, formats[i % 3]),
                              range(len(reports))))
    for user in users:
        texts = sorted(r.final_text for r in workflow.store.accepted_reports(user))
        expected = [f"Accepted text of {user}."] + (["Second tab of user-00."] if user == users[0] else [])
        assert texts == sorted(expected)
    versions = sorted(r.version for r in workflow.store.accepted_reports(users[0]))
    assert versions == [1, 2]  # the concurrent second acceptance became version 2, not a clash
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths) and len(set(paths)) == len(paths)
    assert workflow.store.integrity_check() == "ok"


def test_two_sessions_uploading_the_same_file_both_get_the_study(tiny_vlm, tmp_path):
    """Gradio hands identical uploads one path; the first read deletes it, the second must still work."""
    import numpy as np
    from PIL import Image

    import app_report

    upload = tmp_path / "same-hash-dir" / "cxr.png"
    upload.parent.mkdir()
    Image.fromarray((np.random.default_rng(2).random((64, 64)) * 255).astype(np.uint8)).save(upload)
    assistant, shared = Assistant(tiny_vlm), app_report.SharedUploads()
    first = app_report.upload_events(assistant, [str(upload)], None, "DICOM window", "none", shared)
    assert not upload.exists()  # no upload stays on disk
    second = app_report.upload_events(assistant, [str(upload)], None, "DICOM window", "none", shared)
    assert "ready" in second[2] and second[1][0] is first[1][0]
    alone = app_report.upload_events(assistant, [str(upload)], None, "DICOM window", "none")
    assert "could not be used" in alone[2]  # without the shared reads the file is simply gone


def _report_scenario():
    from conftest import load_benchmark

    return load_benchmark("concurrency_report")


@pytest.mark.browser
def test_browser_users_accepting_at_once_lose_no_report(tmp_path):
    """The benchmark's report scenario on a tiny model: 4 signed-in Chromium users draft, edit,
    accept and export at once; each accepted report is in the store once, with its own marker."""
    import asyncio
    import os

    from assistant.model import ClinicalVLM
    from conftest import CHEST_DICOM, tiny_config, tiny_language_model, tiny_tokenizer
    from test_browser import free_port

    scenario = _report_scenario()
    if not os.path.exists(scenario.CHROMIUM):
        pytest.skip("Debian chromium is not installed (make test installs it)")
    users = scenario.make_users(4)
    short = tiny_config(**{"generation.max_new_tokens": 8})
    vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), short)
    workflow = Workflow(Store.open(tmp_path / "data" / "assistant.db"), tmp_path / "data" / "exports")
    blocks = app.build_app(Assistant(vlm), workflow)
    blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                  ssr_mode=False, auth=[(u.name, u.password) for u in users])
    try:
        outcomes = asyncio.run(scenario.run_users(blocks.local_url, users, timeout=150, dicom=CHEST_DICOM))
        check = scenario.verify(tmp_path / "data", users, outcomes)
    finally:
        blocks.close()
    assert all(o["step"] == "done" for o in outcomes), outcomes
    assert check["accepted_expected"] == check["accepted_found"] == 4 and check["lost"] == 0, check
    assert check["unexpected_reports"] == 0 and check["exports_verified"] == check["exports_expected"] == 2, check
    assert all(o["ttft_s"] >= o["queue_wait_s"] >= 0 for o in outcomes), outcomes
