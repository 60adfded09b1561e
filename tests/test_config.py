from __future__ import annotations

import dataclasses

import pytest

from assistant.config import AssistantConfig


def test_json_round_trip(tmp_path):
    config = AssistantConfig().override({"llm.lora_r": 8, "projector.kind": "linear", "adapter": "adapters/x"})
    config.to_json(tmp_path / "c.json")
    assert AssistantConfig.from_json(tmp_path / "c.json") == config


def test_override_returns_a_new_config_and_keeps_the_old():
    base = AssistantConfig()
    derived = base.override({"generation.max_new_tokens": 12})
    assert derived.generation.max_new_tokens == 12
    assert base.generation.max_new_tokens != 12


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AssistantConfig().llm.lora_r = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["llm.nope", "nope.lora_r", "nope"])
def test_unknown_fields_are_rejected(name):
    with pytest.raises(KeyError, match="unknown config"):
        AssistantConfig().override({name: 1})
