"""Training examples for the LLM stages: prompt (the app's own template) + target continuation.

Every example is rendered with the template the app uses at inference (`pipeline.report_prompt`,
`prompts/summarize.md`, `prompts/educate.md`), so the adapter learns exactly the continuation the
app asks for. The loss covers the target tokens only (prompt and padding are labelled -100).

Report data: IU X-ray reports of the R2Gen **train** split only (val/test studies are never
trained on); target = "{findings}\n\nIMPRESSION:\n{impression}" + EOS, the text `report.py` parses.
IU X-ray carries no images here, so image examples are **label-matched pairs, not true pairs**:
an NIH ChestX-ray14 image (patient-level train split) next to an IU train report whose rule-labeler
findings equal the image's NIH labels (mapped to CheXpert names). They teach the projector where
image tokens go in the LLM's space, never how to read a specific radiograph.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .evaluate_report import Study, load_studies
from .imaging_data import NihRecord, load_nih_records, patient_split
from .labeler import NIH14_FROM_CHEXPERT, label_report
from .pipeline import report_prompt
from .report import DraftReport

IGNORE = -100  # label of positions without loss (prompt, padding)
TASKS = ("report", "summary", "educate")
# NIH-14 name -> CheXpert name; NIH findings without a CheXpert counterpart make an image unmatched.
CHEXPERT_FROM_NIH = {nih: chex for chex, nihs in NIH14_FROM_CHEXPERT.items() for nih in nihs}


@dataclass(frozen=True)
class Example:
    prompt: str  # the rendered template; each IMAGE_MARKER is filled by one entry of `images`
    target: str  # what the model should write after the prompt (EOS is appended when tokenised)
    images: tuple[str, ...] = ()  # image files (PNG/JPEG), read as grayscale in [0, 1]
    source: str = ""  # study / patient / question id, for provenance and split checks


@dataclass(frozen=True)
class _View:
    """The one Scan attribute report_prompt reads (the view name), for images we load ourselves."""

    view_position: str | None


def report_target(findings: str, impression: str) -> str:
    """The continuation after the prompt's "FINDINGS:" line, in the layout report.py parses."""
    text = DraftReport(findings.strip(), impression.strip()).to_text(partial=True)
    return text.removeprefix("FINDINGS:\n")


def report_example(study: Study, images: Sequence[str] = (), views: Sequence[str | None] = ()) -> Example:
    scans = [_View(view) for view in views] if images else []
    return Example(report_prompt(scans, study.indication), report_target(study.findings, study.impression),
                   tuple(images), study.id)


# ---- label matching (images and reports are not paired in our data) ----------------------------

def report_findings(study: Study) -> frozenset[str] | None:
    """CheXpert findings the rule labeler calls positive; None when the report cannot be matched
    (an uncertain finding, or an "other" finding that vetoes No Finding without naming a label)."""
    labels = label_report(f"{study.findings} {study.impression}")
    if any(labels[name] == -1 for name in NIH14_FROM_CHEXPERT):
        return None
    found = frozenset(name for name in NIH14_FROM_CHEXPERT if labels[name] == 1)
    return found if found or labels["No Finding"] == 1 else None


def image_findings(record: NihRecord) -> frozenset[str] | None:
    """The NIH labels in CheXpert names; None if any has no counterpart (Emphysema, Fibrosis, Hernia)."""
    names = {n.strip() for n in record.finding_labels.split("|")} - {"No Finding", ""}
    if any(name not in CHEXPERT_FROM_NIH for name in names):
        return None
    return frozenset(CHEXPERT_FROM_NIH[name] for name in names)


def label_matched_pairs(studies: Sequence[Study], records: Sequence[NihRecord],
                        seed: int = 0) -> list[tuple[NihRecord, Study]]:
    """Each matchable NIH image with one IU report of exactly the same findings (seeded choice)."""
    by_findings: dict[frozenset[str], list[Study]] = {}
    for study in studies:
        key = report_findings(study)
        if key is not None:
            by_findings.setdefault(key, []).append(study)
    rng = random.Random(seed)
    pairs = []
    for record in records:
        key = image_findings(record)
        if key is not None and by_findings.get(key):
            pairs.append((record, rng.choice(by_findings[key])))
    return pairs


# ---- the report task's datasets ----------------------------------------------------------------

def nih_records(split: str, root: Path | None = None) -> list[NihRecord]:
    """NIH images of the vision encoder's patient split (its val/test patients stay unseen in training)."""
    return patient_split(load_nih_records(root))[split]


def _image_examples(pairs: Sequence[tuple[NihRecord, Study]]) -> list[Example]:
    views = _nih_views(pairs[0][0]) if pairs else {}
    return [report_example(study, [str(rec.path)], [views.get(rec.image_index)]) for rec, study in pairs]


def align_examples(split: str = "train", seed: int = 0, root: Path | None = None) -> list[Example]:
    """Stage 1: one example per label-matched (NIH image, IU report) pair of the same split."""
    return _image_examples(label_matched_pairs(load_studies(split, root), nih_records(split, root), seed))


def report_examples(split: str = "train", image_fraction: float = 0.0, seed: int = 0,
                    root: Path | None = None) -> list[Example]:
    """Stage 2: every IU report of the split, drafted from its indication; a seeded `image_fraction`
    of them also gets a label-matched NIH image (when one exists) so the image path keeps working."""
    studies = load_studies(split, root)
    rng = random.Random(seed)
    matched: dict[str, tuple[NihRecord, Study]] = {}
    if image_fraction > 0:
        for record, study in label_matched_pairs(studies, nih_records(split, root), seed):
            matched.setdefault(study.id, (record, study))
    picked = {study.id for study in studies if rng.random() < image_fraction and study.id in matched}
    with_image = {ex.source: ex for ex in _image_examples([matched[i] for i in sorted(picked)])}
    return [with_image.get(study.id) or report_example(study) for study in studies]


def _nih_views(record: NihRecord) -> dict[str, str]:
    """image_index -> view (PA/AP) from the manifest beside the images."""
    import csv

    manifest = record.path.parents[3] / "manifest.csv"  # <nih>/NIH1000/<split>/<class>/<file>
    with manifest.open(newline="") as handle:
        return {row["image_index"]: row["view"] for row in csv.DictReader(handle)}


def build_examples(task: str, stage: str, image_fraction: float = 0.0, seed: int = 0,
                   root: Path | None = None, split: str = "train", paired: str | None = None,
                   balance_levels: bool = False) -> list[Example]:
    """The examples of one task and stage (summary/educate are text-only LoRA tasks). `paired`: a
    truly paired dataset folder (train_data_paired.py layouts) replacing IU text + label matching.
    `balance_levels`: educate only, equal shares of the three reading levels."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if balance_levels and task != "educate":
        raise ValueError("balance_levels balances the reading levels of --task educate only")
    if paired is not None:
        if task != "report":
            raise ValueError("a paired image-report dataset serves --task report only")
        from .train_data_paired import paired_examples

        return paired_examples(paired, split)
    if stage == "align":
        if task != "report":
            raise ValueError("the align stage needs images: it exists for --task report only")
        return align_examples(split, seed, root)
    if task == "report":
        return report_examples(split, image_fraction, seed, root)
    from .train_data_text import educate_examples, summary_examples

    if task == "summary":
        return summary_examples(split, root)
    return educate_examples(split, root, balance_levels, seed)


def validation_examples(task: str, stage: str, count: int, seed: int = 0, root: Path | None = None,
                        paired: str | None = None) -> list[Example]:
    """The first `count` held-out examples for the exact loss: R2Gen val studies (text-only for
    lora, label-matched for align), held-out Synthea patients, held-out MedQuAD questions."""
    if count <= 0:
        return []
    split = "val" if task == "report" else "test"
    return build_examples(task, stage, 0.0, seed, root, split=split, paired=paired)[:count]


# ---- tokenisation ------------------------------------------------------------------------------

def read_grayscale(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


class TokenizedExamples(torch.utils.data.Dataset):
    """Examples -> input_ids / labels / pixel_values through the model's own `build_inputs`, so the
    prompt is tokenised exactly as at inference; the target is tokenised separately, as generated."""

    def __init__(self, examples: Sequence[Example], build_inputs: Callable, tokenizer,
                 max_target_tokens: int = 192):
        self.examples, self.build_inputs, self.tokenizer = list(examples), build_inputs, tokenizer
        self.max_target_tokens = max_target_tokens

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        inputs = self.build_inputs(example.prompt, [read_grayscale(p) for p in example.images])
        target = self.tokenizer(example.target, add_special_tokens=False)["input_ids"][:self.max_target_tokens - 1]
        target = torch.tensor(target + [self.tokenizer.eos_token_id])
        prompt = inputs["input_ids"][0]
        item = {"input_ids": torch.cat([prompt, target]),
                "labels": torch.cat([torch.full_like(prompt, IGNORE), target])}
        if "pixel_values" in inputs:
            item["pixel_values"] = inputs["pixel_values"]  # (n_images, C, S, S)
        return item


def collate(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item; images of all items in order (the model fills placeholders
    in reading order, so item order and image order agree)."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        size = len(item["input_ids"])
        input_ids[row, :size], labels[row, :size], mask[row, :size] = item["input_ids"], item["labels"], 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    images = [item["pixel_values"] for item in items if "pixel_values" in item]
    if images:
        batch["pixel_values"] = torch.cat(images)
    return batch


def target_vocabulary(dataset: TokenizedExamples) -> torch.Tensor:
    """Sorted ids of every token that occurs in a training target (the "domain vocabulary")."""
    ids: set[int] = {dataset.tokenizer.eos_token_id}
    for example in dataset.examples:
        ids.update(dataset.tokenizer(example.target, add_special_tokens=False)["input_ids"])
    return torch.tensor(sorted(ids))
