"""Datasets for the vision encoder: patient-level split, label vectors, masked loss (real shared data)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from assistant.imaging_data import (Augment, NihDataset, PneumoniaMnistDataset, label_vector, load_nih_records,
                                    masked_bce, patient_split, pos_weight)
from assistant.vision import FINDINGS


@pytest.fixture(scope="module")
def records():
    return load_nih_records()


def test_manifest_gives_the_1000_nih1000_images(records):
    assert len(records) == 1000 and len({r.image_index for r in records}) == 1000
    assert all(r.path.is_file() for r in records[:20])


def test_patient_split_has_no_patient_in_two_splits(records):
    split = patient_split(records)
    patients = {name: {r.patient_id for r in items} for name, items in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(items) for items in split.values()) == len(records)
    for name, share in {"train": 0.70, "val": 0.15, "test": 0.15}.items():
        assert abs(len(split[name]) / len(records) - share) < 0.05
    for name in ("val", "test"):  # no single patient dominates a held-out split
        assert max(Counter(r.patient_id for r in split[name]).values()) <= 10
    # Fixed seed: the held-out patients never change between runs.
    assert [r.image_index for r in patient_split(records)["test"]] == [r.image_index for r in split["test"]]


def test_label_vectors():
    assert not label_vector("No Finding").any()
    vector = label_vector("Effusion|Mass")
    assert vector.shape == (14,) and vector.sum() == 2
    assert vector[FINDINGS.index("Effusion")] == 1 and vector[FINDINGS.index("Mass")] == 1
    assert label_vector("Pleural_Thickening|Hernia")[[12, 13]].tolist() == [1, 1]
    with pytest.raises(ValueError, match="unknown NIH finding"):
        label_vector("Fracture")


def test_nih_items_match_their_labels(records):
    item = NihDataset(records[:3])[2]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert torch.equal(item["labels"], torch.from_numpy(label_vector(records[2].finding_labels)))
    assert item["mask"].sum() == 14


def test_pneumoniamnist_supervises_only_the_pneumonia_output():
    data = PneumoniaMnistDataset.load("test")
    assert len(data) == 624
    item = data[0]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["mask"].nonzero().flatten().tolist() == [FINDINGS.index("Pneumonia")]
    assert item["labels"].sum() == data.labels[0]
    assert len(data.subset(50, seed=0)) == 50


def test_augment_keeps_shape_and_range_and_changes_the_image():
    torch.manual_seed(0)
    image = torch.rand(1, 64, 64)
    moved = Augment()(image)
    assert moved.shape == image.shape and 0.0 <= float(moved.min()) and float(moved.max()) <= 1.0
    assert not torch.equal(moved, image)


def test_masked_bce_ignores_unannotated_labels_and_weights_positives():
    logits = torch.zeros(2, 14)
    labels = torch.zeros(2, 14)
    mask = torch.zeros(2, 14)
    mask[:, 6] = 1.0
    base = masked_bce(logits, labels, mask)
    labels_elsewhere = labels.clone()
    labels_elsewhere[:, 0] = 1.0  # not annotated: must not change the loss
    assert torch.equal(masked_bce(logits, labels_elsewhere, mask), base)
    labels = np.zeros((100, 14), np.float32)
    labels[:20, 0] = 1.0  # 80 negatives / 20 positives
    labels[:1, 1] = 1.0  # 99 / 1, capped
    labels[:, 2] = 1.0  # more positives than negatives: never below 1
    weight = pos_weight(labels)
    assert weight[:3].tolist() == [4.0, 30.0, 1.0]
