"""Text backends: the OpenAI-compatible client against a fake server (request shape, failures as one
line, no prompt in logs or PHI on the wire) and against llama.cpp's real server (streamed triage)."""

from __future__ import annotations

import copy
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai  # noqa: F401  imported here so that no test times the SDK's import
import pytest

from assistant.backend import BackendError, LocalBackend, OpenAIBackend, text_backend
from assistant.cli import build_parser, config_from_args, user_message
from assistant.config import AssistantConfig, BackendConfig, GenerationConfig
from assistant.pipeline import Assistant
from assistant.safety import DRAFT_LABEL


# ---- a fake OpenAI-compatible server: records requests, streams fixed pieces or fails ----------
class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        if self.server.fail_status:
            self._json(self.server.fail_status, {"error": {"message": "model exploded", "type": "server_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in self.server.pieces:
            chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.fail_status = [], 0
    server.pieces = ["Rest", " and drink", " fluids.", "\nPerson: more"]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remote(base_url: str, **fields) -> OpenAIBackend:
    return OpenAIBackend(BackendConfig(kind="openai", base_url=base_url, **fields), GenerationConfig())


def remote_assistant(vlm, base_url: str, **backend) -> Assistant:
    """An Assistant whose text modes go to `base_url` (the tiny local model stays for images)."""
    vlm = copy.copy(vlm)
    fields = {f"backend.{name}": value for name, value in {"kind": "openai", "base_url": base_url, **backend}.items()}
    vlm.config = vlm.config.override({**fields, "generation.max_new_tokens": 24})
    return Assistant(vlm)


# ---- configuration ---------------------------------------------------------------------------
def test_local_is_the_default(tiny_vlm):
    assert isinstance(Assistant(tiny_vlm).backend, LocalBackend)


def test_backend_config_round_trips_through_json(tmp_path):
    config = AssistantConfig().override({"backend.kind": "openai", "backend.timeout_s": 5.0})
    config.to_json(tmp_path / "c.json")
    assert AssistantConfig.from_json(tmp_path / "c.json") == config


def test_cli_options_set_the_backend():
    args = build_parser().parse_args(["draft", "x.png", "--llm-backend", "openai", "--base-url",
                                      "http://10.0.0.5:8000/v1", "--served-model", "report-lora",
                                      "--set", "backend.max_retries=0"])
    backend = config_from_args(args).backend
    assert backend == BackendConfig("openai", "http://10.0.0.5:8000/v1", "report-lora", 60.0, 0)


def test_unknown_kind_is_refused(tiny_vlm):
    with pytest.raises(ValueError, match="unknown backend kind 'grpc'"):
        text_backend(AssistantConfig().override({"backend.kind": "grpc"}), tiny_vlm)


# ---- the client against a fake server --------------------------------------------------------
def test_request_is_a_greedy_streamed_completion(fake_server):
    pieces = list(remote(fake_server.base_url, model="m").stream("Nurse: hello", ("\nPerson:",)))
    assert pieces == fake_server.pieces
    (path, body), = fake_server.requests
    assert path == "/v1/completions"
    assert body == {"model": "m", "prompt": "Nurse: hello", "max_tokens": GenerationConfig().max_new_tokens,
                    "temperature": 0.0, "frequency_penalty": 0.0, "stop": ["\nPerson:"], "stream": True}


def test_a_call_can_sample_with_a_seed_instead_of_the_configured_greedy(fake_server):
    sampled = GenerationConfig(temperature=0.3, seed=1234)
    list(remote(fake_server.base_url, model="m").stream("x", generation=sampled))
    list(remote(fake_server.base_url, model="m").stream("x"))
    (_, body), (_, default) = fake_server.requests
    assert (body["temperature"], body["seed"]) == (0.3, 1234)
    assert default["temperature"] == 0.0 and "seed" not in default


def test_the_served_model_is_asked_for_when_not_configured(fake_server):
    list(remote(fake_server.base_url).stream("x"))
    assert fake_server.requests[0][1]["model"] == "fake-model"


def test_triage_trims_at_the_stop_and_keeps_the_label(tiny_vlm, fake_server):
    final = list(remote_assistant(tiny_vlm, fake_server.base_url).triage([], "sore throat for two days"))[-1]
    assert final.startswith(DRAFT_LABEL) and "Rest and drink fluids." in final and "more" not in final


def test_only_masked_text_reaches_the_server(tiny_vlm, fake_server):
    record = "Mr. John Smith, MRN: 48213377, seen 03/04/2025.\nProblems: asthma."
    list(remote_assistant(tiny_vlm, fake_server.base_url).summarize(record))
    prompt = fake_server.requests[0][1]["prompt"]
    assert "asthma" in prompt and "48213377" not in prompt and "Smith" not in prompt


def test_each_task_asks_for_its_own_served_model(tiny_vlm, fake_server):
    # vLLM serving one LoRA per task: summaries to summary-lora, triage to the base model's name.
    assistant = remote_assistant(tiny_vlm, fake_server.base_url, model="gemma-base",
                                 task_models={"summary": "summary-lora", "educate": "educate-lora"})
    list(assistant.summarize("Problems: asthma."))
    list(assistant.triage([], "sore throat for two days"))
    assert [body["model"] for _, body in fake_server.requests] == ["summary-lora", "gemma-base"]


def test_served_task_models_are_config_fields():
    args = build_parser().parse_args(["draft", "x.png", "--llm-backend", "openai",
                                      "--set", "backend.task_models.summary=summary-lora"])
    config = config_from_args(args)
    assert config.backend.task_models.summary == "summary-lora" and config.backend.task_models.educate == ""
    with pytest.raises(KeyError, match="unknown config field 'backend.task_models.radiology'"):
        config.override({"backend.task_models.radiology": "x"})


def test_text_only_draft_goes_to_the_server(tiny_vlm, fake_server):
    fake_server.pieces = ["FINDINGS: clear lungs.", " IMPRESSION: normal."]
    final = list(remote_assistant(tiny_vlm, fake_server.base_url).draft_report([], "cough", text_only=True))[-1]
    assert "clear lungs" in final and len(fake_server.requests) == 1


def test_closed_port_fails_fast_with_one_line():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    start = time.perf_counter()
    with pytest.raises(BackendError) as caught:
        list(remote(url, model="m", timeout_s=5.0, max_retries=0).stream("hello"))
    message = str(caught.value)
    assert time.perf_counter() - start < 3.0  # refused at once, not waited out
    assert f"the model server at {url} is unreachable" in message and "\n" not in message
    assert user_message(caught.value) == message  # the CLI prints it as is, without a traceback


def test_silent_server_times_out():
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with pytest.raises(BackendError, match="did not answer within 0.5 s"):
            list(remote(url, model="m", timeout_s=0.5, max_retries=0).stream("hello"))


def test_server_error_is_one_line_with_its_message(fake_server):
    fake_server.fail_status = 500
    with pytest.raises(BackendError, match=r"answered HTTP 500: model exploded$"):
        list(remote(fake_server.base_url, model="m", max_retries=1).stream("hello"))
    assert len(fake_server.requests) == 2  # one retry, as configured


def test_prompt_text_is_never_logged(fake_server, caplog):
    canary = "CANARY-PROMPT-7731"
    caplog.set_level(logging.DEBUG)
    list(remote(fake_server.base_url, model="m").stream(f"note {canary}"))
    fake_server.fail_status = 400
    with pytest.raises(BackendError):
        list(remote(fake_server.base_url, model="m", max_retries=0).stream(f"note {canary}"))
    assert caplog.records and canary not in caplog.text


def test_app_says_the_server_is_down_in_the_chat_and_stays_usable(tiny_vlm, fake_server):
    import app

    down = remote_assistant(tiny_vlm, f"http://127.0.0.1:{_free_port()}/v1", max_retries=0, timeout_s=2.0)
    history, box, status = list(app.chat_events(down.triage, "sore throat", []))[-1]
    assert "is unreachable" in history[-1]["content"] and history[-1]["content"].endswith("Generation stopped.")
    assert "is unreachable" in status and box == ""
    up = remote_assistant(tiny_vlm, fake_server.base_url)
    history, _, status = list(app.chat_events(up.triage, "still sore", history))[-1]
    assert len(history) == 4 and "Rest and drink fluids." in history[-1]["content"] and status.startswith("✅")


# ---- llama.cpp's real OpenAI-compatible server -------------------------------------------------
@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's server on the default GGUF, on a free loopback port, for this module's tests."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is not installed (pip install '.[serve]')")
    from assistant.serve_export import packaged_gguf

    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_gguf()),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_up(base_url, process, log)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_until_up(base_url: str, process: subprocess.Popen, log, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama.cpp server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"llama.cpp server did not start within {seconds:.0f} s")


def test_server_streams_several_pieces(llama_server):
    pieces = list(remote(llama_server).stream("The patient has a cough and", ("\n\n",)))
    assert len(pieces) >= 3 and "".join(pieces).strip()


def test_triage_turn_through_llama_cpp(tiny_vlm, llama_server):
    from assistant.safety import escalation_message, find_red_flags

    message = "my dad has crushing chest pain going down his left arm and he is sweating"
    updates = list(remote_assistant(tiny_vlm, llama_server).triage([], message))
    banner = escalation_message(find_red_flags(message))
    assert updates[0] == banner  # before any model text
    assert len(updates) >= 4 and all(update.startswith(banner) for update in updates)
    assert DRAFT_LABEL in updates[-1] and "Urgency: emergency" in updates[-1]
