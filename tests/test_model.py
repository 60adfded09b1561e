"""ClinicalVLM assembly, the image splice, and the LoRA adapter round trip (tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from assistant.model import IMAGE_MARKER, ClinicalVLM
from conftest import tiny_config, tiny_language_model, tiny_tokenizer


def image(seed: int = 0, shape=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_assembles_a_stock_llava_model(tiny_vlm):
    from transformers import LlavaForConditionalGeneration

    assert isinstance(tiny_vlm.hf, LlavaForConditionalGeneration)
    assert tiny_vlm.num_image_tokens == (32 // 8) ** 2
    # The output head stays tied to the input embedding, as in the base LM.
    base = tiny_vlm.hf
    assert base.lm_head.weight.data_ptr() == base.model.language_model.embed_tokens.weight.data_ptr()


def test_image_marker_expands_to_placeholder_ids(tiny_vlm):
    inputs = tiny_vlm.build_inputs(f"chest x-ray {IMAGE_MARKER} findings :", [image()])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(tiny_vlm.image_token_id) == tiny_vlm.num_image_tokens
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_image_features_are_spliced_at_the_placeholder_positions(tiny_vlm):
    inputs = tiny_vlm.build_inputs(f"chest {IMAGE_MARKER} findings", [image()])
    hf = tiny_vlm.hf
    with torch.no_grad():
        logits = hf(**inputs).logits
        # Do the splice by hand: text embeddings everywhere, projected features at the placeholders.
        embeds = hf.model.get_input_embeddings()(inputs["input_ids"])
        features = tiny_vlm.image_features(inputs["pixel_values"])  # (1, N, D)
        mask = inputs["input_ids"][0] == tiny_vlm.image_token_id
        embeds[0, mask] = features[0]
        hidden = hf.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = hf.lm_head(hidden)
    torch.testing.assert_close(logits, expected)


def test_image_changes_the_output(tiny_vlm):
    with torch.no_grad():
        a = tiny_vlm.hf(**tiny_vlm.build_inputs(f"chest {IMAGE_MARKER}", [image(1)])).logits
        b = tiny_vlm.hf(**tiny_vlm.build_inputs(f"chest {IMAGE_MARKER}", [image(2)])).logits
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_placeholder_count_mismatch_raises(tiny_vlm):
    inputs = tiny_vlm.build_inputs(f"chest {IMAGE_MARKER} findings", [image()])
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == tiny_vlm.image_token_id).nonzero()[0])
    ids[0, first] = 5  # one placeholder fewer than the image has features
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        tiny_vlm.hf(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_marker_and_image_counts_must_agree(tiny_vlm):
    with pytest.raises(ValueError, match="1 image markers but 2 images"):
        tiny_vlm.build_inputs(f"chest {IMAGE_MARKER}", [image(), image()])


def test_text_cannot_smuggle_placeholder_tokens(tiny_vlm):
    with pytest.raises(ValueError, match="reserved image placeholder"):
        tiny_vlm.build_inputs(f"<unused0> chest {IMAGE_MARKER}", [image()])


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_kinds(kind):
    vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config(**{"projector.kind": kind}))
    features = vlm.image_features(vlm.pixel_values([image()]))
    assert features.shape == (1, vlm.num_image_tokens, 32)
    assert hasattr(vlm.hf.model.multi_modal_projector, "linear_2") == (kind == "mlp2x_gelu")


def test_missing_placeholder_token_is_a_clear_error():
    from assistant.base_models import ModelPathError

    with pytest.raises(ModelPathError, match="image placeholder"):
        ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config(**{"llm.image_token": "<nope>"}))


def test_streaming_generation_yields_text(tiny_vlm):
    from assistant.config import GenerationConfig

    inputs = tiny_vlm.build_inputs(f"chest {IMAGE_MARKER} findings :", [image()])
    pieces = list(tiny_vlm.stream(inputs, GenerationConfig(max_new_tokens=6, repetition_penalty=1.0)))
    assert all(isinstance(piece, str) for piece in pieces)


def test_generation_failure_reaches_the_consumer(tiny_vlm, monkeypatch):
    def broken_generate(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_vlm.hf, "generate", broken_generate)
    inputs = tiny_vlm.build_inputs(f"chest {IMAGE_MARKER}", [image()])
    with pytest.raises(RuntimeError, match="boom"):
        list(tiny_vlm.stream(inputs))


def test_lora_attach_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    trained = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())
    trained.attach_lora()
    lora_names = [name for name, p in trained.hf.named_parameters() if p.requires_grad]
    assert lora_names and all("language_model" in name and "lora_" in name for name in lora_names)
    with torch.no_grad():  # LoRA B starts at zero; give it and the projector "trained" values
        for name, param in trained.hf.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name:
                param.add_(torch.randn_like(param) * 0.05)
    inputs = trained.build_inputs(f"chest {IMAGE_MARKER} findings", [image()])
    with torch.no_grad():
        expected = trained.hf(**inputs).logits
    folder = trained.save_adapter(tmp_path / "adapter", metadata={"intended_use": "test"})
    assert {"adapter_config.json", "projector.safetensors", "vision.safetensors", "metadata.json"} <= {
        p.name for p in folder.iterdir()}

    torch.manual_seed(0)
    fresh = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())
    with torch.no_grad():
        before = fresh.hf(**inputs).logits
    fresh.load_adapter(folder)
    with torch.no_grad():
        after = fresh.hf(**inputs).logits
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected)


def test_loading_a_non_adapter_folder_is_a_clear_error(tiny_vlm, tmp_path):
    from assistant.base_models import ModelPathError

    with pytest.raises(ModelPathError, match="not an adapter folder"):
        tiny_vlm.load_adapter(tmp_path)
