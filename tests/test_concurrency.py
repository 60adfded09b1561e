"""Load limits of the app: one generation at a time, a bounded queue, "busy" beyond it.

An in-process app with the tiny model, its triage answer slowed down and instrumented, hit by
several gradio_client users at once on loopback (benchmarks/concurrency.py does the same with the
real models and 16 users).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

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

