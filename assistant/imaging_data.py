"""Chest radiograph datasets for training the vision encoder: NIH ChestX-ray14 (64 px) and PneumoniaMNIST.

Every item is a dict of tensors: `pixel_values` (C, S, S) normalised like the encoder's input,
`labels` (F,) multi-hot over FINDINGS, and `mask` (F,) saying which labels the source actually
annotates (NIH: all 14; PneumoniaMNIST: only Pneumonia), so one masked loss serves both sources.

The NIH subset's own train/valid/test split is by image and leaks patients (31 of 264 patients
sit in more than one split); `patient_split` re-splits by patient with a fixed seed.
"""

from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .vision import FINDINGS, PIXEL_MEAN, PIXEL_STD, fit_to_square, repo_root

SPLIT_SEED = 20240614  # fixed: the held-out test patients must never change between runs
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
MAX_HELDOUT_PER_PATIENT = 10  # patients with more images are always in train (see patient_split)
NIH_FOLDER = "nih-cxr14-64px"
PNEUMONIA_FILE = "pneumoniamnist/pneumoniamnist_train_reconstructed_val_test_official.npz"


def shared_data_dir() -> Path:
    """`../shared/data` beside the repository (override with ASSISTANT_SHARED_DATA)."""
    env = os.environ.get("ASSISTANT_SHARED_DATA")
    return Path(env) if env else repo_root().parent / "shared" / "data"


@dataclass(frozen=True)
class NihRecord:
    path: Path
    image_index: str
    patient_id: int
    finding_labels: str  # NIH's pipe-separated labels, e.g. "Effusion|Mass" or "No Finding"


def label_vector(finding_labels: str) -> np.ndarray:
    """NIH "A|B" -> (14,) float32 multi-hot over FINDINGS; "No Finding" is all zeros."""
    names = {name.strip() for name in finding_labels.split("|")} - {"No Finding", ""}
    unknown = names - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown NIH finding labels: {sorted(unknown)}")
    return np.array([name in names for name in FINDINGS], dtype=np.float32)


def load_nih_records(root: Path | None = None) -> list[NihRecord]:
    """The 1,000 64 px NIH1000 images (the 128/512 px extras repeat some of them and are skipped)."""
    folder = (root or shared_data_dir()) / NIH_FOLDER
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"NIH manifest not found at {manifest}: set ASSISTANT_SHARED_DATA")
    with manifest.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["path"].startswith("NIH1000/")]
    return [NihRecord(folder / row["path"], row["image_index"], int(row["patient_id"]), row["finding_labels"])
            for row in rows]


def patient_split(records: list[NihRecord], seed: int = SPLIT_SEED, fractions: dict[str, float] = SPLIT_FRACTIONS,
                  max_heldout_per_patient: int = MAX_HELDOUT_PER_PATIENT) -> dict[str, list[NihRecord]]:
    """Split by patient so no patient is in two splits, with image counts close to `fractions`.

    Patients with more than `max_heldout_per_patient` images (14 patients hold 374 of the 1,000)
    always go to train: in a 150-image held-out split one of them would be up to 40% of the images
    and the AUROC would mostly measure that one patient. The others are shuffled with `seed` and
    placed, largest first, into the split furthest below its target share.
    """
    by_patient: dict[int, list[NihRecord]] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, []).append(record)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    patients.sort(key=lambda pid: -len(by_patient[pid]))  # stable: the shuffle breaks ties
    targets = {name: share * len(records) for name, share in fractions.items()}
    splits: dict[str, list[NihRecord]] = {name: [] for name in fractions}
    for pid in patients:
        if len(by_patient[pid]) > max_heldout_per_patient:
            name = "train"
        else:
            name = max(splits, key=lambda n: (targets[n] - len(splits[n])) / targets[n])
        splits[name].extend(by_patient[pid])
    return {name: sorted(items, key=lambda r: r.image_index) for name, items in splits.items()}


class Augment:
    """Small geometric and photometric jitter of a (1, S, S) image in [0, 1].

    No horizontal flips: a flipped radiograph puts the heart on the right (dextrocardia), an
    anatomy the model should not learn as normal, and the heatmaps must keep left and right.
    """

    def __init__(self, degrees: float = 7.0, translate: float = 0.06, scale: tuple[float, float] = (0.92, 1.08),
                 brightness: float = 0.08, contrast: tuple[float, float] = (0.8, 1.25)):
        self.degrees, self.translate, self.scale = degrees, translate, scale
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        angle = math.radians(_uniform(-self.degrees, self.degrees))
        zoom = _uniform(*self.scale)
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        shift = [_uniform(-self.translate, self.translate) * 2 for _ in range(2)]  # grid units span 2
        theta = torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]], dtype=image.dtype)
        grid = torch.nn.functional.affine_grid(theta[None], [1, *image.shape], align_corners=False)
        # Zero padding is black, the same as fit_to_square's padding.
        moved = torch.nn.functional.grid_sample(image[None], grid, align_corners=False)[0]
        mean = moved.mean()
        moved = (moved - mean) * _uniform(*self.contrast) + mean + _uniform(-self.brightness, self.brightness)
        return moved.clamp(0.0, 1.0)


def _uniform(low: float, high: float) -> float:
    # torch's RNG (not numpy's) so accelerate's checkpoints restore the augmentation stream too.
    return low + (high - low) * float(torch.rand(()))


def _item(pixels: np.ndarray, labels: np.ndarray, mask: np.ndarray, size: int, channels: int,
          augment: Augment | None) -> dict[str, torch.Tensor]:
    image = torch.from_numpy(fit_to_square(pixels, size))[None]  # (1, S, S)
    if augment is not None:
        image = augment(image)
    values = ((image - PIXEL_MEAN) / PIXEL_STD).expand(channels, -1, -1).contiguous()  # (C, S, S)
    return {"pixel_values": values, "labels": torch.from_numpy(labels), "mask": torch.from_numpy(mask)}


class NihDataset(Dataset):
    """NIH records -> items with 14 labels, all annotated. Images are read lazily (PIL, grayscale)."""

    def __init__(self, records: list[NihRecord], image_size: int = 64, channels: int = 3,
                 augment: Augment | None = None):
        self.records, self.image_size, self.channels, self.augment = list(records), image_size, channels, augment
        self.mask = np.ones(len(FINDINGS), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        with Image.open(record.path) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        return _item(pixels, label_vector(record.finding_labels), self.mask, self.image_size, self.channels,
                     self.augment)

    def label_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        labels = np.stack([label_vector(r.finding_labels) for r in self.records])  # (N, 14)
        return labels, np.broadcast_to(self.mask, labels.shape)


class PneumoniaMnistDataset(Dataset):
    """PneumoniaMNIST (pediatric, 28 px, normal vs pneumonia) mapped onto the Pneumonia finding only."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int = 64, channels: int = 3,
                 augment: Augment | None = None):
        self.images, self.labels = images, labels.reshape(-1).astype(np.float32)
        self.image_size, self.channels, self.augment = image_size, channels, augment
        self.mask = np.zeros(len(FINDINGS), dtype=np.float32)
        self.mask[FINDINGS.index("Pneumonia")] = 1.0

    @classmethod
    def load(cls, split: str, root: Path | None = None, **kwargs) -> "PneumoniaMnistDataset":
        path = (root or shared_data_dir()) / PNEUMONIA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"PneumoniaMNIST not found at {path}: set ASSISTANT_SHARED_DATA")
        with np.load(path) as data:
            return cls(data[f"{split}_images"], data[f"{split}_labels"], **kwargs)

    def subset(self, count: int, seed: int) -> "PneumoniaMnistDataset":
        keep = np.random.default_rng(seed).permutation(len(self.images))[:count]
        return PneumoniaMnistDataset(self.images[keep], self.labels[keep], self.image_size, self.channels,
                                     self.augment)

    def __len__(self) -> int:
        return len(self.images)

    def label_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        labels = self.mask[None] * self.labels[:, None]  # (N, 14), only Pneumonia can be set
        return labels, np.broadcast_to(self.mask, labels.shape)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        labels = self.mask * self.labels[index]
        pixels = self.images[index].astype(np.float32) / 255.0
        return _item(pixels, labels, self.mask, self.image_size, self.channels, self.augment)


def pos_weight(labels: np.ndarray, mask: np.ndarray | None = None, cap: float = 30.0) -> torch.Tensor:
    """BCE pos_weight = negatives / positives per finding among annotated items, capped so a finding
    with six positives cannot dominate the loss."""
    mask = np.ones_like(labels) if mask is None else mask
    positives = (labels * mask).sum(axis=0)
    ratio = (mask.sum(axis=0) - positives) / np.maximum(positives, 1.0)
    return torch.from_numpy(np.clip(ratio, 1.0, cap).astype(np.float32))


def any_finding_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of "any finding present" scored as noisy-OR, 1 - prod(1 - p_i), the normal-vs-abnormal
    score the app and the evaluation use; it teaches the 14 outputs to combine well.
    Valid for both sources: PneumoniaMNIST normals are normal radiographs."""
    log_normal = -torch.nn.functional.softplus(logits.float()).sum(dim=1)  # log prod(1 - p_i)
    log_normal = log_normal.clamp(max=-1e-6)  # log(1 - exp(0)) is -inf
    abnormal = labels.max(dim=1).values
    return -(abnormal * torch.log(-torch.expm1(log_normal)) + (1 - abnormal) * log_normal).mean()


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE over the annotated (mask=1) labels only; `weight` is BCE's per-finding pos_weight."""
    weight = None if weight is None else weight.to(logits.device)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), labels, pos_weight=weight, reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
