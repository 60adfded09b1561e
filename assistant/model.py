"""ClinicalVLM: vision tower -> projector -> causal LM, assembled as a stock LlavaForConditionalGeneration.

Using the standard class means image features are spliced into the LLM's input embeddings at a real
placeholder token with `masked_scatter` (and a clear error when counts differ) by transformers
itself, `save_pretrained` gives a checkpoint any transformers or vLLM loads, and LoRA goes through
peft's public API on the language model only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .base_models import ModelPathError, resolve_llm_dir
from .config import DEFAULT_ADAPTER, DEFAULT_LLM, AssistantConfig, GenerationConfig, TaskAdapterConfig
from .projector import build_projector
from .vision import build_vision_config, build_vision_tower, to_pixel_values

IMAGE_MARKER = "<image>"  # where a prompt template wants the image; expanded to N placeholder ids
ADAPTER_CONFIG = "assistant_config.json"
PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision.safetensors"


class ClinicalVLM:
    """A thin facade: owns the HF model and tokenizer, builds inputs, generates, manages adapters."""

    def __init__(self, hf_model, tokenizer, config: AssistantConfig, image_token_id: int):
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = image_token_id
        self._num_image_tokens: int | None = None
        # task -> peft adapter name (None: LoRA off for that task); empty: one adapter for every task
        self.task_adapters: dict[str, str | None] = {}
        self._adapter_lock = threading.Lock()  # the active adapter is model state: one generation at a time
        self.fast = None  # a FastGeneration once start_fast_decoding() ran

    # ---- assembly -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: AssistantConfig, progress: bool = True) -> "ClinicalVLM":
        """Load the base LLM (converting the default once), build the tower, load the adapter."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        llm_dir = resolve_llm_dir(config.llm.path, progress=progress)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
            lm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=getattr(torch, config.llm.dtype))
        except (OSError, ValueError, KeyError) as err:
            raise ModelPathError(f"could not load the LLM from {config.llm.path!r}: {_first_line(err)}") from err
        vlm = cls.from_parts(lm, tokenizer, config)
        adapter = resolve_adapter(config)
        if adapter is not None:
            vlm.load_adapter(adapter)
            vlm.load_task_adapters(resolve_task_adapters(config))
        vlm.hf.eval()
        return vlm

    @classmethod
    def from_parts(cls, language_model, tokenizer, config: AssistantConfig) -> "ClinicalVLM":
        """Wrap a loaded causal LM with a vision tower and projector in a LlavaForConditionalGeneration."""
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        image_token_id = _image_token_id(tokenizer, config.llm.image_token)
        vision_config = build_vision_config(config.vision)
        llava_config = LlavaConfig(
            vision_config=vision_config,
            text_config=language_model.config,
            image_token_index=image_token_id,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
            projector_hidden_act="gelu",
        )
        # Build the shell on the meta device (no 262k x 640 random init), then move real parts in.
        with torch.device("meta"):
            hf = LlavaForConditionalGeneration(llava_config)
        dtype = language_model.dtype
        hf.model.language_model = language_model.get_decoder()
        hf.lm_head = language_model.get_output_embeddings()
        # generate() scores only the last position, hidden[:, -1:, :], a strided view: with the frozen
        # weight of a served model, torch's matmul then expands the 262k x 640 weight per batch row
        # and copies it (2.7 GB for 8 rows, 20 s on 2 cores). A contiguous input is one plain matmul.
        hf.lm_head.register_forward_pre_hook(_contiguous_input)
        hf.model.vision_tower = build_vision_tower(config.vision, vision_config).to(dtype)
        hf.model.multi_modal_projector = build_projector(
            config.projector.kind, vision_config, language_model.config
        ).to(dtype)
        hf.generation_config = language_model.generation_config
        _assert_materialised(hf)
        return cls(hf, tokenizer, config, image_token_id)

    # ---- inputs -----------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """Placeholder positions one image fills (measured once from the tower's real output)."""
        if self._num_image_tokens is None:
            size = self.config.vision.image_size
            dummy = torch.zeros(1, self.config.vision.num_channels, size, size, dtype=self.hf.dtype)
            with torch.no_grad():
                features = self.image_features(dummy)
            self._num_image_tokens = int(features.shape[1])
        return self._num_image_tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens (B, N, D_text)."""
        out = self.hf.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(out.pooler_output))

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        cfg = self.config.vision
        return to_pixel_values(images, cfg.image_size, cfg.num_channels).to(self.hf.dtype)

    def build_inputs(self, prompt: str, images: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise a prompt whose IMAGE_MARKERs each become num_image_tokens placeholder ids."""
        images = images or []
        pieces = prompt.split(IMAGE_MARKER)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"prompt has {len(pieces) - 1} image markers but {len(images)} images were given")
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            piece_ids = self.tokenizer(piece, add_special_tokens=index == 0)["input_ids"]
            if self.image_token_id in piece_ids:
                # Text must never smuggle in image placeholders (the splice would misalign).
                raise ValueError("prompt text contains the reserved image placeholder token")
            ids.extend(piece_ids)
            if index < len(images):
                ids.extend([self.image_token_id] * self.num_image_tokens)
        input_ids = torch.tensor([ids])
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            inputs["pixel_values"] = self.pixel_values(images)
        return inputs

    # ---- generation -------------------------------------------------------------------------
    def generate_kwargs(self, gen: GenerationConfig) -> dict:
        sample = gen.temperature > 0
        kwargs = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": sample,
            "repetition_penalty": gen.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sample:
            kwargs["temperature"] = gen.temperature
        return kwargs

    def stream(self, inputs: dict[str, torch.Tensor], gen: GenerationConfig | None = None,
               stop: tuple[str, ...] = (), task: str = "report") -> Iterator[str]:
        """Yield decoded text pieces as they are generated; re-raise a failure of the generator.

        `stop` strings end generation early (e.g. the next "Patient:" turn of a dialogue prompt);
        the stop string itself may appear in the last piece, callers trim it. `task` picks the
        LoRA adapter (see `load_task_adapters`).
        """
        from transformers import TextIteratorStreamer

        gen = gen or self.config.generation
        if self.fast is not None and self.fast.usable(inputs, gen):
            with self.adapter_for(task):
                yield from self.fast.pieces(inputs, gen, stop, self.adapter_name(task))
            return
        prompt_length = inputs["input_ids"].shape[1]
        extra = {"stopping_criteria": [_StopOnText(self.tokenizer, stop, prompt_length)]} if stop else {}
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self.adapter_for(task), torch.inference_mode():
                    if gen.temperature > 0 and gen.seed is not None:
                        # generate() has no generator argument: seed the global one, under the
                        # adapter lock that already serialises generations.
                        torch.manual_seed(gen.seed)
                    self.hf.generate(**inputs, streamer=streamer, **self.generate_kwargs(gen), **extra)
            except BaseException as err:  # surfaced to the consumer below, never swallowed
                failure.append(err)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def generate_batch(self, prompts: list[str], gen: GenerationConfig | None = None,
                       stop: tuple[str, ...] = (), task: str = "report") -> list[str]:
        """Complete several text-only prompts in one left-padded batch; the new text of each.

        For evaluation runs: decoding is memory-bound on a CPU (every step reads the whole 262k-row
        output matrix whether it scores one row or eight), so a batch of 8 costs little more per step
        than one prompt. Greedy results match one-at-a-time `stream` except where bf16 rounding on the
        padded rows flips a near-tie (measured and reported by the evaluation that uses this).
        """
        gen = gen or self.config.generation
        rows = [self.build_inputs(prompt)["input_ids"][0] for prompt in prompts]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):  # left padding: every prompt ends where generation starts
            input_ids[index, width - len(row):] = row
            attention_mask[index, width - len(row):] = 1
        extra = {"stopping_criteria": [_StopOnText(self.tokenizer, stop, width)]} if stop else {}
        with self.adapter_for(task), torch.inference_mode():
            out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   **self.generate_kwargs(gen), **extra)
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    def start_fast_decoding(self, wait: bool = False, compile: bool = True):
        """Compile the fast decoder in the background; `stream` uses it once ready (see
        assistant.fast_generate). `wait` blocks until it is ready or has failed."""
        from .fast_generate import FastGeneration

        if self.fast is None:
            self.fast = FastGeneration(self, compile=compile)
        return self.fast.start(wait=wait)

    # ---- adapters ---------------------------------------------------------------------------
    def attach_lora(self) -> None:
        """Wrap the model with a fresh LoRA on the language model's attention and MLP projections."""
        from peft import LoraConfig, get_peft_model

        cfg = self.config.llm
        targets = "|".join(cfg.lora_targets)
        scope = ""
        if cfg.lora_layers:  # the top N decoder layers: backward then stops below them (text-only input)
            count = self._base_model().config.text_config.num_hidden_layers
            layers = "|".join(str(i) for i in range(max(0, count - cfg.lora_layers), count))
            scope = rf"\.layers\.({layers})\..*"
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            # Only the language model gets LoRA; the vision tower and projector train in full.
            target_modules=rf".*language_model.*{scope}\.({targets})",
            task_type="CAUSAL_LM",
        )
        self.hf = get_peft_model(self.hf, lora)

    def save_adapter(self, folder: str | Path, metadata: dict | None = None, vision: bool = True,
                     weights: dict[str, torch.Tensor] | None = None) -> Path:
        """peft adapter + projector and vision weights (safetensors) + the config that built them.
        `vision=False` leaves the tower out when it is the unchanged one from `vision.weights`.
        `weights` ({name in `self.hf.named_parameters()`: tensor}) supplies the trained LoRA and
        projector tensors when the model's own are shards of them (`train_shard`)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(self.hf, "peft_config"):
            self.hf.save_pretrained(str(folder), state_dict=weights)  # peft keeps the LoRA tensors of it
        base = self._base_model()
        projector = base.model.multi_modal_projector
        projector_state = _cpu_state(projector) if weights is None else self._part_of(weights, projector)
        save_file(projector_state, str(folder / PROJECTOR_FILE))
        if vision:
            save_file(_cpu_state(base.model.vision_tower), str(folder / VISION_FILE))
        self.config.to_json(folder / ADAPTER_CONFIG)
        if metadata is not None:
            (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        return folder

    def _part_of(self, weights: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The entries of `weights` (named from `self.hf`) that belong to `module`, named from it."""
        prefix = next(name for name, m in self.hf.named_modules() if m is module) + "."
        return {name.removeprefix(prefix): value.contiguous() for name, value in weights.items()
                if name.startswith(prefix)}

    def load_adapter(self, folder: str | Path) -> None:
        """Load projector/vision weights and, if present, the peft LoRA adapter from an adapter folder."""
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        if not folder.is_dir() or not (folder / PROJECTOR_FILE).is_file():
            raise ModelPathError(
                f"adapter path {str(folder)!r} is not an adapter folder (no {PROJECTOR_FILE}): "
                "pass --adapter a folder made by `python -m assistant train`"
            )
        base = self._base_model()
        base.model.multi_modal_projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
        if (folder / VISION_FILE).is_file():
            base.model.vision_tower.load_state_dict(load_file(str(folder / VISION_FILE)))
        if (folder / "adapter_config.json").is_file():
            from peft import PeftModel

            self.hf = PeftModel.from_pretrained(self.hf, str(folder))

    def load_task_adapters(self, folders: dict[str, Path | None]) -> None:
        """Load each text task's LoRA beside the report one: peft named adapters sharing the base
        weights (3.4 MB each), switched per generation by `adapter_for`. A None folder runs that
        task with LoRA off. Report drafting keeps the adapter `load_adapter` loaded (if it had LoRA)."""
        from peft import PeftModel

        self.task_adapters = {"report": "default" if hasattr(self.hf, "peft_config") else None}
        for task, folder in folders.items():
            if folder is None:
                self.task_adapters[task] = None
                continue
            if not (Path(folder) / "adapter_config.json").is_file():
                raise ModelPathError(f"{task} adapter {str(folder)!r} holds no LoRA (no adapter_config.json)")
            if hasattr(self.hf, "peft_config"):
                self.hf.load_adapter(str(folder), adapter_name=task)
            else:
                self.hf = PeftModel.from_pretrained(self.hf, str(folder), adapter_name=task)
            self.task_adapters[task] = task

    @contextlib.contextmanager
    def adapter_for(self, task: str) -> Iterator[None]:
        """Generate for `task` with its adapter active (one task at a time: the lock serialises)."""
        with self._adapter_lock:
            if not self.task_adapters or not hasattr(self.hf, "peft_config"):  # one adapter, or no LoRA at all
                yield
                return
            name = self.task_adapters.get(task, self.task_adapters["report"])
            if name is None:
                with self.hf.disable_adapter():
                    yield
            else:
                self.hf.set_adapter(name)
                yield

    def adapter_name(self, task: str) -> str | None:
        """The peft adapter `adapter_for(task)` activates (None: the base weights)."""
        if not hasattr(self.hf, "peft_config"):
            return None
        if not self.task_adapters:
            active = self.hf.active_adapter
            return active if isinstance(active, str) else active[0]
        return self.task_adapters.get(task, self.task_adapters["report"])

    def adapter_names(self) -> list[str | None]:
        """Every adapter some task generates with (the report one first)."""
        tasks = ["report", *sorted(t for t in self.task_adapters if t != "report")]
        return list(dict.fromkeys(self.adapter_name(task) for task in tasks))

    def _base_model(self):
        """The LlavaForConditionalGeneration under any peft wrapper."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf


def resolve_adapter(config: AssistantConfig) -> Path | None:
    """The adapter folder to load, or None. A relative path falls back to the repository root (like
    prompts/ and the vision weights), so the shipped default loads from any working directory. The
    shipped default was trained on the built-in LLM, vision tower and projector: with another model
    or architecture it is skipped (its weights would not fit), while an explicit --adapter is not."""
    if not config.adapter:
        return None
    if config.adapter == DEFAULT_ADAPTER and not _built_in_architecture(config):
        return None
    return repo_path(config.adapter)


def resolve_task_adapters(config: AssistantConfig) -> dict[str, Path | None]:
    """Each text task's adapter folder (None: LoRA off for it); {} without a report adapter, so
    `adapter: null` means the untrained base for every task. Shipped defaults follow resolve_adapter."""
    if resolve_adapter(config) is None:
        return {}
    defaults = TaskAdapterConfig()
    folders = {}
    for task, path in dataclasses.asdict(config.task_adapters).items():
        shipped = path == getattr(defaults, task)
        folders[task] = repo_path(path) if path and not (shipped and not _built_in_architecture(config)) else None
    return folders


def repo_path(path: str) -> Path:
    """A shipped artefact's folder: as given when it exists or is absolute, else under the
    repository root (so adapters/... resolves from any working directory)."""
    folder = Path(path).expanduser()
    if not folder.is_absolute() and not folder.exists():
        folder = Path(__file__).resolve().parents[1] / folder
    return folder


def _built_in_architecture(config: AssistantConfig) -> bool:
    default = AssistantConfig()
    same_tower = dataclasses.replace(config.vision, weights=None) == dataclasses.replace(default.vision, weights=None)
    return config.llm.path == DEFAULT_LLM and same_tower and config.projector == default.projector


class _StopOnText:
    """Stops generation once the decoded tail of the new tokens contains a stop string.

    Decoding the last few tokens per step costs microseconds next to a model step and works with
    any tokenizer (transformers' stop_strings pre-processes the whole vocabulary per tokenizer).
    """

    TAIL_TOKENS = 24

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:][:, -self.TAIL_TOKENS:],
                                            skip_special_tokens=True)
        return torch.tensor([any(stop in tail for stop in self.stops) for tail in tails], device=input_ids.device)


def _image_token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ModelPathError(
            f"the LLM's tokenizer has no {token!r} token to use as the image placeholder: "
            "set llm.image_token to a reserved token of that tokenizer"
        )
    return int(token_id)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _assert_materialised(module: torch.nn.Module) -> None:
    leftovers = [name for name, p in module.named_parameters() if p.is_meta]
    if leftovers:
        raise RuntimeError(f"model assembly left parameters on the meta device: {leftovers[:3]}")


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
