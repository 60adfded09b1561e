"""Train and evaluate the default vision encoder (SigLIP tower + finding head) on the shared data.

Two stages on `train_loop.train`: (1) optional pretraining on PneumoniaMNIST (4,708 pediatric
images; only the Pneumonia output is supervised), (2) NIH ChestX-ray14 (patient-level train split,
all 14 findings) with a fixed PneumoniaMNIST subset mixed in so the Pneumonia output keeps what it
learnt. The epoch with the best validation score (mean of macro and normal-vs-abnormal AUROC on
the patient-level validation split) is kept. Checkpoints live in a work folder, never in `out`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import VisionConfig
from .imaging_data import (MAX_HELDOUT_PER_PATIENT, SPLIT_FRACTIONS, SPLIT_SEED, Augment, NihDataset, PneumoniaMnistDataset,
                           any_finding_bce, load_nih_records, masked_bce, patient_split, pos_weight)
from .train_loop import TrainConfig, make_loader, train
from .vision import (FINDINGS, VisionEncoder, build_vision_tower, config_for_weights, load_vision_encoder,
                     repo_root, resolve_weights, save_vision_encoder)

MIN_POSITIVES = 5  # fewer positives than this in a split: its AUROC is reported as null
# MedMNIST v2 (Yang et al., Scientific Data 2023): PneumoniaMNIST test AUC of its baselines.
PNEUMONIA_BASELINES = {"ResNet-18 (28)": 0.944, "ResNet-18 (224)": 0.956, "ResNet-50 (224)": 0.962}


@dataclass(frozen=True)
class VisionTrainSettings:
    epochs: int = 10  # NIH stage
    pretrain_epochs: int = 2  # PneumoniaMNIST stage; 0 skips it
    pneumonia_mix: int = 350  # PneumoniaMNIST images mixed into every NIH epoch
    batch_size: int = 32
    lr: float = 5e-4  # PneumoniaMNIST stage (from scratch)
    finetune_lr: float = 1e-4  # NIH stage: lower, so 700 images refine rather than overwrite the features
    weight_decay: float = 0.05
    pos_weight_cap: float = 10.0  # BCE pos_weight = negatives/positives, at most this
    any_finding_weight: float = 1.0  # weight of the noisy-OR "any finding" loss (0: off)
    seed: int = 0
    checkpoint_every: int = 20  # optimizer steps


def train_vision(out_dir: str | Path, settings: VisionTrainSettings = VisionTrainSettings(),
                 vision: VisionConfig | None = None, work_dir: str | Path | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """Train, keep the best validation epoch, save fp16 weights + metadata.json in `out_dir`."""
    vision = dataclasses.replace(vision or VisionConfig(), weights=None)  # always from scratch
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else repo_root() / ".cache" / "train-vision" / out.name
    if not resume and (work / "best").is_dir():
        shutil.rmtree(work / "best")  # a fresh run must not compete with an older run's best epoch
    torch.manual_seed(settings.seed)
    encoder = VisionEncoder(build_vision_tower(vision))
    split = patient_split(load_nih_records())
    stages = {}
    if settings.pretrain_epochs:
        stages["pretrain"] = _pretrain(encoder, vision, settings, work / "pretrain", resume)
    stages["nih"] = _finetune(encoder, vision, settings, split, work, resume)
    best = load_vision_encoder(dataclasses.replace(vision, weights=str(work / "best")))
    save_vision_encoder(best, out, vision)
    metadata = _metadata(vision, settings, split, stages)
    metadata["metrics"] = evaluate_vision(out)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def _pretrain(encoder, vision: VisionConfig, settings: VisionTrainSettings, work: Path, resume: bool):
    data = PneumoniaMnistDataset.load("train", image_size=vision.image_size, channels=vision.num_channels,
                                      augment=Augment())
    weight = pos_weight(*data.label_matrix(), cap=settings.pos_weight_cap)
    config = _train_config(settings, work, settings.pretrain_epochs, settings.lr)
    result = train(encoder, _loss(weight, settings), make_loader(data, config), config, resume=resume)
    return {"images": len(data), "epochs": settings.pretrain_epochs, "steps": result.step,
            "seconds": round(result.seconds, 1), "peak_memory_mb": result.peak_memory_mb}


def _finetune(encoder, vision: VisionConfig, settings: VisionTrainSettings, split, work: Path, resume: bool):
    sizes = {"image_size": vision.image_size, "channels": vision.num_channels}
    nih = NihDataset(split["train"], augment=Augment(), **sizes)
    parts: list[torch.utils.data.Dataset] = [nih]
    if settings.pneumonia_mix:
        mix = PneumoniaMnistDataset.load("train", augment=Augment(), **sizes)
        parts.append(mix.subset(settings.pneumonia_mix, seed=settings.seed))
    labels, masks = (np.concatenate(x) for x in zip(*(part.label_matrix() for part in parts)))
    data = torch.utils.data.ConcatDataset(parts)
    lr = settings.finetune_lr if settings.pretrain_epochs else settings.lr
    config = _train_config(settings, work / "nih", settings.epochs, lr)
    val = NihDataset(split["val"], **sizes)
    weight = pos_weight(labels, masks, cap=settings.pos_weight_cap)
    result = train(encoder, _loss(weight, settings), make_loader(data, config), config,
                   resume=resume, eval_fn=_keep_best(val, vision, work / "best"))
    return {"images": len(data), "nih_images": len(nih), "pneumonia_images": len(data) - len(nih),
            "epochs": settings.epochs, "steps": result.step, "seconds": round(result.seconds, 1),
            "peak_memory_mb": result.peak_memory_mb, "val_history": result.evals}


def _train_config(settings: VisionTrainSettings, work: Path, epochs: int, lr: float) -> TrainConfig:
    return TrainConfig(out_dir=str(work), lr=lr, weight_decay=settings.weight_decay, epochs=epochs,
                       batch_size=settings.batch_size, warmup_steps=20, seed=settings.seed,
                       checkpoint_every=settings.checkpoint_every)


def _loss(weight: torch.Tensor, settings: VisionTrainSettings):
    def loss_fn(model, batch) -> torch.Tensor:
        logits = model(batch["pixel_values"])  # (B, 14)
        loss = masked_bce(logits, batch["labels"], batch["mask"], weight)
        if settings.any_finding_weight:
            loss = loss + settings.any_finding_weight * any_finding_bce(logits, batch["labels"])
        return loss

    return loss_fn


def _keep_best(val: NihDataset, vision: VisionConfig, folder: Path):
    """An eval_fn that scores the validation split and saves the encoder whenever it improves.
    The best score lives on disk (best.json) so a resumed run keeps comparing against it."""

    def eval_fn(model: VisionEncoder) -> dict[str, Any]:
        metrics = finding_metrics(*predict(model, val))
        score = (metrics["macro_auroc"] + metrics["normal_vs_abnormal_auroc"]["noisy_or"]) / 2
        record = folder / "best.json"
        best = json.loads(record.read_text())["score"] if record.is_file() else -1.0
        if score > best:
            save_vision_encoder(model, folder, vision, dtype=None)
            record.write_text(json.dumps({"score": score}) + "\n")
        return {"val_score": round(score, 4), "val_macro_auroc": round(metrics["macro_auroc"], 4),
                "val_abnormal_auroc": round(metrics["normal_vs_abnormal_auroc"]["noisy_or"], 4)}

    return eval_fn


@torch.no_grad()
def predict(encoder: VisionEncoder, dataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, F), labels (N, F)) over a dataset, in eval mode, without augmentation."""
    encoder.eval()
    probs, labels = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        probs.append(torch.sigmoid(encoder(batch["pixel_values"]).float()).numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(probs), np.concatenate(labels)


def finding_metrics(probs: np.ndarray, labels: np.ndarray, ci: bool = False) -> dict[str, Any]:
    """Per-finding AUROC (null below MIN_POSITIVES), their macro mean, and normal vs abnormal
    (with a bootstrap 95% interval when `ci`)."""
    per_finding = {}
    for index, name in enumerate(FINDINGS):
        positives = int(labels[:, index].sum())
        enough = MIN_POSITIVES <= positives < len(labels)
        per_finding[name] = {"auroc": _auroc(labels[:, index], probs[:, index]) if enough else None,
                             "positives": positives}
    scored = [v["auroc"] for v in per_finding.values() if v["auroc"] is not None]
    abnormal = labels.max(axis=1)
    any_finding = 1.0 - np.prod(1.0 - probs, axis=1)
    return {
        "images": len(labels),
        "abnormal": int(abnormal.sum()),
        "macro_auroc": float(np.mean(scored)) if scored else float("nan"),
        "findings_scored": len(scored),
        # Any finding present: noisy-OR of the independent probabilities, and the largest one.
        "normal_vs_abnormal_auroc": {"noisy_or": _auroc(abnormal, any_finding),
                                     "noisy_or_ci95": _bootstrap_ci(abnormal, any_finding) if ci else None,
                                     "max": _auroc(abnormal, probs.max(axis=1))},
        "per_finding": per_finding,
    }


def _bootstrap_ci(labels: np.ndarray, scores: np.ndarray, rounds: int = 1000) -> list[float]:
    """95% interval of the AUROC over images resampled with replacement (fixed seed): how much a
    150-image test split can be trusted. Images of one patient are not independent, so it is optimistic."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(labels), len(labels))
        positives = labels[pick] > 0
        n_pos, n_neg = int(positives.sum()), int((~positives).sum())
        if n_pos and n_neg:  # Mann-Whitney form of the AUROC (ties get average ranks)
            ranks = rankdata(scores[pick])
            values.append((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def evaluate_vision(weights_dir: str | Path | None = None) -> dict[str, Any]:
    """Metrics of a weights folder on the held-out NIH test patients and the PneumoniaMNIST test set."""
    folder = Path(weights_dir) if weights_dir else resolve_weights(VisionConfig())
    vision = config_for_weights(folder)
    encoder = load_vision_encoder(vision)
    sizes = {"image_size": vision.image_size, "channels": vision.num_channels}
    test = NihDataset(patient_split(load_nih_records())["test"], **sizes)
    pneumonia = PneumoniaMnistDataset.load("test", **sizes)
    probs, labels = predict(encoder, pneumonia)
    column = FINDINGS.index("Pneumonia")
    return {
        "nih_test": finding_metrics(*predict(encoder, test), ci=True),
        "pneumoniamnist_test": {"auroc": _auroc(labels[:, column], probs[:, column]), "images": len(pneumonia),
                                "published_baselines_auroc": PNEUMONIA_BASELINES},
    }


def _metadata(vision: VisionConfig, settings: VisionTrainSettings, split, stages) -> dict:
    counts = {name: {"images": len(items), "patients": len({r.patient_id for r in items}),
                     "abnormal": sum(r.finding_labels != "No Finding" for r in items)}
              for name, items in split.items()}
    best = max(stages["nih"]["val_history"], key=lambda e: e["val_score"], default=None)
    return {
        "name": "vision-nih14",
        "data": {
            "nih": "NIH ChestX-ray14, 1,000-image 64 px subset (../shared/data/nih-cxr14-64px, NIH1000)",
            "nih_split": {"by": "patient_id", "seed": SPLIT_SEED, "fractions": SPLIT_FRACTIONS,
                          "max_heldout_images_per_patient": MAX_HELDOUT_PER_PATIENT, "counts": counts},
            "pneumoniamnist": "PneumoniaMNIST official split (train 4,708 / val 524 / test 624), 28 px",
        },
        "vision_config": dataclasses.asdict(dataclasses.replace(vision, weights=None)),
        "training": {"settings": dataclasses.asdict(settings), "stages": stages, "selected_epoch": best,
                     "seconds": round(sum(stage["seconds"] for stage in stages.values()), 1),
                     "peak_memory_mb": max(stage["peak_memory_mb"] for stage in stages.values()),
                     "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), "
                                f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}"},
        "findings": list(FINDINGS),
        "intended_use": "Draft for clinician review / research only; not a diagnostic device.",
        "limitations": [
            "64 px input: small nodules, fine lines (pneumothorax edge) and subtle opacities are lost.",
            "Trained on 1,000 NIH images from 264 patients; several findings have under 10 test positives.",
            "NIH labels were text-mined from reports (noisy, about 90% accurate per the dataset authors).",
            "PneumoniaMNIST is pediatric; adult performance on pneumonia is not established.",
        ],
    }

