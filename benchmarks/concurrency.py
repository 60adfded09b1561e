"""Load benchmark: N simulated users at once on the real app, in two scenarios.

Each scenario starts `app.py` in a subprocess with the real default models (on loopback, a free
port, a throwaway data folder and key), waits until it serves, runs its users, checks the app is
still alive and serving, and stops it. Server memory: peak resident memory of the process tree,
sampled every 0.2 s.

- triage: N users (gradio_client, one session each, started together) ask one triage question
  each; per user the queue position shown, the time to the first streamed text (TTFT, queue wait
  included) and to the complete answer.
- report: N signed-in users, each in their own headless-Chromium context, upload a chest DICOM,
  draft, edit the draft with a unique marker, accept it and (every other user) export it; then
  every accepted report is looked up in the app's store (`concurrency_report.py`): accepted,
  found, lost (must be 0), per-user TTFT from the Draft click, total latency.

    .venv/bin/python benchmarks/concurrency.py [--scenario triage|report|both] [--users 16]
        [--max-new-tokens 16] [--timeout 1500]

Writes benchmarks/results/concurrency.json (triage at the top level, the report scenario under
`report_workflow`; running one scenario keeps the other's last results). Answers are capped at
--max-new-tokens so 16 queued CPU generations finish in minutes; with one generation at a time,
latency grows with the place in line, which is the point: memory stays flat instead of growing
with the number of users.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = (  # a mix of routine and red-flag presentations, in lay and clinical wording
    "sore throat and mild fever for two days", "crushing chest pain spreading to my left arm and sweating",
    "my child has a rash but is playing normally", "sudden weakness of the right arm and slurred speech",
    "lower back pain after lifting boxes", "itchy eyes and sneezing every spring",
    "I cannot breathe properly and my lips look blue", "headache for a week, worse on screens",
    "twisted my ankle, it is swollen but I can walk", "burning when I pee since yesterday",
    "throat swelling after a bee sting", "cough with green phlegm for five days",
    "feeling dizzy when standing up quickly", "heavy bleeding after giving birth yesterday",
    "my 2 month old has a fever of 38.5", "tired all the time for a month",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, max_new_tokens: int, folder: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "ASSISTANT_DATA_DIR": str(folder / "data"), "GRADIO_TEMP_DIR": str(folder / "uploads"),
           "ASSISTANT_DEID_KEY": secrets.token_hex(32), "ASSISTANT_USERS_FILE": ""}
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(folder / "data"),
               "--max-new-tokens", str(max_new_tokens), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(folder / "app.log", "wb"),
                            stderr=subprocess.STDOUT)


@contextlib.contextmanager
def serving(args, folder: Path, extra: tuple[str, ...] = ()):
    """(process, url, startup seconds) of an app that serves; stopped on leaving the block."""
    port = free_port()
    process = start_app(port, args.max_new_tokens, folder, extra)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield process, url, wait_until_serving(url, process, args.startup_timeout)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def still_serving(url: str, process: subprocess.Popen) -> bool:
    """No crash: the process is alive and still answers HTTP (the root page: with sign-in on, /config
    answers only a signed-in session)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return process.poll() is None and response.status == 200
    except OSError:
        return False


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise SystemExit(f"error: the app exited with code {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"error: the app did not serve within {timeout:.0f} s")


class MemorySampler(threading.Thread):
    """Peak RSS of a process and its children, sampled until stopped."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.process, self.every, self.peak, self.stopped = psutil.Process(pid), every, 0, threading.Event()

    def rss(self) -> int:
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except Exception:  # noqa: BLE001 - a child may exit between listing and reading
                pass
        return total

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)


def one_user(url: str, index: int, start_gate: threading.Barrier) -> dict:
    """Submit one triage question; watch queue position and streamed output; time everything."""
    from gradio_client import Client
    from gradio_client.utils import Status

    client = Client(url, verbose=False)
    start_gate.wait()  # all users submit together
    start, position, first_text = time.monotonic(), 0, None
    job = client.submit(None, QUESTIONS[index % len(QUESTIONS)], api_name="/triage")
    try:
        while not job.done():
            update = job.status()
            if update.code == Status.IN_QUEUE:  # Gradio's rank is 0 for "next in line"
                position = max(position, (update.rank or 0) + 1)
            if first_text is None and _has_answer(job.outputs()):
                first_text = time.monotonic() - start
            time.sleep(0.05)
        history, _, status = job.result()
        total = time.monotonic() - start
        return {"user": index, "ok": status.startswith("✅"), "red_flag": _red_flag(index), "queue_position": position,
                "ttft_s": round(first_text if first_text is not None else total, 3), "latency_s": round(total, 3),
                "status": status[:80]}
    except Exception as err:  # noqa: BLE001 - a user's failure is a result, not a crash of the benchmark
        return {"user": index, "ok": False, "error": f"{type(err).__name__}: {str(err)[:120]}",
                "latency_s": round(time.monotonic() - start, 3)}


def _red_flag(index: int) -> bool:
    from assistant.safety import find_red_flags

    return bool(find_red_flags(QUESTIONS[index % len(QUESTIONS)]))


def _has_answer(outputs: list) -> bool:
    for chat, *_ in reversed(outputs or []):
        if chat and chat[-1].get("role") == "assistant" and chat[-1].get("content"):
            return True
    return False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3) if len(values) > 1 \
        else round(values[0], 3)


def summarise(users: list[dict], args, load_seconds: float, idle_rss: int, peak_rss: int, wall: float,
              load_before: tuple, app_config: dict) -> dict:
    done = [u for u in users if u.get("ok")]
    ttft, latency = [u["ttft_s"] for u in done], [u["latency_s"] for u in done]
    return {
        "benchmark": "concurrency",
        "command": " ".join(["python benchmarks/concurrency.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before,
                    "load_after": os.getloadavg()},
        "setup": {"users": args.users, "endpoint": "/triage", "max_new_tokens": args.max_new_tokens,
                  **app_config, "models": "default (Gemma 3 270M + vision-nih14)"},
        "server": {"startup_s": round(load_seconds, 1), "idle_rss_mb": round(idle_rss / 2**20),
                   "peak_rss_mb": round(peak_rss / 2**20),
                   "peak_minus_idle_mb": round((peak_rss - idle_rss) / 2**20)},
        "results": {"completed": len(done), "errors": len(users) - len(done), "wall_s": round(wall, 1),
                    "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
                    "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
                    "latency_max_s": max(latency, default=None),
                    "users_who_waited_in_line": sum(u.get("queue_position", 0) > 0 for u in users),
                    "max_queue_position_seen": max((u.get("queue_position", 0) for u in users), default=0),
                    "service_s_per_answer": round(wall / max(1, len(done)), 2),
                    # The escalation banner is the first text a red-flag user sees: its wait is the
                    # queue's, since the banner comes from the same (model-queued) event.
                    "red_flag_users": sum(u.get("red_flag", False) for u in done),
                    "red_flag_first_text_max_s": max((u["ttft_s"] for u in done if u.get("red_flag")),
                                                     default=None)},
        "users": users,
    }


def run_triage(args) -> dict:
    """The triage scenario: the top-level fields of concurrency.json."""
    from assistant.config import AppConfig

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="concurrency-") as tmp, \
            serving(args, Path(tmp)) as (process, url, startup):
        sampler = MemorySampler(process.pid)
        idle = sampler.rss()
        sampler.start()
        gate = threading.Barrier(args.users)
        begin = time.monotonic()
        with ThreadPoolExecutor(args.users) as pool:
            futures = [pool.submit(one_user, url, i, gate) for i in range(args.users)]
            users = [f.result(timeout=args.timeout) for f in futures]
        wall = time.monotonic() - begin
        sampler.stopped.set()
        alive = still_serving(url, process)
    result = summarise(users, args, startup, idle, sampler.peak, wall, load_before, AppConfig().__dict__)
    result["server"]["alive_after"] = alive
    return result


def run_report(args) -> dict:
    """The report-workflow scenario (browser users, accepted reports checked in the store)."""
    import concurrency_report as scenario

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="concurrency-report-") as tmp:
        folder = Path(tmp)
        users = scenario.make_users(args.users, folder / "users.json")
        with serving(args, folder, ("--users", str(folder / "users.json"))) as (process, url, startup):
            sampler = MemorySampler(process.pid)
            idle = sampler.rss()
            sampler.start()
            begin = time.monotonic()
            outcomes = asyncio.run(scenario.run_users(url, users, args.timeout))
            wall = time.monotonic() - begin
            sampler.stopped.set()
            alive = still_serving(url, process)
            check = scenario.verify(folder / "data", users, outcomes)  # what the running app has committed
    server = {"startup_s": round(startup, 1), "idle_rss_mb": round(idle / 2**20),
              "peak_rss_mb": round(sampler.peak / 2**20), "peak_minus_idle_mb": round((sampler.peak - idle) / 2**20),
              "alive_after": alive}
    return summarise_report(outcomes, check, args, server, wall, load_before)


def summarise_report(outcomes: list[dict], check: dict, args, server: dict, wall: float, load_before: tuple) -> dict:
    import concurrency_report as scenario

    done = [o for o in outcomes if o["step"] == "done"]
    ttft = [o["ttft_s"] for o in outcomes if "ttft_s" in o]
    waits = [o["queue_wait_s"] for o in outcomes if "queue_wait_s" in o]
    latency = [o["latency_s"] for o in done]
    return {
        "command": " ".join(["python benchmarks/concurrency.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
        "setup": {"users": args.users, "max_new_tokens": args.max_new_tokens, "timeout_s": args.timeout,
                  "image": scenario.CHEST_DICOM.name, "client": "headless Debian Chromium, one context per user",
                  "flow": "sign in, upload DICOM, indication, Draft report, edit, Accept, Export (every other user)"},
        "server": server,
        "results": {"completed": len(done), "errors": len(outcomes) - len(done),
                    "crashes": int(not server["alive_after"]), **check, "wall_s": round(wall, 1),
                    "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
                    "queue_wait_p95_s": percentile(waits, 95), "latency_p50_s": percentile(latency, 50),
                    "latency_p95_s": percentile(latency, 95), "latency_max_s": max(latency, default=None),
                    "max_queue_position_seen": max((o.get("queue_position", 0) for o in outcomes), default=0)},
        "users": outcomes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("triage", "report", "both"), default="both")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--timeout", type=float, default=1500,
                        help="overall limit for the users, seconds, per scenario")
    parser.add_argument("--out", default=str(RESULTS / "concurrency.json"))
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    out = Path(args.out)
    # One scenario alone keeps the other's last results in the file.
    result = json.loads(out.read_text()) if args.scenario != "both" and out.is_file() else {}
    ok = True
    if args.scenario in ("triage", "both"):
        result.update(run_triage(args))
        r = result["results"]
        ok &= r["errors"] == 0 and result["server"]["alive_after"]
        print(f"triage: {r['completed']}/{args.users} answered, {r['errors']} errors; TTFT p50 {r['ttft_p50_s']} s, "
              f"p95 {r['ttft_p95_s']} s; latency p50 {r['latency_p50_s']} s, p95 {r['latency_p95_s']} s; "
              f"peak RSS {result['server']['peak_rss_mb']} MB (idle {result['server']['idle_rss_mb']} MB)")
    if args.scenario in ("report", "both"):
        part = result["report_workflow"] = run_report(args)
        r = part["results"]
        ok &= r["errors"] == 0 and r["lost"] == 0 and r["unexpected_reports"] == 0 and r["crashes"] == 0
        print(f"report: {r['completed']}/{args.users} done, {r['errors']} errors, {r['crashes']} crashes; "
              f"accepted {r['accepted_found']}/{r['accepted_expected']} found, {r['lost']} lost; "
              f"TTFT p50 {r['ttft_p50_s']} s, p95 {r['ttft_p95_s']} s; latency p95 {r['latency_p95_s']} s; "
              f"peak RSS {part['server']['peak_rss_mb']} MB")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
