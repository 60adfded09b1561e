"""Fast one-sequence decoding of the Gemma 3 text model on a CPU: one compiled graph per token.

Why: plain `generate` spends most of each step in Python and in torch's bf16 matrix-vector kernel,
which reads the 262k x 640 output matrix at ~11 GB/s on our 2-core CPU while the memory bus gives
~30 GB/s. Here the whole token step (embedding, 18 decoder layers, final norm, output matrix,
repetition penalty, argmax) is one `torch.compile` graph: Inductor fuses each matrix-vector product
into a vectorised reduction that streams the bf16 weights near memory speed, and the KV cache is a
preallocated buffer indexed by position (no per-step allocation or concatenation).

The math follows transformers' Gemma 3 (RMSNorm with 1 + weight in fp32, q/k norms, two RoPE
tables, sliding-window layers, embedding scale, tied output matrix) with LoRA merged into the
weights; logits are rounded to the model dtype like the reference path before the penalty and
argmax. Greedy tokens match `generate`'s in the tests (tests/test_fast_decode.py); on the real bf16
model the merged LoRA rounds differently from peft's unmerged path, so a near-tie can flip (the
generation benchmark reports where). Prefill, including image tokens, runs through the Hugging Face
model once; its cache is copied in.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import torch

CACHE_BLOCK = 256  # the KV cache grows (and attention reads) in blocks of this many positions
# Inductor options for the step. realize_opcount_threshold=0 stores each normalised activation
# vector before the matrix-vector product that reads it: by default Inductor inlines the RMSNorm
# (and even the embedding lookup) into the product's loop and recomputes it for every weight row.
# emulate_precision_casts keeps eager's bf16 rounding of intermediates, so greedy tokens match.
COMPILE_OPTIONS = {"realize_opcount_threshold": 0, "emulate_precision_casts": True}
# The cache holds bf16 values in fp32 so attention's matmuls read it as is (no converted copy).
CACHE_DTYPE = torch.float32


class FastDecodeUnsupported(ValueError):
    """The model is not one this decoder implements (it then falls back to `generate`)."""


@dataclasses.dataclass
class LayerWeights:
    qkv: torch.Tensor  # q, k and v projections stacked: one matrix-vector product
    o: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked
    down: torch.Tensor
    norms: torch.Tensor  # (6, dims) fp32 scales 1 + w: input, post-attn, pre-ff, post-ff (hidden), q, k (head)


@dataclasses.dataclass
class DecoderWeights:
    embed: torch.Tensor  # (vocab, hidden) in the model dtype, also the output matrix (tied)
    layers: list[LayerWeights]
    final_norm: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.final_norm]
        for layer in self.layers:
            out += [layer.qkv, layer.o, layer.gate_up, layer.down, layer.norms]
        return out

    def bytes_per_token(self) -> int:
        """Weight bytes one step streams: every layer matrix and norm, and the whole tied output
        matrix once (the embedding lookup reads one row of it)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


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


def merged_weights(text_model, adapter: str | None = None) -> DecoderWeights:
    """Copies of a Gemma3TextModel's weights in the decoding layout, with peft LoRA `adapter` merged
    in fp32 (None: the base weights). The model itself is never modified: merging and unmerging in
    place would leave bf16 rounding drift in the shared base weights."""
    dtype = text_model.embed_tokens.weight.dtype

    def matrix(module) -> torch.Tensor:
        if hasattr(module, "base_layer"):  # a peft LoRA layer
            weight = module.base_layer.weight.detach().float()
            if adapter is not None and adapter in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(adapter).float()
            return weight.to(dtype)
        return module.weight.detach().to(dtype)

    def scale(norm) -> torch.Tensor:
        return 1.0 + norm.weight.detach().float()

    layers = []
    for layer in text_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        hidden_norms = [scale(n) for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                           layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)]
        head_norms = [scale(attn.q_norm), scale(attn.k_norm)]
        width = max(hidden_norms[0].numel(), head_norms[0].numel())
        norms = torch.ones(6, width)
        for row, values in enumerate(hidden_norms + head_norms):
            norms[row, : values.numel()] = values
        layers.append(LayerWeights(
            qkv=torch.cat([matrix(attn.q_proj), matrix(attn.k_proj), matrix(attn.v_proj)]).contiguous(),
            o=matrix(attn.o_proj).contiguous(),
            gate_up=torch.cat([matrix(mlp.gate_proj), matrix(mlp.up_proj)]).contiguous(),
            down=matrix(mlp.down_proj).contiguous(), norms=norms))
    return DecoderWeights(embed=text_model.embed_tokens.weight.detach().to(dtype), layers=layers,
                          final_norm=scale(text_model.norm))


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


# ---- the token step (traced by torch.compile) -----------------------------------------------------
def _matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight @ x as a multiply-and-sum: Inductor turns it into one vectorised pass over the weight
    (torch's bf16 gemv kernel is compute-bound at about a third of memory speed on this CPU)."""
    return (weight.float() * x.float()).sum(-1).to(x.dtype)


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * scale).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def decode_step(shape: DecoderShape, weights: list[torch.Tensor], token: torch.Tensor, position: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seen: torch.Tensor, penalty: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """One token at `position`: (bf16-rounded fp32 logits after the repetition penalty, greedy next
    token, the token's keys and values (layers, kv_heads, head_dim) for the caller to store).

    `keys`/`values` (layers, kv_heads, span, head_dim): cache views holding positions < `position`;
    they are only read (no input mutation, so the graph has no copy-back). `seen`: bool (vocab,)
    marking the tokens the penalty applies to."""
    embed, final_norm = weights[0], weights[1]
    span = keys.shape[2]
    h = embed[token] * torch.tensor(shape.embed_scale, dtype=embed.dtype)  # (1, hidden), the weights' dtype
    slots = torch.arange(span)
    earlier = slots < position
    local_earlier = earlier & (slots > position - shape.window)
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    group = shape.heads // shape.kv_heads
    new_keys, new_values = [], []
    for index in range(shape.layers):
        qkv, o, gate_up, down, norms = weights[2 + 5 * index: 7 + 5 * index]
        hidden_norm, head_norm = norms[:, : shape.hidden], norms[:, : shape.head_dim]
        x = _rms_norm(h, hidden_norm[0], shape.eps)
        mixed = _matvec(qkv, x)
        q = mixed[..., :q_size].view(shape.heads, shape.head_dim)
        k = mixed[..., q_size: q_size + kv_size].view(shape.kv_heads, shape.head_dim)
        v = mixed[..., q_size + kv_size:].view(shape.kv_heads, shape.head_dim)
        table = 0 if shape.sliding[index] else 1
        c, s = cos[table].index_select(0, position), sin[table].index_select(0, position)
        q = _rotate(_rms_norm(q, head_norm[4], shape.eps), c, s)
        k = _rotate(_rms_norm(k, head_norm[5], shape.eps), c, s)
        new_keys.append(k)
        new_values.append(v)
        attended = _attend(q, k, v, keys[index], values[index], local_earlier if shape.sliding[index] else earlier,
                           group, shape.scaling).reshape(1, q_size)
        h = h + _rms_norm(_matvec(o, attended), hidden_norm[1], shape.eps)
        x = _rms_norm(h, hidden_norm[2], shape.eps)
        gu = _matvec(gate_up, x)
        gate, up = gu[..., : shape.intermediate], gu[..., shape.intermediate:]
        act = torch.nn.functional.gelu(gate.float(), approximate="tanh").to(up.dtype) * up
        h = h + _rms_norm(_matvec(down, act), hidden_norm[3], shape.eps)
    h = _rms_norm(h, final_norm, shape.eps)
    logits = _penalise(_matvec(embed, h[0]).float(), seen, penalty)  # bf16-rounded like the reference
    return logits, logits.argmax(), torch.stack(new_keys), torch.stack(new_values)


def _attend(q, k, v, cached_keys, cached_values, visible, group: int, scaling: float) -> torch.Tensor:
    """Softmax attention of q (heads, dim) over the visible cached positions and the token itself.
    The cache products are batched matmuls (external BLAS calls): written as multiply-and-sum,
    Inductor stores the whole (heads, span, dim) product before summing it."""
    kv_heads, dim = k.shape
    q32 = q.float().view(kv_heads, group, dim)
    past = torch.matmul(q32, cached_keys.transpose(-1, -2)) * scaling  # (kv_heads, group, span)
    past = past.masked_fill(~visible, float("-inf"))
    own = (q32 * k.float().unsqueeze(1)).sum(-1, keepdim=True) * scaling  # (kv_heads, group, 1)
    probs = torch.softmax(torch.cat([past, own], dim=-1), dim=-1).to(q.dtype).float()
    out = torch.matmul(probs[..., :-1], cached_values) + probs[..., -1:] * v.float().unsqueeze(1)
    return out.to(q.dtype).view(kv_heads * group, dim)


# ---- the decoder ------------------------------------------------------------------------------------
class FastDecoder:
    """Greedy or sampled decoding of one sequence with the compiled token step.

    `weights_for(task)` builds (once per adapter) the merged weights; every task shares one compiled
    graph because the weights are graph inputs, not constants."""

    def __init__(self, text_model, max_positions: int = 4096, compile: bool = True):
        self.shape = DecoderShape.from_config(text_model.config)
        self.text_model = text_model
        self.max_positions = max_positions
        self.cos, self.sin = rope_tables(self.shape, max_positions, text_model.embed_tokens.weight.dtype)
        self._weights: dict[str | None, DecoderWeights] = {}
        self._weights_lock = threading.Lock()
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache_lock = threading.Lock()  # one sequence at a time owns the cache
        step = self._eager_step
        self._step = torch.compile(step, dynamic=None, options=COMPILE_OPTIONS) if compile else step

    def _eager_step(self, weights, token, position, keys, values, cos, sin, seen, penalty):
        return decode_step(self.shape, weights, token, position, keys, values, cos, sin, seen, penalty)

    def weights_for(self, adapter: str | None) -> DecoderWeights:
        with self._weights_lock:
            if adapter not in self._weights:
                with torch.no_grad():
                    self._weights[adapter] = merged_weights(self.text_model, adapter)
            return self._weights[adapter]

    def cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The KV cache, keys and values (layers, kv_heads, positions, dim), allocated once at full
        capacity so its strides never change (a new stride would recompile the step). Stale entries
        from an earlier sequence are finite and masked out, never read as zeros."""
        if self._cache is None:
            s = self.shape
            with torch.inference_mode(False):  # updated in place by every later call, in or out of the mode
                self._cache = (torch.zeros(s.layers, s.kv_heads, self.max_positions, s.head_dim, dtype=CACHE_DTYPE),
                               torch.zeros(s.layers, s.kv_heads, self.max_positions, s.head_dim, dtype=CACHE_DTYPE))
        return self._cache

    def load_prefill(self, past_key_values, length: int) -> None:
        """Copy a transformers cache (sliding layers keep only their last window) into the slots of
        the positions it holds."""
        keys, values = self.cache()
        for index, layer in enumerate(past_key_values.layers):
            held = layer.keys.shape[2]
            keys[index, :, length - held: length] = layer.keys[0]
            values[index, :, length - held: length] = layer.values[0]

    def warm_up(self, adapter: str | None) -> None:
        """Compile the token step (one graph for every span) on a throwaway token."""
        with self._cache_lock, torch.inference_mode():
            seen = torch.zeros(self.shape.vocab, dtype=torch.bool)
            self._advance(self.weights_for(adapter).tensors(), torch.tensor(0), 1, seen, 1.0)

    def fits(self, prompt_length: int, max_new_tokens: int) -> bool:
        return prompt_length + max_new_tokens <= self.max_positions

    def decode(self, adapter: str | None, past_key_values, prompt_ids: torch.Tensor, first_logits: torch.Tensor,
               max_new_tokens: int, penalty: float = 1.0, temperature: float = 0.0,
               eos_ids: tuple[int, ...] = (), generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield new token ids: the first from the prefill's last logits, then one compiled step each.
        Stops after an EOS id (not yielded) or `max_new_tokens`."""
        length = prompt_ids.numel()
        if not self.fits(length, max_new_tokens):
            raise ValueError(f"prompt of {length} tokens + {max_new_tokens} new exceeds {self.max_positions} positions")
        weights = self.weights_for(adapter).tensors()
        with self._cache_lock:
            keys, values = self.cache()
            with torch.inference_mode():
                self.load_prefill(past_key_values, length)
                seen = torch.zeros(self.shape.vocab, dtype=torch.bool)
                seen[prompt_ids.flatten()] = True
                logits = _penalise(first_logits.float(), seen, penalty)  # the model dtype's values, like generate
                token = _choose(logits, logits.argmax(), temperature, generator)
            for produced in range(max_new_tokens):
                if int(token) in eos_ids:
                    return
                yield int(token)
                if produced + 1 == max_new_tokens:
                    return
                with torch.inference_mode():  # per step, never across a yield (the mode is thread state)
                    seen[token] = True
                    logits, greedy = self._advance(weights, token, length + produced, seen, penalty)
                    token = _choose(logits, greedy, temperature, generator)

    def _advance(self, weights, token, position: int, seen, penalty: float):
        """Run the step for `token` at `position` and store its keys and values."""
        keys, values = self.cache()
        span = min(self.max_positions, max(1, -(-position // CACHE_BLOCK)) * CACHE_BLOCK)
        past_keys, past_values = keys[:, :, :span], values[:, :, :span]
        torch._dynamo.mark_dynamic(past_keys, 2)  # one graph for every span
        torch._dynamo.mark_dynamic(past_values, 2)
        logits, greedy, new_keys, new_values = self._step(weights, token.view(1), torch.tensor([position]),
                                                          past_keys, past_values, self.cos, self.sin, seen,
                                                          torch.tensor(float(penalty)))  # a tensor: no recompile per value
        keys[:, :, position] = new_keys
        values[:, :, position] = new_values
        return logits, greedy


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' logits divided (positive) or multiplied
    (negative) by `penalty`."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def _choose(logits: torch.Tensor, greedy: torch.Tensor, temperature: float,
            generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return greedy
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
