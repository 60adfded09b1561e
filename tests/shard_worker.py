"""Run under torchrun by tests/test_train_shard.py: one FSDP2 step of the tiny model over two
processes whose batches differ in kind (process 0's has an image, process 1's is text only, with
LoRA on the top layer alone). Process 0 prints the loss and the gathered gradients as JSON.

Not a test module itself: the test starts it in two processes (and a wedged collective shows up as
the test's timeout, not a hung suite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config, tiny_language_model, tiny_tokenizer  # noqa: E402

from assistant.model import ClinicalVLM  # noqa: E402
from assistant.train import LLMTrainSettings, prepare_model  # noqa: E402
from assistant.train_data import IGNORE  # noqa: E402


def tiny_lora_model() -> ClinicalVLM:
    """The tiny model with a LoRA on its top layer only and a trainable projector, the same weights
    in every process (seeded)."""
    torch.manual_seed(0)
    vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())
    vlm.config = vlm.config.override({"llm.lora_layers": 1})
    return prepare_model(tiny_config(adapter=None), LLMTrainSettings(stage="lora", train_dtype="float32"), vlm)


def example_batch(vlm: ClinicalVLM, with_image: bool) -> dict[str, torch.Tensor]:
    """One example whose last three tokens are the target."""
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    prompt = "chest <image> findings :" if with_image else "chest findings :"
    inputs = vlm.build_inputs(prompt + " no effusion seen", [image] if with_image else None)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = IGNORE
    return {**inputs, "labels": labels}


def main() -> None:
    from accelerate import PartialState

    from assistant.train_shard import ShardedLoss, full_tensor, shard

    state = PartialState(cpu=True)
    vlm = tiny_lora_model()
    batch = example_batch(vlm, with_image=state.process_index == 0)  # runs the projector once: before sharding
    root = shard(ShardedLoss(vlm.hf), state.device, state.num_processes)
    loss = root(batch)
    loss.backward()
    grads = {name: full_tensor(p.grad).tolist() for name, p in vlm.hf.named_parameters() if p.requires_grad}
    losses = [None] * state.num_processes
    torch.distributed.all_gather_object(losses, float(loss))
    if state.is_main_process:
        print(json.dumps({"losses": losses, "grads": grads}))


if __name__ == "__main__":
    main()
