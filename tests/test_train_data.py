"""Training examples: the app's prompts, train splits only, label matching, tokenisation, paired layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from assistant.evaluate_report import Study, load_studies
from assistant.imaging_data import NihRecord, load_nih_records, patient_split
from assistant.model import IMAGE_MARKER
from assistant.pipeline import report_prompt
from assistant.readability import READING_LEVELS
from assistant.report import parse_continuation
from assistant.train_data import (IGNORE, Example, TokenizedExamples, align_examples, build_examples, collate,
                                  image_findings, label_matched_pairs, report_examples, report_findings,
                                  report_target, target_vocabulary, validation_examples)

from conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not (SHARED_DATA / "iu-xray").is_dir(), reason="needs ../shared/data")


def study(study_id: str, findings: str, impression: str = "", indication: str = "cough") -> Study:
    return Study(study_id, indication, findings, impression)


def nih(index: str, labels: str, patient: int = 1) -> NihRecord:
    return NihRecord(Path(f"/nowhere/{index}"), index, patient, labels)


def test_the_target_is_what_the_report_parser_reads_back():
    target = report_target("The lungs are clear. ", " No acute disease.")
    assert target == "The lungs are clear.\n\nIMPRESSION:\nNo acute disease."
    parsed = parse_continuation(target)
    assert (parsed.findings, parsed.impression) == ("The lungs are clear.", "No acute disease.")
    assert report_target("Clear lungs.", "") == "Clear lungs."


def test_findings_are_matched_in_chexpert_names_and_unmatchable_ones_are_skipped():
    assert report_findings(study("a", "Large left pleural effusion.")) == frozenset({"Pleural Effusion"})
    assert report_findings(study("b", "The lungs are clear. No pneumothorax.")) == frozenset()
    assert report_findings(study("c", "Possible small effusion.")) is None  # uncertain: never matched
    assert image_findings(nih("x", "Effusion|Nodule")) == frozenset({"Pleural Effusion", "Lung Lesion"})
    assert image_findings(nih("y", "No Finding")) == frozenset()
    assert image_findings(nih("z", "Emphysema")) is None  # no CheXpert counterpart


def test_label_matched_pairs_have_equal_findings_and_a_seeded_choice():
    studies = [study("effusion", "Large right pleural effusion."), study("normal1", "The lungs are clear."),
               study("normal2", "No acute cardiopulmonary abnormality. The lungs are clear.")]
    records = [nih("1", "Effusion"), nih("2", "No Finding"), nih("3", "Hernia"), nih("4", "Pneumothorax")]
    pairs = label_matched_pairs(studies, records, seed=3)
    assert [(r.image_index, s.id if s.id == "effusion" else "normal") for r, s in pairs] == [
        ("1", "effusion"), ("2", "normal")]
    assert pairs == label_matched_pairs(studies, records, seed=3)


@needs_data
def test_report_examples_use_the_app_prompt_and_only_train_studies():
    train, val, test = (load_studies(split) for split in ("train", "val", "test"))
    examples = report_examples("train", image_fraction=0.25)
    assert [e.source for e in examples] == [s.id for s in train]
    assert not {e.source for e in examples} & {s.id for s in val + test}
    text_only = next(e for e, s in zip(examples, train) if not e.images)
    first = train[[e.source for e in examples].index(text_only.source)]
    assert text_only.prompt == report_prompt([], first.indication)
    with_image = [e for e in examples if e.images]
    assert with_image and all(e.prompt.count(IMAGE_MARKER) == 1 and Path(e.images[0]).is_file() for e in with_image)


@needs_data
def test_align_pairs_use_only_the_vision_encoders_training_patients():
    split = patient_split(load_nih_records())
    train_files = {str(r.path) for r in split["train"]}
    examples = align_examples("train")
    assert len(examples) > 300
    assert all(len(e.images) == 1 and e.images[0] in train_files for e in examples)
    assert all(("PA view" in e.prompt or "AP view" in e.prompt) and IMAGE_MARKER in e.prompt for e in examples)
    held_out = validation_examples("report", "align", 5)
    assert all(e.images[0] not in train_files for e in held_out)
    assert {e.source for e in held_out} <= {s.id for s in load_studies("val")}


def test_tokenised_examples_score_only_the_target(tiny_vlm, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)).save(image)
    prompt = f"chest x-ray {IMAGE_MARKER} findings :"
    data = TokenizedExamples([Example(prompt, "the lungs are clear .", (str(image),)),
                              Example("findings :", "no effusion")], tiny_vlm.build_inputs, tiny_vlm.tokenizer)
    first = data[0]
    prompt_ids = tiny_vlm.build_inputs(prompt, [np.zeros((4, 4), np.float32)])["input_ids"][0]
    assert torch.equal(first["input_ids"][:len(prompt_ids)], prompt_ids)
    assert (first["labels"][:len(prompt_ids)] == IGNORE).all()
    assert first["labels"][-1] == tiny_vlm.tokenizer.eos_token_id and first["pixel_values"].shape[0] == 1
    batch = collate([first, data[1]], pad_id=tiny_vlm.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == len(data[1]["input_ids"]) and batch["pixel_values"].shape[0] == 1
    vocab = target_vocabulary(data)
    assert tiny_vlm.tokenizer.eos_token_id in vocab and tiny_vlm.tokenizer.convert_tokens_to_ids("lungs") in vocab


def test_the_align_stage_exists_only_for_reports():
    with pytest.raises(ValueError, match="align"):
        build_examples("summary", "align")
    with pytest.raises(ValueError, match="unknown task"):
        build_examples("triage", "lora")


@needs_data
def test_summary_targets_state_only_lines_of_the_record_and_held_out_patients_stay_out():
    from assistant.ehr_records import synthea_split
    from assistant.evaluate_summary import SPLIT
    from assistant.train_data_text import summary_examples

    train, test = summary_examples("train"), summary_examples("test")
    assert train and test and not {e.source for e in train} & {e.source for e in test}
    assert {e.source for e in test} == {r.key for r in synthea_split(SHARED_DATA / "synthea", **SPLIT).test}
    for example in train:
        assert example.prompt.rstrip().endswith("Problems:")
        for line in example.target.splitlines():
            if line.startswith("- ") and line != "- None recorded.":
                assert line in example.prompt, line  # copied from the record, never invented


@needs_data
def test_education_examples_come_from_training_questions():
    from assistant.retrieval_passages import load_medquad, medquad_split
    from assistant.readability import reading_level_of
    from assistant.train_data_text import MAX_ANSWER_CHARS, educate_examples

    examples = educate_examples("train")
    test_qids = medquad_split(load_medquad(), seed=13).test_qids
    assert len(examples) > 9_000 and not {e.source for e in examples} & test_qids
    first = examples[0]
    assert first.prompt.rstrip().endswith("Answer:") and "[1] " in first.prompt
    assert 0 < len(first.target) <= MAX_ANSWER_CHARS
    assert sum(e.target[:200] in e.prompt for e in examples[:500]) < 10  # sources are other answers, not a copy
    assert not any(e.target.startswith(("These resources address", "Key Points", "What are")) for e in examples)
    levels = [next(level for level in READING_LEVELS if f"a {level} reading level" in e.prompt) for e in examples]
    assert levels[:300] == [reading_level_of(e.target) for e in examples[:300]]  # the level of its own target
    assert {levels.count(level) > 100 for level in READING_LEVELS} == {True}


def test_related_passages_follow_each_records_own_focus_where_a_qid_is_shared():
    from assistant.train_data_text import related_passages

    def record(qid, focus, answer):
        return {"qid": qid, "focus": focus, "question": f"What is {focus}?", "answer": answer}

    # One page, one qid, two diseases (as MedQuAD's cancer.gov pages are), each with another answer.
    records = [record("7-1", "Polycythemia Vera", "Polycythemia vera makes too many red cells."),
               record("7-1", "Primary Myelofibrosis", "Primary myelofibrosis scars the bone marrow."),
               record("8-2", "Polycythemia Vera", "Polycythemia vera is treated by removing blood."),
               record("9-3", "Primary Myelofibrosis", "Primary myelofibrosis may enlarge the spleen.")]
    related = related_passages(records)
    assert related[0] == ["Polycythemia vera is treated by removing blood."]
    assert related[1] == ["Primary myelofibrosis may enlarge the spleen."]
    assert related[2] == ["Polycythemia vera makes too many red cells."]  # never its own answer


def test_balanced_levels_keep_as_many_of_each_level_as_of_the_rarest_in_their_order():
    from assistant.train_data_text import _balanced

    levels = [READING_LEVELS[i] for i in (2, 2, 0, 1, 2, 1, 2, 0, 2, 1)]
    examples = [Example(f"prompt {i}", f"target {i}", source=str(i)) for i in range(len(levels))]
    kept = _balanced(examples, levels, seed=3)
    kept_levels = [levels[int(e.source)] for e in kept]
    assert [kept_levels.count(level) for level in READING_LEVELS] == [2, 2, 2]
    assert [int(e.source) for e in kept] == sorted(int(e.source) for e in kept)  # order kept
    assert _balanced(examples, levels, seed=3) == kept and _balanced(examples, levels, seed=4) != kept
    assert _balanced(examples[:2], levels[:2], seed=3) == examples[:2]  # a level missing: nothing to balance


def test_only_education_examples_balance_reading_levels():
    with pytest.raises(ValueError, match="educate only"):
        build_examples("summary", "lora", balance_levels=True)


@needs_data
def test_balanced_education_examples_hold_the_rarest_levels_count_of_each():
    from assistant.train_data_text import educate_examples

    balanced = educate_examples("train", balance_levels=True, seed=0)
    levels = [next(level for level in READING_LEVELS if f"a {level} reading level" in e.prompt) for e in balanced]
    counts = [levels.count(level) for level in READING_LEVELS]
    assert counts[0] == counts[1] == counts[2] > 400  # 532 simple targets in the train split


def test_education_targets_drop_page_furniture_and_resource_lists():
    from assistant.train_data_text import education_target

    answer = "What are the signs and symptoms of Gout? Key Points - Gout is a kind of arthritis. It hurts."
    assert education_target(answer) == "Gout is a kind of arthritis. It hurts."
    assert education_target("These resources address the diagnosis of gout: - MedlinePlus") == ""
    assert education_target("What are the signs of 16p13.3 deletion? The Human Phenotype Ontology provides a list") == ""
    assert education_target("Gout hurts. Is it bad? Yes.") == "Gout hurts. Is it bad? Yes."
    assert education_target("Is it inherited? " + "Yes. " * 300).startswith("Yes.")
    assert len(education_target("Gout hurts. " * 300)) <= 800


# ---- truly paired layouts (tiny fixtures that mimic them) ---------------------------------------

def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)


def test_the_r2gen_iu_layout_is_read_with_its_images(tmp_path):
    from assistant.train_data_paired import paired_examples

    for name in ("0.png", "1.png"):
        _png(tmp_path / "images" / "CXR1_1_IM-0001" / name)
    item = {"id": "CXR1_1_IM-0001", "report": "The lungs are clear.", "split": "train",
            "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]}
    (tmp_path / "annotation.json").write_text(json.dumps({"train": [item], "val": [], "test": []}))
    (example,) = paired_examples(tmp_path, "train")
    assert example.prompt.count(IMAGE_MARKER) == 2 and example.target == "The lungs are clear."
    assert all(Path(p).is_file() for p in example.images)
    assert paired_examples(tmp_path, "test") == []
    assert build_examples("report", "align", paired=str(tmp_path)) == [example]


def test_the_mimic_cxr_jpg_layout_is_read_by_split_with_report_sections(tmp_path):
    from assistant.train_data_paired import paired_examples

    study = tmp_path / "files" / "p10" / "p10000032"
    _png(study / "s50414267" / "d1.jpg")
    _png(study / "s50414267" / "d2.jpg")
    (study / "s50414267.txt").write_text("FINAL REPORT\n INDICATION: Cough.\n\n FINDINGS: No focal consolidation.\n"
                                         " IMPRESSION: No acute process.\n")
    with (tmp_path / "mimic-cxr-2.0.0-split.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["dicom_id", "study_id", "subject_id", "split"], ["d1", "50414267", "10000032", "train"],
                          ["d2", "50414267", "10000032", "train"], ["d9", "5", "10000032", "test"]])
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,ViewPosition\nd1,PA\nd2,LATERAL\n")
    (example,) = paired_examples(tmp_path, "train")
    assert "PA view, lateral view" in example.prompt and "INDICATION: Cough." in example.prompt
    assert example.target == "No focal consolidation.\n\nIMPRESSION:\nNo acute process."
    assert paired_examples(tmp_path, "test") == []  # its report and images are missing: skipped


def test_an_unknown_folder_names_both_layouts(tmp_path):
    from assistant.train_data_paired import paired_examples

    with pytest.raises(FileNotFoundError, match="annotation.json.*mimic-cxr"):
        paired_examples(tmp_path)
