"""FSDP2 sharding of the whole model (`--shard fsdp`): two processes on these CPUs over gloo,
started by torchrun or by `accelerate launch` with the shipped multi-GPU config.

The checks that matter are against data parallel training, whose gradients are the reference:
one sharded step over batches of different kinds gives the gradients of the two batches averaged,
and a sharded run through the CLI saves the adapter a DDP run saves, also after a resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from assistant.train import LLMTrainSettings, settings_from_dict, target_loss
from assistant.train_shard import parameter_mb, shard_units

from conftest import ROOT, SHARED_DATA
from shard_worker import example_batch, tiny_lora_model
from test_train import saved_tiny_run

needs_data = pytest.mark.skipif(not (SHARED_DATA / "iu-xray").is_dir(), reason="needs ../shared/data")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


# The shipped multi-GPU launch config, 2 processes: on a machine without GPUs accelerate's launcher
# starts them all the same, and the trainer joins them over gloo (train_loop.process_state).
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / "configs" / "accelerate" / "multi-gpu.yaml"), "--num_processes", "2"]


def launch(args: list[str], launcher: list[str] = TORCHRUN, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(launcher + args, cwd=ROOT, env=CPU_ONLY, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_units_are_the_decoder_layers_and_the_vision_tower_stays_whole():
    vlm = tiny_lora_model()
    units = shard_units(vlm.hf)
    assert [type(unit).__name__ for unit in units] == ["Gemma3DecoderLayer"] * 2
    tower = {id(m) for m in vlm._base_model().model.vision_tower.modules()}
    assert not any(id(unit) in tower for unit in units)


def test_one_sharded_step_over_an_image_batch_and_a_text_batch_averages_their_gradients():
    """Process 0 has an image, process 1 text only (LoRA on the top layer alone, so only the image
    batch needs a backward pass through the lower layer): without every process running the same
    collectives this aborts or hangs (the timeout), and the gathered gradients must be the two
    batches' mean."""
    done = launch([str(ROOT / "tests" / "shard_worker.py")], timeout=180)
    sharded = json.loads(done.stdout.strip().splitlines()[-1])
    vlm = tiny_lora_model()
    losses, grads = [], {}
    for with_image in (True, False):
        vlm.hf.zero_grad()
        loss = target_loss(vlm.hf, example_batch(vlm, with_image))
        loss.backward()
        losses.append(float(loss))
        for name, p in vlm.hf.named_parameters():
            if p.requires_grad:
                grads[name] = grads.get(name, 0) + (p.grad if p.grad is not None else torch.zeros_like(p)) / 2
    assert sharded["losses"] == pytest.approx(losses, abs=1e-5)
    assert set(sharded["grads"]) == set(grads) and any("projector" in name for name in grads)
    for name, grad in grads.items():
        assert torch.allclose(torch.tensor(sharded["grads"][name]), grad, atol=1e-6), name


def test_an_unknown_shard_mode_is_refused():
    with pytest.raises(ValueError, match="train.shard 'zero3'.*none, fsdp"):
        settings_from_dict({"shard": "zero3"})
    assert LLMTrainSettings(shard="fsdp").shards(2) and not LLMTrainSettings(shard="fsdp").shards(1)
    assert not LLMTrainSettings().shards(8)


def test_an_accelerate_fsdp_or_deepspeed_config_is_refused_with_the_way_to_shard(monkeypatch, capsys):
    from assistant.cli import main

    for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(flag, "true")
        code = main(["train", "--stage", "lora", "--task", "report", "--out", "unused", "--max-steps", "1"])
        monkeypatch.delenv(flag)
        assert code == 2
        assert "--shard fsdp" in capsys.readouterr().err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-process runs of 2 steps through the CLI, every report that has a label-matched image
    given one (2 of the 8: batches with and without images), 2 micro-batches of 1 per step: data
    parallel (torchrun), sharded (`accelerate launch` with the shipped config), and sharded stopped
    after 1 step then resumed (torchrun)."""
    tmp = tmp_path_factory.mktemp("shard")
    config = saved_tiny_run(tmp, limit=8)

    def train(name: str, steps: int, *extra: str, launcher: list[str] = TORCHRUN) -> dict:
        out = tmp / name
        launch(["-m", "assistant", "train", "--stage", "lora", "--task", "report", "--out", str(out),
                "--config", str(config), "--max-steps", str(steps), "--work-dir", str(tmp / f"work-{name}"),
                "--set", "train.image_fraction=1.0", "--set", "train.batch_size=1", "--set", "train.grad_accum=2",
                *extra], launcher)
        return {"out": out, "meta": json.loads((out / "metadata.json").read_text())}

    found = {"ddp": train("ddp", 2), "fsdp": train("fsdp", 2, "--shard", "fsdp", launcher=ACCELERATE_LAUNCH)}
    train("resumed", 1, "--shard", "fsdp")
    found["resumed"] = train("resumed", 2, "--shard", "fsdp", "--resume")
    return found


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    return {**load_file(folder / "adapter_model.safetensors"), **load_file(folder / "projector.safetensors")}


@needs_data
def test_a_sharded_run_saves_the_adapter_a_data_parallel_run_saves(runs):
    ddp, fsdp = saved_tensors(runs["ddp"]["out"]), saved_tensors(runs["fsdp"]["out"])
    assert ddp.keys() == fsdp.keys() and any("lora_B" in name for name in ddp)
    for name, value in ddp.items():  # the same arithmetic up to the order of float sums
        assert torch.allclose(fsdp[name], value, atol=1e-7), name
    assert any(float(value.abs().max()) > 0 for name, value in fsdp.items() if "lora_B" in name)  # it trained
    training, unsharded = runs["fsdp"]["meta"]["training"], runs["ddp"]["meta"]["training"]
    assert training["processes"] == 2 and training["sharded"] and not unsharded["sharded"]
    tower_mb = parameter_mb(tiny_lora_model()._base_model().model.vision_tower)  # replicated, not sharded
    half = tower_mb + (unsharded["weights_mb_per_process"] - tower_mb) / 2
    assert training["weights_mb_per_process"] == pytest.approx(half, abs=0.003)
    assert runs["fsdp"]["meta"]["data"]["train_examples_with_label_matched_image"] > 0  # text and image batches
    held = training["held_out_loss_full_vocab"]
    assert held == pytest.approx(unsharded["held_out_loss_full_vocab"], abs=1e-5)
    assert "the model sharded across them (FSDP2)" in (runs["fsdp"]["out"] / "README.md").read_text()


@needs_data
def test_a_resumed_sharded_run_continues_from_its_checkpoint(runs):
    """Resuming restores the LoRA, the projector and their optimizer state from the whole-tensor
    checkpoint. (The last digits may differ from an uninterrupted run, as without sharding: the
    domain loss's sampled negatives are drawn after the restored RNG state by a prefetching loader.)"""
    resumed, straight = saved_tensors(runs["resumed"]["out"]), saved_tensors(runs["fsdp"]["out"])
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-5), name
    assert runs["resumed"]["meta"]["training"]["steps"] == 2
