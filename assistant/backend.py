"""Text generation backends: the in-process model, or any OpenAI-compatible completions server.

Both stream a plain prompt's continuation as text pieces through one method,
`stream(prompt, stop) -> Iterator[str]`, so the pipeline does not care where the model runs.
Prompts reach a backend already PHI-masked by the pipeline; no backend logs prompt text.

The remote backend uses the **completions** endpoint (`/v1/completions`) with the raw prompt,
because prompts/*.md are plain continuation templates, not chat turns. Differences from local
generation: `repetition_penalty` has no field in the OpenAI API, so `frequency_penalty` is sent as
0 and each server applies its own default (vLLM: none; llama.cpp's server: its `repeat_penalty`);
and the server's weights are whatever it serves (see `python -m assistant export-adapter`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from .config import AssistantConfig, BackendConfig, GenerationConfig

if TYPE_CHECKING:
    from .model import ClinicalVLM

API_KEY_ENV = "ASSISTANT_OPENAI_API_KEY"
MAX_MESSAGE_CHARS = 200  # a server's error text is shown to users: one short line, never a body dump


class BackendError(RuntimeError):
    """The model server failed (unreachable, timed out, or answered an error): one line for users."""


class TextBackend(Protocol):
    def stream(self, prompt: str, stop: tuple[str, ...] = (), task: str = "report",
               generation: GenerationConfig | None = None) -> Iterator[str]:
        """Yield pieces of the prompt's continuation; a stop string may end the last piece. `task`
        (report, triage, summary, educate) picks that task's LoRA adapter where the backend has one;
        `generation` replaces the configured settings for this call (e.g. a seeded sampled re-draft)."""


class LocalBackend:
    """The in-process ClinicalVLM (text only: no images in the prompt)."""

    def __init__(self, vlm: "ClinicalVLM"):
        self.vlm = vlm

    def stream(self, prompt: str, stop: tuple[str, ...] = (), task: str = "report",
               generation: GenerationConfig | None = None) -> Iterator[str]:
        yield from self.vlm.stream(self.vlm.build_inputs(prompt), gen=generation, stop=stop, task=task)


class OpenAIBackend:
    """An OpenAI-compatible server's `/v1/completions`, streamed; greedy unless configured otherwise.

    Failures become one `BackendError` line. The SDK retries connection errors, 429 and 5xx up to
    `max_retries` times before the first token; a stream that breaks later is not retried, since
    its first part has already been shown.
    """

    def __init__(self, config: BackendConfig, generation: GenerationConfig):
        self.config, self.generation = config, generation

    @cached_property
    def client(self):
        import openai

        return openai.OpenAI(
            base_url=self.config.base_url,
            # Local servers need no key; the SDK refuses to start without one, hence a dummy.
            api_key=os.environ.get(API_KEY_ENV) or "not-needed",
            timeout=self.config.timeout_s,
            max_retries=self.config.max_retries,
        )

    def stream(self, prompt: str, stop: tuple[str, ...] = (), task: str = "report",
               generation: GenerationConfig | None = None) -> Iterator[str]:
        # `task` picks the served model (`backend.task_models`, e.g. one vLLM LoRA per task); the
        # server never sees the task name itself.
        import openai

        try:
            with self.client.completions.create(**self.request(prompt, stop, task, generation)) as response:
                for chunk in response:
                    for choice in chunk.choices:  # one per chunk; a usage-only chunk has none
                        if choice.text:
                            yield choice.text
        except (openai.OpenAIError, ValueError) as err:  # ValueError: malformed JSON in the stream
            raise BackendError(describe_failure(err, self.config)) from err

    def request(self, prompt: str, stop: tuple[str, ...], task: str = "report",
                generation: GenerationConfig | None = None) -> dict:
        """The completions request body (model looked up on the server when not configured)."""
        gen = generation or self.generation
        body = {
            "model": self.model_name(task),
            "prompt": prompt,
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,  # 0: greedy, like the local default
            "frequency_penalty": 0.0,  # not repetition_penalty: see the module docstring
            "stop": list(stop) or None,
            "stream": True,
        }
        if gen.seed is not None:
            body["seed"] = gen.seed  # OpenAI's field; vLLM and llama.cpp's server honour it
        return body

    def model_name(self, task: str = "report") -> str:
        """The task's served name (`task_models`), else `model`, else the server's only model."""
        named = getattr(self.config.task_models, task, "") or self.config.model
        return named or self._served_model

    @cached_property
    def _served_model(self) -> str:
        ids = [model.id for model in self.client.models.list()]
        if len(ids) != 1:
            raise BackendError(f"the model server at {self.config.base_url} serves {len(ids)} models "
                               f"({', '.join(ids[:5]) or 'none'}): name one with --served-model "
                               f"(or one per task: --set backend.task_models.TASK=NAME)")
        return ids[0]


def text_backend(config: AssistantConfig, vlm: "ClinicalVLM") -> TextBackend:
    """The backend `config.backend` names (no I/O: the remote client connects on first use)."""
    if config.backend.kind == "local":
        return LocalBackend(vlm)
    if config.backend.kind == "openai":
        return OpenAIBackend(config.backend, config.generation)
    raise ValueError(f"unknown backend kind {config.backend.kind!r}: use 'local' or 'openai'")


def describe_failure(err: BaseException, config: BackendConfig) -> str:
    """One actionable line for a failed request; the prompt is never part of it."""
    import openai

    where = f"the model server at {config.base_url}"
    if isinstance(err, openai.APITimeoutError):
        return f"{where} did not answer within {config.timeout_s:g} s (raise backend.timeout_s or check its load)"
    if isinstance(err, openai.APIConnectionError):
        cause = _short(str(err.__cause__ or "")) or "connection failed"
        return f"{where} is unreachable ({cause}): start it, or check --base-url"
    if isinstance(err, openai.APIStatusError):
        return f"{where} answered HTTP {err.status_code}: {_server_message(err)}"
    return f"{where} failed: {_short(str(err)) or type(err).__name__}"


def _server_message(err) -> str:
    """The server's own error text. Not `err.message`: the SDK appends the whole response body."""
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        body = inner.get("message") or inner.get("detail")
        if isinstance(body, list):  # FastAPI validation errors: their "input" can echo the request
            body = "; ".join(str(item.get("msg", "")) for item in body if isinstance(item, dict))
    return (_short(body) if isinstance(body, str) else "") or "no details"


def _short(text: str) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 1] + "…"
