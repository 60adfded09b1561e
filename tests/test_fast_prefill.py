"""The fast decoder's prefill equals transformers' forward: keys, values and the last logits.

fp32 tiny Gemma 3 models (the two paths then agree to ~1e-6, so a difference is a bug), prompts
longer than the sliding window, LoRA beside the base weights, and a VLM prompt whose image
features come through the vision tower and projector."""

import numpy as np
import pytest
import torch

from assistant.fast_decode import FastDecoder
from assistant.fast_generate import prompt_embeddings
from test_fast_decode import VOCAB, _tokenizer_for, embeddings, prompt_ids, small_gemma


def transformers_prefill(model, prompt: torch.Tensor):
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
    return out.logits[0, -1], out.past_key_values


def assert_prefill_matches(model, decoder: FastDecoder, prompt: torch.Tensor, adapter=None):
    logits, past = transformers_prefill(model, prompt)
    length = prompt.shape[1]
    with torch.inference_mode():
        ours = decoder.prefill(decoder.weights_for(adapter), embeddings(model, prompt))
    torch.testing.assert_close(ours.float(), logits.float(), atol=1e-4, rtol=1e-4)
    keys, values = decoder.cache()
    for index, layer in enumerate(past.layers):
        held = layer.keys.shape[2]  # sliding layers keep only their window
        torch.testing.assert_close(keys[index, :, length - held: length], layer.keys[0].float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[index, :, length - held: length], layer.values[0].float(),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 3, 13])
def test_prefill_equals_the_transformers_forward_across_the_sliding_window(length):
    model = small_gemma(seed=3)
    decoder = FastDecoder(model.model, max_positions=64, compile=False)
    assert_prefill_matches(model, decoder, prompt_ids(length, seed=length))


def test_prefill_with_lora_beside_the_base_weights_equals_peft():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(small_gemma(seed=4), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    decoder = FastDecoder(peft_model.get_base_model().model, max_positions=64, compile=False)
    assert_prefill_matches(peft_model, decoder, prompt_ids(10, seed=4), adapter="default")


def test_a_study_prompt_with_an_image_is_embedded_as_llava_does_and_decodes_as_generate_does():
    from assistant.model import ClinicalVLM
    from conftest import tiny_config

    vlm = ClinicalVLM.from_parts(small_gemma(seed=8), _tokenizer_for(VOCAB), tiny_config())
    image = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    inputs = vlm.build_inputs("<image> findings : the lungs", [image])
    model = vlm._base_model()
    with torch.inference_mode():
        embeds = prompt_embeddings(vlm, inputs)
        spliced = model(**inputs).logits  # LLaVA's own splice of the image features
        ours = model(inputs_embeds=embeds[None], attention_mask=inputs["attention_mask"]).logits
    assert (inputs["input_ids"][0] == vlm.image_token_id).sum() == vlm.num_image_tokens
    torch.testing.assert_close(ours, spliced)
    slow = "".join(vlm.stream(inputs))
    generation = vlm.start_fast_decoding(wait=True, compile=False)
    assert "".join(vlm.stream(inputs)) == slow
    assert generation.decoder.last_stats.tokens > 0  # the fast path drafted it
