"""The native (C++) token step computes what the torch step computes, and the decoder falls back to
the torch step, with a reason, wherever the native one cannot run.

Tiny random bf16 Gemma 3 models (tests/test_fast_decode.py's), with a 4-token sliding window so
positions cross it. The two steps round at the same points and differ only in the order of fp32
sums, so logits agree to a bf16 rounding step and greedy tokens are equal; the decoder with the
native step reproduces transformers' `generate` token for token, shortlist drafts and
whole-vocabulary checks included. Where the CPU has AVX512-BF16 both product paths are tested."""

import pytest
import torch

import assistant.fast_native as fast_native
from assistant.fast_check import Shortlist, VocabularyCheck, rows_of
from assistant.fast_decode import FastDecoder, decode_step
from assistant.fast_native import NativeStep, NativeUnavailable
from test_fast_decode import VOCAB, embeddings, fast, prompt_ids, randomise_lora_b, reference, small_gemma

try:
    fast_native.library()
except NativeUnavailable as err:  # a CPU without AVX2 or a machine without a compiler
    pytest.skip(f"native step unavailable here: {err}", allow_module_level=True)

BF16_STEP = 2 ** -7  # relative size of one bf16 rounding step


def wide_bf16_gemma(seed: int, scale: float = 8.0, window: int = 4):
    """A bf16 model whose logits lie far enough apart that bf16 summation order cannot flip a token."""
    model = small_gemma(seed=seed, window=window, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
    return model


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                                                  layers_to_transform=[1, 2]))
    randomise_lora_b(peft_model, 0.2, seed=0)
    return peft_model


@pytest.fixture(params=["AVX2", "AVX512-BF16"])
def instructions(request):
    """Each of the kernels' product paths this CPU has: rows widened with AVX2, and bf16 pairs
    multiplied in hardware with AVX512-BF16 (the default where present)."""
    if request.param == "AVX512-BF16" and fast_native.check_instructions() != "AVX512-BF16":
        pytest.skip("this CPU has no AVX512-BF16")
    fast_native.allow_avx512_bf16(request.param == "AVX512-BF16")
    yield request.param
    fast_native.allow_avx512_bf16(True)


@pytest.mark.parametrize("adapter", [None, "default"])
def test_the_native_step_computes_the_torch_steps_logits_cache_and_hidden_state(adapter, instructions):
    model = wide_bf16_gemma(seed=21)
    peft_model = with_lora(model)
    text_model = peft_model.get_base_model().model
    torch_decoder = FastDecoder(text_model, max_positions=64, compile=False, native=False)
    native_decoder = FastDecoder(text_model, max_positions=64, compile=False)
    assert native_decoder.kernel == "native" and torch_decoder.kernel == "eager"
    weights = native_decoder.weights_for(adapter)
    prompt = prompt_ids(6, seed=21)
    with torch.inference_mode():
        for decoder in (torch_decoder, native_decoder):
            decoder.prefill(weights, embeddings(model, prompt))
    keys, values = torch_decoder.cache()
    rows = torch.arange(0, VOCAB, 3)
    head = rows_of(weights.embed, rows)
    seen = torch.zeros(rows.numel(), dtype=torch.bool)
    seen[::4] = True  # the penalty on some rows, of both signs
    token = prompt[0, -1]
    for position in range(6, 20):  # past the 4-token window on the sliding layers
        with torch.inference_mode():
            logits, greedy, new_keys, new_values, hidden = decode_step(
                torch_decoder.shape, torch_decoder.lora_layout, weights.tensors(), head, token.view(1),
                torch.tensor([position]), keys[:, :, :position], values[:, :, :position], torch_decoder.cos,
                torch_decoder.sin, seen, torch.tensor(1.3))
            keys[:, :, position], values[:, :, position] = new_keys, new_values
            native_logits, native_greedy, native_hidden = native_decoder._advance(weights, head, token, position, seen, 1.3)
        native_keys, native_values = native_decoder.cache()
        torch.testing.assert_close(native_logits, logits, rtol=BF16_STEP, atol=1e-2)
        torch.testing.assert_close(native_hidden.float(), hidden.float(), rtol=BF16_STEP, atol=1e-2)
        torch.testing.assert_close(native_keys[:, :, position], keys[:, :, position], rtol=BF16_STEP, atol=1e-2)
        torch.testing.assert_close(native_values[:, :, position], values[:, :, position], rtol=BF16_STEP, atol=1e-2)
        assert int(native_greedy) == int(greedy)
        token = rows[greedy]


def test_the_steps_values_do_not_depend_on_how_many_threads_share_it(instructions):
    """The step's team splits products, LoRA factors, heads and the activation between threads:
    each value is still computed whole by one of them, so 1, 2 or 3 threads give the same bits."""
    model = wide_bf16_gemma(seed=23)
    text_model = with_lora(model).get_base_model().model
    decoder = FastDecoder(text_model, max_positions=64, compile=False)
    weights = decoder.weights_for("default")
    prompt = prompt_ids(6, seed=23)
    with torch.inference_mode():
        decoder.prefill(weights, embeddings(model, prompt))
    keys, values = decoder.cache()
    prefilled = keys.clone(), values.clone()
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    threads_before, runs = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            keys.copy_(prefilled[0])
            values.copy_(prefilled[1])
            token, outputs = prompt[0, -1], []
            for position in range(6, 14):
                with torch.inference_mode():
                    logits, greedy, hidden = decoder._advance(weights, weights.embed, token, position, seen, 1.3)
                outputs += [logits, hidden, keys[:, :, position].clone(), values[:, :, position].clone()]
                token = greedy
            runs.append(outputs)
    finally:
        torch.set_num_threads(threads_before)
    for outputs in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs, runs[0]))


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_the_native_decoder_drafts_and_checks_exactly_the_whole_vocabulary_greedy_tokens(penalty, instructions):
    model = wide_bf16_gemma(seed=9)
    decoder = FastDecoder(model.model, max_positions=128, compile=False, shortlist=Shortlist(torch.arange(0, VOCAB, 2)))
    assert decoder.kernel == "native" and decoder.check.native_products is not None
    assert decoder.check.screen is not None  # the int8 screen, in front of either product path
    prompt = prompt_ids(9, seed=9)
    assert fast(model, decoder, prompt, 40, penalty) == reference(model, prompt, 40, penalty)
    assert decoder.last_stats.checks >= 2


def test_the_native_decoder_matches_peft_with_lora_and_without(instructions):
    model = wide_bf16_gemma(seed=4, scale=4.0)
    peft_model = with_lora(model)
    decoder = FastDecoder(peft_model.get_base_model().model, max_positions=64, compile=False)
    prompt = prompt_ids(9, seed=4)
    assert fast(peft_model, decoder, prompt, 20, adapter="default") == reference(peft_model, prompt, 20)
    with peft_model.disable_adapter():
        assert fast(peft_model, decoder, prompt, 20, adapter=None) == reference(peft_model, prompt, 20)


def test_native_check_products_equal_the_torch_check_to_a_rounding_step():
    torch.manual_seed(0)
    embed = torch.randn(1003, 64).to(torch.bfloat16)  # not a multiple of the kernel's row blocks
    native = NativeStep.__new__(NativeStep)
    native.lib = fast_native.library()
    hidden = torch.randn(7, 64).to(torch.bfloat16)
    plain = VocabularyCheck(embed, chunk_rows=256).logits(hidden)
    fused = VocabularyCheck(embed, products=native.products).logits(hidden)
    torch.testing.assert_close(fused, plain, rtol=BF16_STEP, atol=1e-3)
    assert torch.equal(fused, fused.to(torch.bfloat16).float())  # values of the model dtype, as lm_head's
    penalised = [torch.tensor([int(fused[j].argmax())]) for j in range(7)]
    assert torch.equal(VocabularyCheck(embed, products=native.products).greedy(hidden, penalised, 2.0),
                       VocabularyCheck(embed).greedy(hidden, penalised, 2.0))


def avx2_products(native, embed, states):
    fast_native.allow_avx512_bf16(False)
    try:
        return native.products(embed, states, torch.empty(embed.shape[0], states.shape[0]))
    finally:
        fast_native.allow_avx512_bf16(True)


def test_the_avx512_bf16_check_gives_the_avx2_checks_values_to_a_rounding_step():
    if fast_native.check_instructions() != "AVX512-BF16":
        pytest.skip("this CPU has no AVX512-BF16; the check widens rows with AVX2")
    torch.manual_seed(1)
    embed = torch.randn(1003, 640).to(torch.bfloat16)
    native = NativeStep.__new__(NativeStep)
    native.lib = fast_native.library()
    states = torch.randn(16, 640).to(torch.bfloat16).float()  # hidden states: bf16 values
    paired = native.products(embed, states, torch.empty(1003, 16))
    widened = avx2_products(native, embed, states)
    torch.testing.assert_close(paired, widened, rtol=BF16_STEP, atol=1e-3)  # only the sum order differs
    assert (paired == widened).float().mean() > 0.9
    not_bf16 = states + 1e-4  # not bf16 values: the exact AVX2 path, not a rounded copy
    assert torch.equal(native.products(embed, not_bf16, torch.empty(1003, 16)), avx2_products(native, embed, not_bf16))


def test_fp32_models_keep_the_torch_step():
    decoder = FastDecoder(small_gemma(seed=1).model, max_positions=16, compile=False)
    assert decoder.native is None and decoder.kernel == "eager" and decoder.check.native_products is None


def test_without_a_compiler_the_decoder_says_why_and_keeps_the_torch_step(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(fast_native, "_library", None)
    monkeypatch.setenv("ASSISTANT_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(fast_native.shutil, "which", lambda name: None)
    with pytest.raises(NativeUnavailable, match="no C\\+\\+ compiler"):
        fast_native.library()
    with caplog.at_level("INFO", logger="assistant.fast_decode"):
        decoder = FastDecoder(wide_bf16_gemma(seed=2).model, max_positions=16, compile=False)
    assert decoder.kernel == "eager" and "no C++ compiler" in caplog.text


def test_a_build_failure_is_reported_with_the_compilers_message(monkeypatch, tmp_path):
    monkeypatch.setattr(fast_native, "_library", None)
    monkeypatch.setenv("ASSISTANT_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(fast_native, "SOURCE", broken)
    with pytest.raises(NativeUnavailable, match="building the native step failed"):
        fast_native.library()
    assert not list((tmp_path / "native").glob("*.so"))  # no half-built library left to load


def test_a_position_past_the_cache_is_refused():
    model = wide_bf16_gemma(seed=3)
    decoder = FastDecoder(model.model, max_positions=8, compile=False)
    weights = decoder.weights_for(None)
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    with torch.inference_mode(), pytest.raises(ValueError, match="past the decoder's 8 cache positions"):
        decoder._advance(weights, weights.embed, torch.tensor(5), 8, seen, 1.0)


def test_widths_that_are_not_a_multiple_of_sixteen_take_the_plain_loop_and_still_match():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(5)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position_embeddings=128,
                              layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval().to(torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8)
    decoder = FastDecoder(model.model, max_positions=64, compile=False)
    assert decoder.kernel == "native"
    prompt = prompt_ids(7, seed=5)
    assert fast(model, decoder, prompt, 20) == reference(model, prompt, 20)
