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


def test_a_seeded_sample_is_reproducible(tiny_vlm):
    from assistant.config import GenerationConfig

    inputs = tiny_vlm.build_inputs("chest pain and cough for three days")
    def sample(seed):
        return "".join(tiny_vlm.stream(inputs, GenerationConfig(max_new_tokens=24, temperature=1.5, seed=seed)))
    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1  # the seed, not a greedy fallback, sets the text


def test_batched_generation_matches_one_prompt_at_a_time(tiny_vlm):
    from assistant.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=6, repetition_penalty=1.1)
    prompts = ["chest pain", "a much longer indication : cough and fever for three days", "x"]
    singles = ["".join(tiny_vlm.stream(tiny_vlm.build_inputs(p), gen)) for p in prompts]
    assert tiny_vlm.generate_batch(prompts, gen) == singles  # left padding changes nothing


def test_scoring_a_strided_batch_never_copies_the_output_matrix(tiny_vlm):
    """generate() passes hidden[:, -1:, :]; with a frozen weight (as served) torch's matmul then
    expands the vocabulary x hidden weight per batch row and copies it for bmm: 20 s per decoding
    step for 8 rows of the real model. The contiguity hook keeps it one plain matrix multiply."""
    from torch.profiler import profile

    lm_head = tiny_vlm.hf.lm_head
    lm_head.weight.requires_grad_(False)
    hidden = torch.randn(4, 3, lm_head.in_features, dtype=lm_head.weight.dtype)[:, -1:, :]
    assert not hidden.is_contiguous()
    with profile() as prof:
        logits = lm_head(hidden)
    assert "aten::bmm" not in {event.key for event in prof.key_averages()}
    assert torch.equal(logits, torch.nn.functional.linear(hidden.contiguous(), lm_head.weight))


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


def _trained_adapter(folder, seed: int):
    """A tiny LoRA adapter with non-zero (so output-changing) weights, saved to `folder`."""
    torch.manual_seed(seed)
    vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())
    vlm.attach_lora()
    with torch.no_grad():
        for name, param in vlm.hf.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return vlm.save_adapter(folder)


def _logits(vlm, task: str, inputs):
    with vlm.adapter_for(task), torch.no_grad():
        return vlm.hf(**inputs).logits


def test_each_task_generates_with_its_own_adapter(tmp_path):
    report, summary = _trained_adapter(tmp_path / "report", 1), _trained_adapter(tmp_path / "summary", 2)

    def fresh(*folders):
        torch.manual_seed(0)
        vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())
        for folder in folders:
            vlm.load_adapter(folder)
        return vlm

    inputs = fresh().build_inputs("patient record : cough")
    with torch.no_grad():
        base, only_report, only_summary = (v.hf(**inputs).logits for v in (fresh(), fresh(report), fresh(summary)))
    both = fresh(report)
    both.load_task_adapters({"summary": summary, "triage": None})
    torch.testing.assert_close(_logits(both, "summary", inputs), only_summary)
    torch.testing.assert_close(_logits(both, "triage", inputs), base)  # None: LoRA off
    torch.testing.assert_close(_logits(both, "report", inputs), only_report)
    torch.testing.assert_close(_logits(both, "educate", inputs), only_report)  # not configured: the report one
    pieces = list(both.stream(inputs, task="summary"))  # generation goes through the same switch
    assert all(isinstance(piece, str) for piece in pieces)


def test_task_adapters_follow_the_report_adapter_and_the_built_in_model(tmp_path):
    from assistant.base_models import ModelPathError
    from assistant.config import AssistantConfig
    from assistant.model import resolve_task_adapters

    shipped = resolve_task_adapters(AssistantConfig())
    assert shipped["summary"].name == "summary-lora" and shipped["summary"].is_dir()
    assert shipped["educate"].name == "educate-lora" and shipped["educate"].is_dir()
    assert shipped["triage"] is None  # no training data of its own: the base LLM
    chosen = AssistantConfig().override({"task_adapters.educate": None})
    assert resolve_task_adapters(chosen)["educate"] is None
    assert resolve_task_adapters(AssistantConfig(adapter=None)) == {}  # the base model for every task
    assert resolve_task_adapters(AssistantConfig().override({"task_adapters.summary": None}))["summary"] is None
    other_llm = AssistantConfig().override({"llm.path": str(tmp_path), "adapter": str(tmp_path)})
    assert resolve_task_adapters(other_llm)["summary"] is None  # shipped LoRA would not fit another LLM
    vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())
    with pytest.raises(ModelPathError, match="holds no LoRA"):
        vlm.load_task_adapters({"summary": tmp_path})
    vlm.load_task_adapters({"summary": None})  # a projector-only adapter and no task LoRA: nothing to switch
    assert list(vlm.stream(vlm.build_inputs("cough"), task="summary")) is not None
