"""Fast one-sequence decoding of the Gemma 3 text model on a CPU: one native call per token.

Why: plain `generate` spends most of each step in Python and in torch's bf16 matrix-vector kernel,
which reads the 262k x 640 output matrix at ~11 GB/s on our 2-core CPU while the memory bus gives
20-30 GB/s. Here the whole token step (embedding, 18 decoder layers, final norm, output rows,
repetition penalty, argmax) is one call: the C++ step of assistant.fast_native (AVX2 or
AVX512-BF16, each bf16 weight row streamed once), or, where that cannot be built, one `torch.compile` graph in which
Inductor fuses each matrix-vector product into a vectorised reduction. The KV cache is a
preallocated buffer indexed by position (no per-step allocation or concatenation). Greedy steps
score only a shortlist of the output rows, checked against all of them (assistant.fast_check).

The math follows transformers' Gemma 3 (RMSNorm with 1 + weight in fp32, q/k norms, two RoPE
tables, sliding-window layers, embedding scale, tied output matrix) and peft's LoRA, computed beside
the base matrices with peft's roundings rather than merged into them (a merged bf16 weight rounds
differently, and a near-tie then flips a token). Every product sums in fp32 and is rounded to the
model dtype, like the reference path; only the order of the fp32 sums differs. Greedy tokens match
`generate`'s in the tests (tests/test_fast_decode.py, tests/test_fast_native.py); the generation
benchmark measures agreement on the real model over held-out prompts. The prompt, image tokens
included, is prefilled in fp32 matrix products (assistant.fast_prefill) straight into the
decoder's cache.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator

import torch

from .fast_check import DRAFT_TOKENS, Shortlist, VocabularyCheck, rows_of
from .fast_math import after_attention, attention_inputs, penalise, rms_norm, rotate
from .fast_native import NativeStep, NativeUnavailable
from .fast_prefill import prefill
from .fast_weights import DecoderShape, DecoderWeights, LoraLayout, decoder_weights, rope_tables, split_layers

log = logging.getLogger(__name__)

CACHE_BLOCK = 128  # attention reads the cache up to the next multiple of this (a smaller block reads
# fewer stale slots; every span shares one dynamic graph)
# Inductor options for the step. realize_opcount_threshold=0 stores each normalised activation
# vector before the matrix-vector product that reads it: by default Inductor inlines the RMSNorm
# (and even the embedding lookup) into the product's loop and recomputes it for every weight row.
# emulate_precision_casts keeps eager's bf16 rounding of intermediates, so greedy tokens match.
COMPILE_OPTIONS = {"realize_opcount_threshold": 0, "emulate_precision_casts": True}
# The cache holds bf16 values in fp32 so attention's matmuls read it as is (no converted copy).
CACHE_DTYPE = torch.float32


# ---- the token step (traced by torch.compile) -----------------------------------------------------
def _matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight @ x as a multiply-and-sum: Inductor turns it into one vectorised pass over the weight
    (torch's bf16 gemv kernel is compute-bound at about a third of memory speed on this CPU)."""
    return (weight.float() * x.float()).sum(-1).to(x.dtype)


def decode_step(shape: DecoderShape, layout: LoraLayout, weights: list[torch.Tensor], head: torch.Tensor, token: torch.Tensor,
                position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """One token at `position`: (bf16-rounded fp32 logits over the rows of `head` after the
    repetition penalty, the greedy row, the token's keys and values (layers, kv_heads, head_dim) for
    the caller to store, the final normalised hidden state (1, hidden)).

    `weights`: `DecoderWeights.tensors()`, laid out by `layout`.
    `head`: the output matrix, the whole embedding or a shortlist of its rows (`Shortlist`).
    `keys`/`values` (layers, kv_heads, span, head_dim): cache views holding positions < `position`;
    they are only read (no input mutation, so the graph has no copy-back). `seen`: bool, one per
    row of `head`, marking the tokens the penalty applies to."""
    embed, final_norm = weights[0], weights[1]
    span = keys.shape[2]
    h = embed[token] * torch.tensor(shape.embed_scale, dtype=embed.dtype)  # (1, hidden), the weights' dtype
    slots = torch.arange(span)
    earlier = slots < position
    local_earlier = earlier & (slots > position - shape.window)
    group = shape.heads // shape.kv_heads
    new_keys, new_values = [], []
    for index, layer in enumerate(split_layers(shape, layout, weights)):
        q, k, v = attention_inputs(h, layer, shape, _matvec)
        q, k, v = q.view(shape.heads, shape.head_dim), k.view(shape.kv_heads, shape.head_dim), v.view(shape.kv_heads, shape.head_dim)
        table = 0 if shape.sliding[index] else 1
        c, s = cos[table].index_select(0, position), sin[table].index_select(0, position)
        q = rotate(rms_norm(q, layer.head_norm[4], shape.eps), c, s)
        k = rotate(rms_norm(k, layer.head_norm[5], shape.eps), c, s)
        new_keys.append(k)
        new_values.append(v)
        attended = _attend(q, k, v, keys[index], values[index], local_earlier if shape.sliding[index] else earlier,
                           group, shape.scaling).reshape(1, -1)
        h = after_attention(h, attended, layer, shape, _matvec)
    h = rms_norm(h, final_norm, shape.eps)
    logits = penalise(_matvec(head, h[0]).float(), seen, penalty)  # bf16-rounded like the reference
    return logits, logits.argmax(), torch.stack(new_keys), torch.stack(new_values), h


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
@dataclasses.dataclass
class DecodeStats:
    """What one sequence's decoding read: compiled steps, the rows of the output matrix each step
    scored, and whole-vocabulary checks (each one pass over the output matrix)."""
    tokens: int = 0
    steps: int = 0
    head_rows: int = 0
    checks: int = 0
    rejected: int = 0  # drafts a check replaced (their steps' work is wasted)


class FastDecoder:
    """Greedy or sampled decoding of one sequence with the compiled token step.

    Greedy decoding with a `shortlist` drafts up to DRAFT_TOKENS tokens scoring only the shortlist's
    rows of the 262k-row output matrix (62% of the model's bytes), then checks all of them against
    the whole vocabulary in one pass over the matrix (`VocabularyCheck`: one product for all the
    drafts' hidden states) and keeps the drafts up to the first one the check disagrees with,
    replaced by the checked token. The output is therefore the whole-vocabulary greedy output, token for token:
    a token outside the shortlist costs a redrafted round, never a different answer. Sampling
    scores every row at every step.

    `weights_for(adapter)` builds (once per adapter) the weights; every adapter shares one step
    (and, for the torch step, one compiled graph: the weights and the output rows are graph
    inputs, not constants). `native=False` keeps the torch step (compiled, or eager with
    `compile=False`); `kernel` tells which one runs."""

    def __init__(self, text_model, max_positions: int = 4096, compile: bool = True,
                 shortlist: Shortlist | None = None, native: bool = True):
        self.shape = DecoderShape.from_config(text_model.config)
        self.text_model = text_model
        self.max_positions = max_positions
        self.shortlist = shortlist
        self.lora_layout = LoraLayout.of(text_model)
        self.cos, self.sin = rope_tables(self.shape, max_positions, text_model.embed_tokens.weight.dtype)
        self._weights: dict[str | None, DecoderWeights] = {}
        self._weights_lock = threading.Lock()
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache_lock = threading.Lock()  # one sequence at a time owns the cache
        self.last_stats = DecodeStats()
        self.native = self._native_step() if native else None
        # The output matrix is the tied embedding, which no adapter changes: one check serves all.
        self.check = VocabularyCheck(text_model.embed_tokens.weight.detach(),
                                     products=self.native.products if self.native else None,
                                     screen=self.native if self.native and self._screen_pays() else None)
        step = self._eager_step
        self._step = torch.compile(step, dynamic=None, options=COMPILE_OPTIONS) if compile and not self.native else step
        self.kernel = "native" if self.native else "compiled" if compile else "eager"

    def _native_step(self) -> NativeStep | None:
        """The C++ token step (assistant.fast_native), or None with the reason logged: the
        compiled torch step then runs instead."""
        try:
            return NativeStep(self.shape, self.lora_layout, self.cos, self.sin)
        except NativeUnavailable as err:
            log.info("native decoding step off, using the compiled torch step: %s", err)
            return None

    def _screen_pays(self) -> bool:
        """Whether the check gets the int8 screen (assistant.fast_screen): where greedy drafts are
        checked (a shortlist) and the width suits the kernel. It pays on AVX512-BF16 as on AVX2
        (benchmarks/native_step.py on a Xeon: the check 53.6 -> 24.9 ms). It holds an int8 copy of
        the output matrix (172 MB with its per-row numbers for Gemma 3 270M)."""
        from .fast_screen import WIDTH_MULTIPLE

        return self.shortlist is not None and self.shape.hidden % WIDTH_MULTIPLE == 0

    def _eager_step(self, weights, head, token, position, keys, values, cos, sin, seen, penalty):
        return decode_step(self.shape, self.lora_layout, weights, head, token, position, keys, values, cos, sin,
                           seen, penalty)

    def weights_for(self, adapter: str | None) -> DecoderWeights:
        with self._weights_lock:
            if adapter not in self._weights:
                with torch.no_grad():
                    self._weights[adapter] = decoder_weights(self.text_model, adapter, self.lora_layout)
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

    def prefill(self, weights: DecoderWeights, embeds: torch.Tensor) -> torch.Tensor:
        """Run the prompt's input embeddings (T, hidden) through the model (assistant.fast_prefill),
        store every position's keys and values, and return the last position's logits (vocab,) in
        the model dtype."""
        hidden, new_keys, new_values = prefill(self.shape, self.lora_layout, weights.tensors(), embeds, self.cos,
                                               self.sin)
        keys, values = self.cache()
        length = embeds.shape[0]
        keys[:, :, :length] = new_keys
        values[:, :, :length] = new_values
        return torch.nn.functional.linear(hidden, weights.embed)[0]

    def warm_up(self, adapter: str | None) -> None:
        """Run the token step once on a throwaway token, with the shortlist's rows when there is one
        (the rows greedy decoding scores): this compiles the torch step (one graph for every span
        and every number of output rows); the native step has nothing to compile."""
        with self._cache_lock, torch.inference_mode():
            weights = self.weights_for(adapter)
            head = rows_of(weights.embed, self.shortlist.ids) if self.shortlist is not None else weights.embed
            seen = torch.zeros(head.shape[0], dtype=torch.bool)
            self._advance(weights, head, torch.tensor(0), 1, seen, 1.0)

    def fits(self, prompt_length: int, max_new_tokens: int) -> bool:
        return prompt_length + max_new_tokens <= self.max_positions

    def decode(self, adapter: str | None, embeds: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int,
               penalty: float = 1.0, temperature: float = 0.0, eos_ids: tuple[int, ...] = (),
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield new token ids for the prompt `prompt_ids` (T,) whose input embeddings are `embeds`
        (T, hidden; text scaled, image tokens spliced in): the first from the prefill's last logits,
        then from compiled steps. Stops after an EOS id (not yielded) or `max_new_tokens`.
        `last_stats` tells what it read."""
        length = prompt_ids.numel()
        if not self.fits(length, max_new_tokens):
            raise ValueError(f"prompt of {length} tokens + {max_new_tokens} new exceeds {self.max_positions} positions")
        weights = self.weights_for(adapter)
        with self._cache_lock:
            self.last_stats = DecodeStats()
            with torch.inference_mode():
                first_logits = self.prefill(weights, embeds)
                seen = torch.zeros(self.shape.vocab, dtype=torch.bool)
                seen[prompt_ids.flatten()] = True
                logits = penalise(first_logits.float(), seen, penalty)  # the model dtype's values, like generate
                token = _choose(logits, logits.argmax(), temperature, generator)
            if temperature <= 0 and self.shortlist is not None:
                tokens = self._checked_drafts(weights, token, length, seen, penalty, max_new_tokens, eos_ids, prompt_ids)
            else:
                tokens = self._every_row(weights, token, length, seen, penalty, temperature, generator)
            for produced, token in enumerate(tokens, start=1):
                if int(token) in eos_ids:
                    return
                self.last_stats.tokens = produced
                yield int(token)
                if produced == max_new_tokens:
                    return

    def _every_row(self, weights, token, position, seen, penalty, temperature, generator) -> Iterator[torch.Tensor]:
        """The token, then one step per token scoring the whole vocabulary (endless: `decode` stops it)."""
        while True:
            yield token
            with torch.inference_mode():  # per step, never across a yield (the mode is thread state)
                seen[token] = True
                logits, greedy, _ = self._advance(weights, weights.embed, token, position, seen, penalty)
                token = _choose(logits, greedy, temperature, generator)
            position += 1
            self.last_stats.steps += 1
            self.last_stats.head_rows += self.shape.vocab

    def _checked_drafts(self, weights, token, position, seen, penalty, max_new_tokens, eos_ids,
                        prompt_ids) -> Iterator[torch.Tensor]:
        """The token, then rounds of drafted-and-checked greedy tokens (see the class docstring)."""
        rows = self.shortlist.for_prompt(prompt_ids)
        head = rows_of(weights.embed, rows)
        ready, produced = [token], 0
        while ready:
            token = ready.pop(0)
            yield token
            produced += 1
            if not ready and produced < max_new_tokens and int(token) not in eos_ids:
                with torch.inference_mode():
                    ready = self._round(weights, head, rows, token, position, seen, penalty,
                                        min(DRAFT_TOKENS, max_new_tokens - produced), eos_ids)
                position += len(ready)  # the steps kept fed the token and all but the last checked one

    def _round(self, weights, head, rows, token, position, seen, penalty, steps, eos_ids) -> list[torch.Tensor]:
        """Draft up to `steps` tokens from `token` at `position` over the shortlist rows, check them in
        one pass over the whole output matrix, and return the checked tokens: the drafts up to the
        first wrong one, then the right token in its place. `seen` ends holding the kept steps' tokens."""
        fed, drafts, hidden = token, [], []
        seen[token] = True
        before = seen.clone()  # the penalty's tokens at the round's first step
        for offset in range(steps):
            seen[fed] = True
            _, best, h = self._advance(weights, head, fed, position + offset, seen[rows], penalty)
            fed = rows[best]
            drafts.append(fed)
            hidden.append(h)
            if int(fed) in eos_ids:
                break
        fed_ids = torch.stack([token, *drafts[:-1]])  # the token each step was fed
        earlier = before.nonzero().flatten()
        penalised = [torch.cat([earlier, fed_ids[1: state + 1]]) for state in range(len(drafts))]
        drafted = torch.stack(drafts)
        checked = self.check.greedy(torch.cat(hidden), penalised, penalty, candidates=drafted)
        wrong = (checked != drafted).nonzero()
        kept = int(wrong[0]) + 1 if len(wrong) else len(drafts)
        seen.copy_(before)
        seen[fed_ids[:kept]] = True  # the kept steps' tokens; the next round feeds the last checked one
        stats = self.last_stats
        stats.steps, stats.head_rows = stats.steps + len(drafts), stats.head_rows + len(drafts) * rows.numel()
        stats.checks, stats.rejected = stats.checks + 1, stats.rejected + len(drafts) - kept
        return list(checked[:kept])

    def _advance(self, weights: DecoderWeights, head, token, position: int, seen, penalty: float):
        """Run the step for `token` at `position`, scoring the rows of `head`, and store its keys and
        values: (logits, greedy row, final hidden state)."""
        keys, values = self.cache()
        if self.native is not None:
            return self.native.step(weights, head, int(token), position, keys, values, seen, penalty)
        span = min(self.max_positions, max(1, -(-position // CACHE_BLOCK)) * CACHE_BLOCK)
        past_keys, past_values = keys[:, :, :span], values[:, :, :span]
        # A fresh view: marking `head` itself would mark the embedding when it is the whole matrix
        # (also weights[0], compiled unmarked), and the next call would recompile.
        head = head.view(head.shape)
        for tensor, dim in ((past_keys, 2), (past_values, 2), (head, 0), (seen, 0)):
            torch._dynamo.mark_dynamic(tensor, dim)  # one graph for every span and row count
        logits, greedy, new_keys, new_values, hidden = self._step(
            weights.tensors(), head, token.view(1), torch.tensor([position]), past_keys, past_values, self.cos, self.sin,
            seen, torch.tensor(float(penalty)))  # a tensor: no recompile per value
        keys[:, :, position] = new_keys
        values[:, :, position] = new_values
        return logits, greedy, hidden


def _choose(logits: torch.Tensor, greedy: torch.Tensor, temperature: float,
            generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return greedy
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
