"""export-adapter: HF <-> GGUF names, the peft LoRA on the plain text model (what vLLM serves), and a
merged GGUF that llama.cpp loads and that answers like transformers + LoRA."""

from __future__ import annotations

import json

import pytest

from assistant.serve_export import (
    ADAPTER_CONFIG, export_merged_gguf, export_peft, gguf_tensor_name, text_model_name,
)
from conftest import ROOT

ADAPTER = ROOT / "adapters" / "report-lora"
PEFT_PREFIX = "base_model.model.model.language_model.layers.10."


@pytest.mark.parametrize("module, tensor", [
    ("self_attn.q_proj", "blk.10.attn_q.weight"), ("self_attn.k_proj", "blk.10.attn_k.weight"),
    ("self_attn.v_proj", "blk.10.attn_v.weight"), ("self_attn.o_proj", "blk.10.attn_output.weight"),
    ("mlp.gate_proj", "blk.10.ffn_gate.weight"), ("mlp.up_proj", "blk.10.ffn_up.weight"),
    ("mlp.down_proj", "blk.10.ffn_down.weight"),
])
def test_every_lora_target_has_its_gguf_tensor(module, tensor):
    assert gguf_tensor_name(PEFT_PREFIX + module, "gemma3", 18) == tensor
    assert gguf_tensor_name("model.layers.10." + module, "gemma3", 18) == tensor  # plain HF names too


def test_unmappable_modules_are_refused():
    with pytest.raises(ValueError, match="no GGUF tensor"):
        gguf_tensor_name(PEFT_PREFIX + "self_attn.rotary", "gemma3", 18)
    with pytest.raises(ValueError, match="no GGUF tensor"):
        gguf_tensor_name(PEFT_PREFIX + "self_attn.q_proj", "no-such-arch", 18)


def test_text_model_names():
    assert text_model_name(PEFT_PREFIX + "mlp.up_proj.lora_A.weight") == \
        "base_model.model.model.layers.10.mlp.up_proj.lora_A.weight"
    assert text_model_name("model.language_model.layers.3.mlp") == "model.layers.3.mlp"


def test_cli_refuses_a_missing_adapter(tmp_path, capsys):
    from assistant.cli import main

    assert main(["export-adapter", "--format", "peft", "--out", str(tmp_path)]) == 2
    assert "error: name the adapter to export with --adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_peft_export_is_the_same_lora_on_the_plain_text_model(llm_cache, real_assistant, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    modules = export_peft(ADAPTER, tmp_path, {"hf_folder": str(llm_cache["folder"])})
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert len(modules) == 56 and config["target_modules"] == modules  # 8 layers x 7 projections
    text_lm = AutoModelForCausalLM.from_pretrained(str(llm_cache["folder"]), dtype=torch.bfloat16)
    served = PeftModel.from_pretrained(text_lm, str(tmp_path)).eval()
    inputs = real_assistant.vlm.build_inputs("FINDINGS: The heart size is")
    with real_assistant.vlm.adapter_for("report"), torch.inference_mode():  # the report LoRA active
        ours = real_assistant.vlm.hf(**inputs).logits.float()
        theirs = served(**inputs).logits.float()
        with served.disable_adapter():
            base = served(**inputs).logits.float()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (ours - theirs).abs().max() < 0.05 < (ours - base).abs().max()


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.slow
def test_merged_gguf_answers_like_transformers_with_the_lora(real_assistant, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[serve]')")
    from assistant.config import GenerationConfig
    from assistant.pipeline import report_prompt
    from assistant.serve_export import packaged_gguf

    merged = export_merged_gguf(real_assistant.config, tmp_path, "f16")
    prompt, tokens = report_prompt([], "cough and fever for three days"), 24
    vlm, greedy = real_assistant.vlm, GenerationConfig(max_new_tokens=tokens, repetition_penalty=1.0)
    reference = "".join(vlm.stream(vlm.build_inputs(prompt), greedy, task="report"))  # transformers + LoRA

    def llama_text(path) -> str:
        # One thread: two spin-wait for each other and run 10x slower when the 2 cores are busy.
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=1, verbose=False)
        out = llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
        return out["choices"][0]["text"]

    merged_text, base_text = llama_text(merged), llama_text(packaged_gguf())
    agree_merged, agree_base = _common_prefix(merged_text, reference), _common_prefix(base_text, reference)
    assert merged_text == reference or agree_merged > agree_base, (reference, merged_text, base_text)
