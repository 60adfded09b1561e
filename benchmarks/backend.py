"""Text generation through each backend: the local model vs llama.cpp's OpenAI-compatible server.

For one fixed, PHI-free summary prompt, greedy, through `TextBackend.stream` (what the app sees):
time to first piece, decode tokens/s after it (tokens counted with the model's own tokenizer) and
CPU milliseconds per token of the process running the model, for
- local: transformers bf16 with the shipped report-lora adapter (the default Assistant),
- llama.cpp's server on the packaged Q4_K_M GGUF (base weights, no LoRA),
- llama.cpp's server on the report-lora merged GGUF (`export-adapter --format merged-gguf`), F16 and Q8_0.

    .venv/bin/python benchmarks/backend.py [--runs 3] [--tokens 128] [--threads 2]

Writes benchmarks/results/backend.json. Decoding is memory-bound, so the load average before and
after is recorded: numbers from a busy machine are flagged, not hidden.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, installed or not

from assistant.backend import OpenAIBackend  # noqa: E402
from assistant.config import AssistantConfig, BackendConfig  # noqa: E402
from assistant.evaluate import write_atomic  # noqa: E402
from assistant.pipeline import Assistant  # noqa: E402
from assistant.prompts import render  # noqa: E402
from assistant.serve_export import export_merged_gguf, packaged_gguf  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECORD = ("Problems: type 2 diabetes, hypertension, chronic kidney disease stage 3.\n"
          "Medications: metformin 500 mg twice daily, lisinopril 10 mg daily.\n"
          "Allergies: penicillin (rash).\nRecent: HbA1c 8.1%, eGFR 48, blood pressure 148/92.")


def measure(backend, prompt: str, tokenizer, runs: int, cpu_seconds) -> dict:
    """Medians over `runs` streams of one prompt: time to first piece, decode tokens/s, and CPU
    milliseconds per generated token (prefill included) of the process that runs the model, which
    a busy machine distorts far less than wall-clock rates."""
    first, rates, counts, cpu = [], [], [], []
    for run in range(runs + 1):  # the first run warms caches and is dropped
        start, stamps, text, cpu_start = time.perf_counter(), [], "", cpu_seconds()
        # A distinct first line per run: servers reuse a repeated prompt's KV cache (no prefill).
        for piece in backend.stream(f"Case {run}.\n{prompt}"):
            stamps.append(time.perf_counter())
            text += piece
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        cpu.append(1000 * (cpu_seconds() - cpu_start) / tokens)
        first.append(stamps[0] - start)
        rates.append((tokens - 1) / max(stamps[-1] - stamps[0], 1e-9))
        counts.append(tokens)
    return {"first_piece_s": round(statistics.median(first[1:]), 3),
            "decode_tokens_per_s": round(statistics.median(rates[1:]), 1),
            "cpu_ms_per_token": round(statistics.median(cpu[1:]), 1), "tokens": counts[1:]}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def llama_server(gguf: Path, threads: int):
    """(process, base URL) of llama.cpp's server on a free loopback port, once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"llama.cpp server on {gguf.name} did not start")


def run(runs: int, tokens: int, threads: int) -> dict:
    config = AssistantConfig().override({"generation.max_new_tokens": tokens})
    assistant = Assistant.from_config(config, progress=False)
    tokenizer, prompt = assistant.vlm.tokenizer, render("summarize", record=RECORD)
    local = measure(assistant.backend, prompt, tokenizer, runs, time.process_time)
    results = {"local (transformers bf16 + LoRA)": local}
    with tempfile.TemporaryDirectory() as work:
        ggufs = {"llama.cpp server, base Q4_K_M GGUF": packaged_gguf()}
        for kind in ("f16", "q8_0"):
            ggufs[f"llama.cpp server, merged LoRA ({kind})"] = export_merged_gguf(config, Path(work) / kind, kind)
        for name, gguf in ggufs.items():
            process, url = llama_server(gguf, threads)
            try:
                backend = OpenAIBackend(BackendConfig(kind="openai", base_url=url), config.generation)
                size = {"gguf_mb": round(gguf.stat().st_size / 1e6)}
                cpu = functools.partial(process_cpu_seconds, process.pid)
                results[name] = {**measure(backend, prompt, tokenizer, runs, cpu), **size}
            finally:
                process.terminate()
                process.wait(timeout=30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = run(args.runs, args.tokens, args.threads)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu_count": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads(),
              "llama_threads": args.threads, "max_tokens": args.tokens, "runs": args.runs,
              "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
              "busy_machine": max(load_before, os.getloadavg()[0]) > 0.5 * (os.cpu_count() or 1),
              "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "backend.json", json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
