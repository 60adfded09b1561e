"""The vocabulary shortlist: built from training text only, saved and loaded with its checks."""

import json
from pathlib import Path

import pytest
import torch

from assistant import vocab_shortlist
from assistant.vocab_shortlist import ShortlistError, build, load, save
from conftest import tiny_tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "adapters" / "vocab-shortlist"


def test_the_shortlist_holds_training_tokens_and_eos_and_measures_held_out_coverage(monkeypatch):
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(vocab_shortlist, "training_texts", lambda root=None: ["the lungs are clear", "the heart"])
    monkeypatch.setattr(vocab_shortlist, "held_out_targets", lambda root=None: ["the lungs are normal"])
    ids, meta = build(tokenizer, len(tokenizer), eos_ids=[tokenizer.eos_token_id])
    words = set(tokenizer.convert_ids_to_tokens(ids.tolist()))
    assert words == {"the", "lungs", "are", "clear", "heart", "<eos>"}
    assert ids.tolist() == sorted(ids.tolist())
    assert meta["held_out_coverage"] == {"target_tokens": 4, "in_shortlist": 3, "fraction": 0.75}
    assert meta["tokens"] == 6 and meta["vocab_size"] == len(tokenizer)


def test_save_and_load_round_trip_and_refuse_a_foreign_vocabulary(tmp_path):
    ids = torch.tensor([1, 5, 9], dtype=torch.int32)
    save(tmp_path, ids, {"vocab_size": 10})
    assert load(tmp_path, 10).tolist() == [1, 5, 9]
    with pytest.raises(ShortlistError, match="vocabulary of 10 tokens, not this model's 262144"):
        load(tmp_path, 262144)
    with pytest.raises(ShortlistError, match="no vocabulary shortlist"):
        load(tmp_path / "missing", 10)
    (tmp_path / vocab_shortlist.IDS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ShortlistError, match="unreadable"):
        load(tmp_path, 10)


def test_the_shipped_shortlist_fits_the_built_in_model():
    meta = json.loads((SHIPPED / vocab_shortlist.META_FILE).read_text())
    ids = load(SHIPPED, 262144)
    assert len(ids) == meta["tokens"] < 40_000  # a small part of the 262,144 rows
    assert set(meta["eos_ids"]) <= set(ids.tolist())
    assert meta["held_out_coverage"]["fraction"] > 0.99


def test_the_cli_builds_a_shortlist_for_a_local_model_folder(tmp_path, monkeypatch, capsys):
    from transformers import Gemma3TextConfig

    from assistant.cli import main

    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "llm"
    tokenizer.save_pretrained(model_dir)
    Gemma3TextConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id).save_pretrained(model_dir)
    monkeypatch.setattr(vocab_shortlist, "training_texts", lambda root=None: ["the lungs are clear"])
    monkeypatch.setattr(vocab_shortlist, "held_out_targets", lambda root=None: ["the heart"])
    assert main(["build-shortlist", "--llm", str(model_dir), "--out", str(tmp_path / "out")]) == 0
    assert "5 of" in capsys.readouterr().out  # four words and <eos>
    assert len(load(tmp_path / "out", len(tokenizer))) == 5
    assert main(["build-shortlist", "--llm", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
