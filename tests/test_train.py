"""LLM training stages on tiny random models: what trains, the target-token loss, save/reload, resume, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from assistant.model import ClinicalVLM
from assistant.train import (LLMTrainSettings, TrainableLoss, prepare_model, resolve_train_dtype, run_training,
                             sampled_candidates, target_loss)
from assistant.train_data import IGNORE

from conftest import ROOT, SHARED_DATA, tiny_config, tiny_language_model, tiny_tokenizer

needs_data = pytest.mark.skipif(not (SHARED_DATA / "iu-xray").is_dir(), reason="needs ../shared/data")


def settings(**overrides) -> LLMTrainSettings:
    base = dict(train_dtype="float32", batch_size=2, grad_accum=1, warmup_steps=0, val_examples=2, limit=8,
                checkpoint_every=1, image_fraction=1.0)
    return LLMTrainSettings(**{**base, **overrides})


def fresh_vlm() -> ClinicalVLM:
    torch.manual_seed(0)
    return ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())


def trainable(vlm: ClinicalVLM) -> list[str]:
    return [name for name, p in vlm.hf.named_parameters() if p.requires_grad]


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 7, 8, 9, 10, 11, 1], [2, 13, 14, 15, 1, 0, 0]])
    labels = ids.clone()
    labels[:, :3] = IGNORE  # the prompt
    labels[1, 5:] = IGNORE  # padding
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != IGNORE) | (torch.arange(7) < 3)}


def test_align_trains_only_the_projector_in_float32():
    vlm = prepare_model(tiny_config(adapter=None), settings(stage="align"), fresh_vlm())
    names = trainable(vlm)
    assert names and all("multi_modal_projector" in name for name in names)


def test_lora_trains_the_lora_and_the_projector_never_the_base_weights():
    vlm = prepare_model(tiny_config(adapter=None), settings(stage="lora"), fresh_vlm())
    names = trainable(vlm)
    assert any("lora_A" in n and "q_proj" in n for n in names) and any("down_proj.lora_B" in n for n in names)
    assert all("lora_" in n or "multi_modal_projector" in n for n in names)


def test_auto_dtype_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    assert resolve_train_dtype("float32") == "float32" and resolve_train_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert resolve_train_dtype("auto") == expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert resolve_train_dtype("auto") == "float32"  # a torch without the probes: the always-correct choice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_train_dtype("auto") == "float32"


def test_the_full_vocabulary_loss_is_the_models_own_loss():
    vlm = fresh_vlm()
    data = batch()
    expected = vlm.hf(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"]).loss
    assert torch.allclose(target_loss(vlm.hf, data), expected, atol=1e-5)
    everything = torch.arange(vlm.hf.lm_head.weight.shape[0])
    assert torch.allclose(target_loss(vlm.hf, data, vocab=everything, negatives=64), expected, atol=1e-5)


def test_sampled_negatives_stand_for_the_rest_of_the_vocabulary():
    torch.manual_seed(0)
    vocab = torch.tensor([3, 5, 9])
    ids, bias, column = sampled_candidates(vocab, 1000, negatives=200)
    assert torch.equal(ids[:3], vocab) and (bias[:3] == 0).all()
    drawn = ids[3:]
    assert len(drawn) > 190 and not set(drawn.tolist()) & {3, 5, 9}
    assert math.isclose(float(bias[3]), math.log(997 / len(drawn)), rel_tol=1e-5)
    assert column[5] == 1 and column[4] == -1


def test_checkpoints_hold_only_what_trains():
    vlm = prepare_model(tiny_config(adapter=None), settings(stage="lora"), fresh_vlm())
    module = TrainableLoss(vlm.hf)
    assert len(module.state_dict()) == len(trainable(vlm)) < len(vlm.hf.state_dict())


@needs_data
def test_a_tiny_model_trains_saves_and_reloads_to_the_same_logits(tmp_path):
    vlm = fresh_vlm()
    meta = run_training(tiny_config(adapter=None), settings(max_steps=2), str(tmp_path / "out"), str(tmp_path / "work"),
                        vlm=vlm)
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "projector.safetensors", "README.md"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metadata.json").read_text())
    assert saved["intended_use"].startswith("Draft for clinician review") and saved["training"]["steps"] == 2
    assert saved["data"]["train_examples_with_label_matched_image"] > 0 and "NOT paired" in saved["data"]["pairing"]
    assert meta["training"]["held_out_loss_full_vocab"]["after"] is not None
    reloaded = fresh_vlm()
    reloaded.load_adapter(out)
    inputs = vlm.build_inputs("chest <image> findings :", [torch.rand(40, 40).numpy()])
    vlm.hf.eval(), reloaded.hf.eval()
    with torch.no_grad():
        assert torch.allclose(vlm.hf(**inputs).logits, reloaded.hf(**inputs).logits, atol=1e-5)


@needs_data
def test_resume_continues_from_the_last_checkpoint(tmp_path):
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    run_training(tiny_config(adapter=None), settings(max_steps=2), out, work, vlm=fresh_vlm())
    meta = run_training(tiny_config(adapter=None), settings(max_steps=3), out, work, resume=True, vlm=fresh_vlm())
    result = json.loads((tmp_path / "work" / "train_result.json").read_text())
    assert result["resumed_from"] == 2 and meta["training"]["steps"] == 3 and len(result["losses"]) == 3
    assert meta["training"]["loss_curve"]["steps"] == [1, 3]  # the curve spans both runs


def test_a_lora_folder_is_not_a_starting_point(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a LoRA"):
        prepare_model(tiny_config(adapter=str(tmp_path)), settings(), fresh_vlm())


def test_cli_options_reach_the_settings_and_the_config(tmp_path):
    from assistant.cli import build_parser
    from assistant.cli_train import configs_from_args

    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps({"settings": {"lr": 0.5, "batch_size": 3}, "assistant": {"llm": {"lora_r": 4}}}))
    args = build_parser().parse_args(["train", "--stage", "align", "--task", "report", "--out", "x", "--config",
                                      str(saved), "--set", "train.lr=1e-4", "--set", "llm.lora_alpha=8",
                                      "--max-steps", "5"])
    config, chosen = configs_from_args(args)
    assert (chosen.stage, chosen.lr, chosen.batch_size, chosen.max_steps) == ("align", 1e-4, 3, 5)
    assert (config.llm.lora_r, config.llm.lora_alpha, config.adapter) == (4, 8, None)


def saved_tiny_run(tmp_path, limit: int = 4) -> Path:
    """A train_config.json for the tiny model saved as a local model folder (what --config reads)."""
    llm = tmp_path / "tiny-llm"
    tiny_language_model().save_pretrained(llm)
    tiny_tokenizer().save_pretrained(llm)
    config = tiny_config(adapter=None).override({"llm.path": str(llm), "llm.dtype": "float32"})
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps({"settings": {"limit": limit, "val_examples": 1, "batch_size": 2, "grad_accum": 1,
                                              "train_dtype": "float32"}, "assistant": config.to_dict()}))
    return saved


@needs_data
def test_the_train_command_runs_end_to_end_on_a_local_model(tmp_path):
    from assistant.cli import main

    out = tmp_path / "adapter"
    code = main(["train", "--stage", "align", "--task", "report", "--out", str(out), "--config",
                 str(saved_tiny_run(tmp_path)), "--max-steps", "1", "--work-dir", str(tmp_path / "work")])
    assert code == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["commands"]["train"].startswith("python") and (out / "train_config.json").is_file()
    assert not (out / "adapter_config.json").exists()  # align: projector only
    assert meta["training"]["processes"] == 1


@needs_data
def test_torchrun_on_cpus_is_one_data_parallel_run(tmp_path):
    """Two processes under torchrun on a CPU-only machine join one DDP run over gloo: each takes
    its own batches (the metadata counts both) and one of them writes the adapter."""
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "assistant", "train", "--stage", "lora", "--task", "report", "--out", str(out),
               "--config", str(saved_tiny_run(tmp_path, limit=8)), "--max-steps", "2",
               "--work-dir", str(tmp_path / "work")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((out / "metadata.json").read_text())["training"]
    assert training["processes"] == 2
    assert (training["steps"], training["micro_batches"], training["samples"]) == (2, 2, 8)
    assert (out / "adapter_config.json").is_file()
    assert done.stdout.count("held-out loss") == 1  # the main process alone reports and writes


def test_lora_layers_limits_the_lora_to_the_top_layers():
    vlm = fresh_vlm()
    vlm.config = vlm.config.override({"llm.lora_layers": 1})  # tiny model: 2 layers
    vlm.attach_lora()
    names = [name for name, p in vlm.hf.named_parameters() if "lora_" in name]
    assert names and all(".layers.1." in name for name in names)


def test_the_shipped_adapter_loads_by_default_only_on_the_built_in_architecture(tmp_path):
    from assistant.config import DEFAULT_ADAPTER, AssistantConfig
    from assistant.model import resolve_adapter

    from conftest import ROOT

    shipped = AssistantConfig().override({"adapter": DEFAULT_ADAPTER})
    assert resolve_adapter(shipped).resolve() == ROOT / DEFAULT_ADAPTER  # from any working directory
    assert resolve_adapter(shipped.override({"llm.path": str(tmp_path)})) is None  # another LLM
    assert resolve_adapter(tiny_config(adapter=DEFAULT_ADAPTER)) is None  # another vision tower
    assert resolve_adapter(shipped.override({"adapter": str(tmp_path)})) == tmp_path  # --adapter always wins
    assert resolve_adapter(shipped.override({"adapter": None})) is None


def test_held_out_evaluations_are_recorded_in_the_metadata_and_the_card(tmp_path):
    from assistant.adapter_card import attach_evaluation, build_metadata
    from assistant.train_data import Example
    from assistant.train_loop import TrainResult

    from conftest import ROOT

    result = TrainResult(step=2, batches=4, losses=[2.0, 1.0], seconds=3.0, peak_memory_mb=10.0)
    meta = build_metadata(tiny_config(adapter=None), settings(), [Example("p", "t", ("x.png",))], [], result,
                          {"before": 2.5, "after": 1.5}, str(tmp_path / "report-test"))
    assert meta["training"]["samples"] == 8 and meta["training"]["loss_curve"]["steps"] == [1, 2]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    evaluation = ROOT / "benchmarks" / "results" / "eval-report.json"
    saved = attach_evaluation(tmp_path, evaluation, evaluation)
    assert saved["metrics"]["adapter"]["scores"]["model"]["r2gen"]["BLEU_4"] is not None
    card = (tmp_path / "README.md").read_text()
    assert "| this adapter |" in card and "| untrained base model |" in card and "nearest neighbour" in card
    assert "NOT paired" in card and "Draft for clinician review" in card
