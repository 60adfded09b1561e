"""The compiled decoder reproduces transformers' greedy generation token for token.

Tiny random Gemma 3 models with a 4-token sliding window, so prompts cross it. In fp32 the two
paths agree to ~1e-6, so any token difference is a bug; in bf16 (the served dtype) a random tiny
model's logits tie often after rounding, so the bf16 test widens them (a scaled embedding) until
the top two differ by more than the paths' rounding differences (<0.01 measured). The step runs
eagerly except in one compiled test (Inductor on a 3-layer model)."""

import pytest
import torch

from assistant.fast_check import DRAFT_TOKENS, Shortlist
from assistant.fast_decode import FastDecoder
from assistant.fast_weights import FastDecodeUnsupported, decoder_weights
from assistant.fast_generate import FastGeneration, TextPieces
from conftest import tiny_config, tiny_tokenizer

VOCAB = 96


def small_gemma(seed: int = 0, window: int = 4, dtype=torch.float32):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=window, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # fresh RMSNorm weights are 0 (scale 1): vary them so the norms are tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    return model.to(dtype)


def reference(model, prompt: torch.Tensor, tokens: int, penalty: float = 1.1) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=tokens,
                             repetition_penalty=penalty, pad_token_id=0, eos_token_id=None)
    return out[0, prompt.shape[1]:].tolist()


def fast(model, decoder: FastDecoder, prompt: torch.Tensor, tokens: int, penalty: float = 1.1,
         adapter=None) -> list[int]:
    with torch.inference_mode():
        return list(decoder.decode(adapter, embeddings(model, prompt), prompt[0], tokens, penalty))


def embeddings(model, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt's input embeddings (Gemma 3 scales them in its embedding module)."""
    return model.get_input_embeddings()(prompt)[0]


def randomise_lora_b(peft_model, std: float, seed: int | None = None) -> None:
    """Give every LoRA B normal values (fresh ones are zero: the adapter would have no effect)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def prompt_ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [3, 11])
def test_greedy_tokens_match_generate_across_the_sliding_window(length):
    model = small_gemma()
    decoder = FastDecoder(model.model, max_positions=64, compile=False)
    prompt = prompt_ids(length)
    assert fast(model, decoder, prompt, 24) == reference(model, prompt, 24)


@pytest.mark.parametrize("native", [False, True], ids=["torch-step", "native-step"])
def test_bf16_greedy_tokens_match_generate(native):
    model = small_gemma(seed=9, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8)  # tied output matrix: logits 8x wider apart
    decoder = FastDecoder(model.model, max_positions=64, compile=False, native=native)
    prompt = prompt_ids(9, seed=9)
    assert fast(model, decoder, prompt, 24) == reference(model, prompt, 24)


def test_a_second_sequence_ignores_the_first_ones_cache():
    model = small_gemma()
    decoder = FastDecoder(model.model, max_positions=64, compile=False)
    fast(model, decoder, prompt_ids(20, seed=5), 30)  # leaves stale keys in slots the next one masks
    prompt = prompt_ids(6, seed=2)
    assert fast(model, decoder, prompt, 20) == reference(model, prompt, 20)


def test_without_penalty_and_with_a_strong_one():
    model = small_gemma(seed=3)
    decoder = FastDecoder(model.model, max_positions=64, compile=False)
    prompt = prompt_ids(7, seed=3)
    for penalty in (1.0, 2.0):
        assert fast(model, decoder, prompt, 16, penalty) == reference(model, prompt, 16, penalty)


def test_lora_beside_the_base_matches_the_peft_model_and_leaves_the_base_weights_untouched():
    from peft import LoraConfig, get_peft_model

    model = small_gemma(seed=4)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomise_lora_b(peft_model, 0.2)
    text_model = peft_model.get_base_model().model
    decoder = FastDecoder(text_model, max_positions=64, compile=False)
    prompt = prompt_ids(9, seed=4)
    with_lora = fast(peft_model, decoder, prompt, 20, adapter="default")
    assert with_lora == reference(peft_model, prompt, 20)
    with peft_model.disable_adapter():
        assert fast(peft_model, decoder, prompt, 20, adapter=None) == reference(peft_model, prompt, 20)
    assert with_lora != fast(peft_model, decoder, prompt, 20, adapter=None)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, before)
    weights = decoder_weights(text_model, "default", decoder.lora_layout)
    assert torch.equal(weights.layers[0].qkv[:64], before)  # never merged
    assert decoder.lora_layout.layers == (True, True, True) and decoder.lora_layout.rank == 4


def test_bf16_adapters_of_different_ranks_and_layers_share_one_layout_and_match_peft():
    from peft import LoraConfig, get_peft_model

    model = small_gemma(seed=9, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)  # clear margins, as in the bf16 test above
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                                  layers_to_transform=[2]), adapter_name="top")
    peft_model.add_adapter("wide", LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "gate_proj", "down_proj"],
                                              layers_to_transform=[1, 2]))
    randomise_lora_b(peft_model, 1.0, seed=0)
    decoder = FastDecoder(peft_model.get_base_model().model, max_positions=64, compile=False)
    assert decoder.lora_layout.layers == (False, True, True) and decoder.lora_layout.rank == 8
    prompt = prompt_ids(9, seed=9)
    outputs = set()
    for adapter in ("top", "wide"):
        peft_model.set_adapter(adapter)
        tokens = fast(peft_model, decoder, prompt, 24, adapter=adapter)
        assert tokens == reference(peft_model, prompt, 24)
        outputs.add(tuple(tokens))
    with peft_model.disable_adapter():
        base = fast(peft_model, decoder, prompt, 24, adapter=None)
        assert base == reference(peft_model, prompt, 24)
    outputs.add(tuple(base))
    assert len(outputs) == 3  # each adapter changes the output


def test_eos_ends_the_sequence_and_the_length_limit_holds():
    model = small_gemma(seed=6)
    decoder = FastDecoder(model.model, max_positions=64, compile=False)
    prompt = prompt_ids(5, seed=6)
    tokens = fast(model, decoder, prompt, 12)
    assert len(tokens) == 12
    first_new = next(i for i in range(1, 12) if tokens[i] not in tokens[:i])  # its first appearance
    with torch.inference_mode():
        stopped = list(decoder.decode(None, embeddings(model, prompt), prompt[0], 12, 1.1,
                                      eos_ids=(tokens[first_new],)))
    assert stopped == tokens[:first_new]
    assert not decoder.fits(60, 8)
    with pytest.raises(ValueError, match="exceeds 64 positions"):
        fast(model, decoder, prompt_ids(60), 8)


def test_other_architectures_are_refused_clearly():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(FastDecodeUnsupported, match="Gemma 3"):
        FastDecoder(llama.model, compile=False)


def test_compiled_step_matches_generate_with_and_without_a_shortlist():
    from torch._dynamo.utils import counters

    model = small_gemma(seed=7)
    decoder = FastDecoder(model.model, max_positions=600, compile=True, shortlist=Shortlist(torch.arange(0, VOCAB, 2)))
    decoder.warm_up(None)
    graphs = counters["stats"]["unique_graphs"]
    prompt = prompt_ids(250, seed=7)  # crosses a cache-block boundary at 256: the span changes mid-way
    expected = reference(model, prompt, 20)
    assert fast(model, decoder, prompt, 20) == expected
    decoder.shortlist = None  # every row at every step: the same graph, more rows
    assert fast(model, decoder, prompt, 20) == expected
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile (a minute on the real model)


# ---- greedy drafting over a shortlist, checked against the whole vocabulary -------------------------

@pytest.mark.parametrize("kept", ["all", "half", "none"])
@pytest.mark.parametrize("penalty", [1.0, 1.1, 2.0])
def test_shortlisted_drafts_give_exactly_the_whole_vocabulary_greedy_tokens(kept, penalty):
    model = small_gemma(seed=11)
    rows = {"all": torch.arange(VOCAB), "half": torch.arange(0, VOCAB, 2), "none": torch.tensor([0])}[kept]
    decoder = FastDecoder(model.model, max_positions=128, compile=False, shortlist=Shortlist(rows))
    prompt = prompt_ids(9, seed=11)  # with "none" only the prompt's own tokens are drafted
    tokens = 3 * DRAFT_TOKENS + 5  # not a whole number of rounds
    assert fast(model, decoder, prompt, tokens, penalty) == reference(model, prompt, tokens, penalty)
    stats = decoder.last_stats
    assert stats.tokens == tokens and stats.checks >= (tokens - 1) / DRAFT_TOKENS
    assert stats.head_rows == stats.steps * Shortlist(rows).for_prompt(prompt).numel()
    if kept == "all":
        assert stats.rejected == 0 and stats.steps == tokens - 1  # the prefill gives the first token
    if kept == "none":
        assert stats.rejected > 0  # out-of-shortlist tokens were drafted wrong, then corrected


def test_shortlisted_drafts_stop_at_eos_and_at_the_length_limit():
    model = small_gemma(seed=8)
    decoder = FastDecoder(model.model, max_positions=64, compile=False, shortlist=Shortlist(torch.arange(0, VOCAB, 3)))
    prompt = prompt_ids(5, seed=8)
    total = DRAFT_TOKENS + 12
    tokens = fast(model, decoder, prompt, total)
    assert tokens == reference(model, prompt, total)
    first_new = next(i for i in range(DRAFT_TOKENS + 1, total) if tokens[i] not in tokens[:i])  # in a later round
    with torch.inference_mode():
        stopped = list(decoder.decode(None, embeddings(model, prompt), prompt[0], total, 1.1,
                                      eos_ids=(tokens[first_new],)))
    assert stopped == tokens[:first_new]
    assert fast(model, decoder, prompt, 1) == tokens[:1] and decoder.last_stats.steps == 0


def test_sampling_scores_every_row_even_with_a_shortlist():
    model = small_gemma(seed=12)
    decoder = FastDecoder(model.model, max_positions=64, compile=False, shortlist=Shortlist(torch.tensor([0])))
    prompt = prompt_ids(5, seed=12)
    with torch.inference_mode():
        sampled = list(decoder.decode(None, embeddings(model, prompt), prompt[0], 10, 1.0,
                                      temperature=1.0, generator=torch.Generator().manual_seed(0)))
    assert len(sampled) == 10 and decoder.last_stats.checks == 0
    assert decoder.last_stats.head_rows == 9 * VOCAB


def test_text_pieces_wait_for_whole_characters_and_stop_after_a_stop_string():
    class Bytes:  # decodes ids as UTF-8 bytes, like a byte-fallback vocabulary
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    snowman = list("a☃".encode())  # 'a' then a 3-byte character
    assert list(TextPieces(Bytes()).feed(iter(snowman))) == ["a", "☃"]
    stream = list(TextPieces(Bytes(), stop=("\nX",)).feed(iter(b"ok\nX: more")))
    assert "".join(stream) == "ok\nX"


def test_vlm_stream_uses_the_fast_path_once_ready_and_matches_generate():
    from assistant.model import ClinicalVLM

    torch.manual_seed(0)
    lm = small_gemma(seed=8)
    lm.config.vocab_size = VOCAB
    vlm = ClinicalVLM.from_parts(lm, _tokenizer_for(VOCAB), tiny_config())
    vlm.attach_lora()
    with torch.no_grad():
        for name, param in vlm.hf.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    image = torch.rand(32, 32).numpy()
    inputs = vlm.build_inputs("findings : <image> the lungs", [image])
    slow = "".join(vlm.stream(inputs, task="report"))
    generation = vlm.start_fast_decoding(wait=True, compile=False)
    assert generation.ready.is_set(), generation.failure
    calls = []
    original = generation.decoder.decode
    generation.decoder.decode = lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    assert "".join(vlm.stream(inputs, task="report")) == slow
    assert calls == ["default"]


def test_a_seeded_sample_on_the_fast_path_is_reproducible(tiny_vlm):
    from assistant.config import GenerationConfig

    generation = tiny_vlm.start_fast_decoding(wait=True, compile=False)
    assert generation.ready.is_set(), generation.failure
    inputs = tiny_vlm.build_inputs("findings : the lungs are")
    def sample(seed):
        gen = GenerationConfig(max_new_tokens=24, temperature=1.5, seed=seed)
        assert tiny_vlm.fast.usable(inputs, gen)
        return "".join(tiny_vlm.stream(inputs, gen))
    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_a_failed_warm_up_leaves_generate_in_charge(tiny_vlm):
    tiny_vlm.fast = FastGeneration(tiny_vlm, compile=False)
    tiny_vlm.fast._warm = lambda: setattr(tiny_vlm.fast, "failure", "boom")
    tiny_vlm.fast.start(wait=True)
    inputs = tiny_vlm.build_inputs("findings : the lungs")
    assert not tiny_vlm.fast.usable(inputs, tiny_vlm.config.generation)
    assert isinstance("".join(tiny_vlm.stream(inputs)), str)


def _tokenizer_for(vocab: int):
    """The tiny word tokenizer padded with extra words up to `vocab` ids."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"w{index}" for index in range(vocab - len(tokenizer))])
    return tokenizer


def test_the_vlm_drafts_over_its_configured_shortlist_and_skips_a_foreign_one(tmp_path, caplog):
    import dataclasses

    from assistant.model import ClinicalVLM
    from assistant.vocab_shortlist import save

    save(tmp_path / "ok", torch.arange(0, VOCAB, 2, dtype=torch.int32), {"vocab_size": VOCAB})
    save(tmp_path / "foreign", torch.arange(4, dtype=torch.int32), {"vocab_size": 262144})
    results = {}
    for name in ("ok", "foreign"):
        config = tiny_config()
        config = dataclasses.replace(config, generation=dataclasses.replace(config.generation,
                                                                            shortlist=str(tmp_path / name)))
        vlm = ClinicalVLM.from_parts(small_gemma(seed=8), _tokenizer_for(VOCAB), config)
        inputs = vlm.build_inputs("findings : the lungs")
        slow = "".join(vlm.stream(inputs))
        generation = vlm.start_fast_decoding(wait=True, compile=False)
        results[name] = generation.decoder.shortlist
        assert "".join(vlm.stream(inputs)) == slow
    assert results["ok"] is not None and results["foreign"] is None
    assert "scores every output row" in caplog.text
