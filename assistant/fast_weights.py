"""The Gemma 3 text model's weights in the layout the fast decoder's token step reads.

The step (assistant.fast_decode) takes every weight as a graph input, not a constant, so one
compiled graph serves every adapter: `decoder_weights` copies the base matrices (q, k, v stacked;
gate and up stacked) and, on the layers some loaded adapter touches, peft's LoRA factors beside
them, zero-padded to one rank (`LoraLayout`). Nothing is merged and the model is never modified.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


class FastDecodeUnsupported(ValueError):
    """The model is not one this decoder implements (it then falls back to `generate`)."""


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TENSORS = 2 * len(LORA_MODULES) + 1  # A and B per module, then the scalings


@dataclasses.dataclass
class LayerWeights:
    qkv: torch.Tensor  # q, k and v projections stacked: one matrix-vector product
    o: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked
    down: torch.Tensor
    norms: torch.Tensor  # (6, dims) fp32 scales 1 + w: input, post-attn, pre-ff, post-ff (hidden), q, k (head)
    # LoRA beside the base matrices, as peft computes it (see `lora_tensors`); empty on layers no
    # loaded adapter touches.
    lora: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [self.qkv, self.o, self.gate_up, self.down, self.norms, *self.lora]


@dataclasses.dataclass
class DecoderWeights:
    embed: torch.Tensor  # (vocab, hidden) in the model dtype, also the output matrix (tied)
    layers: list[LayerWeights]
    final_norm: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.final_norm]
        for layer in self.layers:
            out += layer.tensors()
        return out

    def bytes_per_token(self) -> int:
        """Weight bytes one step streams: every layer matrix and norm, and the whole tied output
        matrix once (the embedding lookup reads one row of it)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class Layer(NamedTuple):
    """One decoder layer's tensors as the step and the prefill read them (views, no copies)."""
    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    hidden_norm: torch.Tensor  # rows 0-3: input, post-attention, pre-feed-forward, post-feed-forward
    head_norm: torch.Tensor  # rows 4-5: q and k norms
    lora: list[torch.Tensor] | None  # `lora_tensors`, or None on a layer no adapter touches


def split_layers(shape: "DecoderShape", layout: "LoraLayout", weights: list[torch.Tensor]) -> list[Layer]:
    """`DecoderWeights.tensors()` (laid out by `layout`) back into layers."""
    layers, cursor = [], 2
    for index in range(shape.layers):
        qkv, o, gate_up, down, norms = weights[cursor: cursor + 5]
        lora = weights[cursor + 5: cursor + 5 + LORA_TENSORS] if layout.layers[index] else None
        cursor += 5 + (LORA_TENSORS if lora else 0)
        layers.append(Layer(qkv, o, gate_up, down, norms[:, : shape.hidden], norms[:, : shape.head_dim], lora))
    return layers


@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """Which layers carry LoRA in the step, at which rank: the union over every adapter loaded in
    the model, fixed when the decoder is built, so all adapters (and none) share one graph; an
    adapter without LoRA somewhere gets zeros there, which add exactly nothing."""
    layers: tuple[bool, ...]
    rank: int

    @classmethod
    def of(cls, text_model) -> "LoraLayout":
        ranks = [[adapter.weight.shape[0] for name in LORA_MODULES
                  for adapter in getattr(_module(layer, name), "lora_A", {}).values()]
                 for layer in text_model.layers]
        return cls(layers=tuple(bool(r) for r in ranks), rank=max((max(r) for r in ranks if r), default=0))


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    sliding: tuple[bool, ...]
    window: int
    eps: float
    scaling: float
    embed_scale: float
    vocab: int
    rope_theta_local: float
    rope_theta_global: float

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        if getattr(config, "model_type", "") not in ("gemma3_text",):
            raise FastDecodeUnsupported(f"fast decoding implements Gemma 3 text models, not {config.model_type!r}")
        if config.final_logit_softcapping or config.attn_logit_softcapping:
            raise FastDecodeUnsupported("fast decoding does not implement logit soft-capping")
        rope = config.rope_parameters
        if any(rope[kind].get("rope_type", "default") != "default" for kind in rope):
            raise FastDecodeUnsupported("fast decoding implements default RoPE only")
        return cls(hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                   head_dim=config.head_dim, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers,
                   sliding=tuple(kind == "sliding_attention" for kind in config.layer_types),
                   window=config.sliding_window, eps=config.rms_norm_eps,
                   scaling=config.query_pre_attn_scalar ** -0.5, embed_scale=config.hidden_size ** 0.5,
                   vocab=config.vocab_size, rope_theta_local=rope["sliding_attention"]["rope_theta"],
                   rope_theta_global=rope["full_attention"]["rope_theta"])


def _module(layer, name: str):
    return getattr(layer.self_attn if name in LORA_MODULES[:4] else layer.mlp, name)


def decoder_weights(text_model, adapter: str | None, layout: LoraLayout) -> DecoderWeights:
    """Copies of a Gemma3TextModel's weights in the decoding layout: the base matrices (peft's
    base_layer, never merged) and, on the layout's layers, peft LoRA `adapter`'s factors beside
    them (None: zeros, the base model). The model itself is never modified."""
    dtype = text_model.embed_tokens.weight.dtype

    def base(module) -> torch.Tensor:
        return getattr(module, "base_layer", module).weight.detach().to(dtype)

    def scale(norm) -> torch.Tensor:
        return 1.0 + norm.weight.detach().float()

    layers = []
    for index, layer in enumerate(text_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        hidden_norms = [scale(n) for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                           layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)]
        head_norms = [scale(attn.q_norm), scale(attn.k_norm)]
        width = max(hidden_norms[0].numel(), head_norms[0].numel())
        norms = torch.ones(6, width)
        for row, values in enumerate(hidden_norms + head_norms):
            norms[row, : values.numel()] = values
        layers.append(LayerWeights(
            qkv=torch.cat([base(attn.q_proj), base(attn.k_proj), base(attn.v_proj)]).contiguous(),
            o=base(attn.o_proj).contiguous(),
            gate_up=torch.cat([base(mlp.gate_proj), base(mlp.up_proj)]).contiguous(),
            down=base(mlp.down_proj).contiguous(), norms=norms,
            lora=lora_tensors(layer, adapter, layout.rank, dtype) if layout.layers[index] else []))
    return DecoderWeights(embed=text_model.embed_tokens.weight.detach().to(dtype), layers=layers,
                          final_norm=scale(text_model.norm))


def lora_tensors(layer, adapter: str | None, rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """One layer's LoRA for the step: per module (q, k, v, o, gate, up, down) its A (rank, in) and
    B (out, rank) zero-padded to `rank` (padding adds exact zeros), then the seven scalings (fp32).
    Zeros where `adapter` has no LoRA. peft computes B(A x) * scaling in the model dtype and adds
    it to the base output; the step does the same, so no merged-weight rounding enters."""
    factors, scalings = [], []
    for name in LORA_MODULES:
        module = _module(layer, name)
        out_features, in_features = getattr(module, "base_layer", module).weight.shape
        a, b = torch.zeros(rank, in_features, dtype=dtype), torch.zeros(out_features, rank, dtype=dtype)
        scaling = 0.0
        if adapter is not None and adapter in getattr(module, "lora_A", {}):
            r = module.lora_A[adapter].weight.shape[0]
            a[:r] = module.lora_A[adapter].weight.detach()
            b[:, :r] = module.lora_B[adapter].weight.detach()
            scaling = float(module.scaling[adapter])
        factors += [a, b]
        scalings.append(scaling)
    return factors + [torch.tensor(scalings, dtype=torch.float32)]


def rope_tables(shape: DecoderShape, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, positions, head_dim) cos and sin, row 0 for sliding layers and row 1 for global ones,
    computed like transformers (fp32 angles, then the model's dtype)."""
    def table(theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float) / shape.head_dim))
        angles = torch.arange(positions, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    local, global_ = table(shape.rope_theta_local), table(shape.rope_theta_global)
    return torch.stack([local[0], global_[0]]), torch.stack([local[1], global_[1]])
