"""Shared fixtures: tiny randomly initialised models for fast unit tests, paths to the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CHEST_DICOM = SHARED_DATA / "dicom" / "pylibjpeg-data" / "JPEG2000Lossless" / "966_fixed.dcm"
CHEST_DICOM_MONO1 = SHARED_DATA / "dicom" / "pydicom-data" / "RG1_J2KI.dcm"


def load_benchmark(name: str):
    """The module benchmarks/NAME.py (scripts, not a package), registered in sys.modules so that
    dataclasses and pickling find it."""
    import importlib.util
    import sys

    key = f"benchmark_{name}"  # not a bare name such as "report" that another import could mean
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


TINY_WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "<unused0>", "findings", "impression", "the", "lungs",
              "are", "clear", "no", "effusion", "heart", "normal", "size", ".", ":", "chest", "x-ray"]


def tiny_tokenizer():
    """A real fast tokenizer over a 20-word vocabulary (no download, no model files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(TINY_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<unused0>"],
    )


def tiny_config(**overrides):
    """An AssistantConfig with a tiny, fresh vision tower (32 px, 8 px patches -> 16 image tokens)."""
    from assistant.config import AssistantConfig, VisionConfig

    # weights=None: the shipped trained weights belong to the full-size default tower.
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, weights=None)
    config = AssistantConfig(vision=vision)
    return config.override({**{"llm.lora_r": 4, "llm.lora_alpha": 8, "llm.lora_dropout": 0.0}, **overrides})


def tiny_language_model(seed: int = 0):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    text_config = Gemma3TextConfig(
        vocab_size=len(TINY_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position_embeddings=256,
    )
    return Gemma3ForCausalLM(text_config).eval()


@pytest.fixture
def tiny_vlm():
    """A ClinicalVLM assembled from tiny random parts through the real assembly path."""
    import torch

    from assistant.model import ClinicalVLM

    torch.manual_seed(0)
    return ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())


@pytest.fixture(scope="session")
def llm_cache(tmp_path_factory):
    """The real default LLM, converted from its packaged GGUF once per test session into a private
    cache that every end-to-end test (and the app subprocess) then reuses."""
    import time

    from assistant.base_models import default_llm_dir

    cache = tmp_path_factory.mktemp("model-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("ASSISTANT_CACHE_DIR", str(cache))
    start = time.perf_counter()
    folder = default_llm_dir(progress=False)
    seconds = time.perf_counter() - start
    yield {"cache": cache, "folder": folder, "convert_seconds": seconds}
    patch.undo()


@pytest.fixture(scope="session")
def real_assistant(llm_cache):
    """The Assistant on the real default models (short drafts to keep the suite fast)."""
    from assistant.config import AssistantConfig
    from assistant.pipeline import Assistant

    config = AssistantConfig().override({"generation.max_new_tokens": 24})
    return Assistant.from_config(config, progress=False)
