"""Greedy drafting over a vocabulary shortlist, checked against the whole vocabulary.

Gemma 3's tied output matrix has 262,144 rows, 62% of the bytes a decoding step reads; clinical
English uses a small part of them (adapters/vocab-shortlist). The fast decoder's steps score only
the `Shortlist` rows, and a `VocabularyCheck` then scores the drafts' hidden states against every
row in one pass over the matrix, so the text that comes out is the whole-vocabulary greedy text.
"""

from __future__ import annotations

import torch

from .fast_math import with_penalty

# Greedy tokens drafted over the shortlist between two whole-vocabulary checks. More drafts per
# check cost less per token (the check's pass over the matrix is shared) but arrive in longer
# bursts and lose more work when a draft is replaced (rare: the shortlist covers 99.7% of the
# held-out target tokens).
DRAFT_TOKENS = 16
# Rows of the output matrix converted to fp32 at a time: 2048 x 640 x 4 bytes stays in cache.
CHUNK_ROWS = 2048


class Shortlist:
    """The output rows greedy drafting scores: the token ids our domain's text uses
    (adapters/vocab-shortlist) plus each prompt's own tokens (the model copies names and numbers
    from its prompt). Sorted, so a tie between rows goes to the lower id, as over the whole vocabulary."""

    def __init__(self, ids: torch.Tensor):
        self.ids = torch.unique(ids.to(torch.long))

    def for_prompt(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return torch.unique(torch.cat([self.ids, prompt_ids.flatten().to(torch.long)]))


def rows_of(embed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The output matrix's `rows` as an ordinary tensor, like the whole matrix: an inference-mode
    tensor has other dispatch keys, and the compiled step would recompile for it (a minute)."""
    with torch.inference_mode(False), torch.no_grad():
        return embed.index_select(0, rows)


class VocabularyCheck:
    """Greedy tokens of up to `slots` final hidden states over every row of the output matrix.

    The matrix is read once per check, in chunks of CHUNK_ROWS rows converted to fp32 and
    multiplied by all the hidden states at once (one fp32 GEMM per chunk), and each chunk's logits
    are rounded to the matrix's dtype while they are in cache, as transformers' lm_head rounds
    them. Each product of two bf16 values is exact in fp32 and each sum runs in fp32; only the
    order of the sums differs from lm_head's.

    Why not one bf16 matrix product: on CPUs without native bf16 arithmetic (AVX2) torch's bf16
    GEMM is compute-bound, 16 states over the 262k rows took 370 ms on our 2 cores against about
    95 ms here. The states are always padded to `slots` columns: the GEMM of 8 columns took as long
    as that of 16 (zero columns cost nothing else). The result stays in (rows, states) layout,
    the GEMM's own: transposing 16 MB took another 20 ms.

    With `products` (the native step's kernel, assistant.fast_native) each bf16 row is widened
    once in registers for all the real states, no padding and no fp32 copy: about 50-65 ms for 16
    states on 2 cores, the same rounded values; 25-54 ms where AVX512-BF16 multiplies the bf16 pairs
    in hardware (a Zen 4 EPYC, a Xeon). With `screen` as well (the NativeStep) `greedy` first bounds every row in
    int8 (assistant.fast_screen) and checks exactly only the rows that could win: the same tokens."""

    def __init__(self, embed: torch.Tensor, slots: int = DRAFT_TOKENS, chunk_rows: int = CHUNK_ROWS,
                 products=None, screen=None):
        self.embed, self.slots, self.chunk_rows = embed, slots, chunk_rows
        self.native_products = products  # NativeStep.products: the fused bf16 kernel, when built
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # NativeStep: greedy() screens the rows in int8 first (assistant.fast_screen), same tokens.
        self.screen = None
        if screen is not None and products is not None:
            from .fast_screen import Int8Screen

            self.screen = Int8Screen(embed, screen, self.rows_logits)

    def rows_logits(self, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(len(rows), n) logits of the output `rows` only, each the value the full check gives it."""
        matrix = self.embed.index_select(0, rows)
        return self.native_products(matrix, hidden.float(), torch.empty(rows.numel(), hidden.shape[0]))

    def greedy(self, hidden: torch.Tensor, penalised: list[torch.Tensor], penalty: float,
               candidates: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy token of each state in `hidden` (n, width): the first row of the highest
        logit after transformers' repetition penalty on the token ids `penalised[j]` (state j's
        tokens so far; divided when positive, multiplied when negative). `candidates` (the drafts,
        one row per state) only speed up the screen: the result does not depend on them."""
        if self.screen is not None:
            tokens = self.screen.greedy(hidden, penalised, penalty, candidates)
            if tokens is not None:
                return tokens
        logits = self._products(hidden)  # (vocab, n)
        if penalty != 1.0:
            for state, ids in enumerate(penalised):
                logits[ids, state] = with_penalty(logits[ids, state], penalty)
        return logits.max(0).indices

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, vocab) fp32 logits, with values of the matrix's dtype, for `hidden` (n, width)."""
        return self._products(hidden).t().clone()

    def _products(self, hidden: torch.Tensor) -> torch.Tensor:
        """(vocab, n) view of the output buffer holding the rounded logits (valid until the next check)."""
        count = hidden.shape[0]
        if not 0 < count <= self.slots:
            raise ValueError(f"a check takes 1 to {self.slots} hidden states, not {count}")
        chunk, states, out = self._buffers_for(hidden.shape[1])
        if self.native_products is not None:  # only the real states, each bf16 row widened once for all
            products = out.view(-1)[: self.embed.shape[0] * count].view(self.embed.shape[0], count)
            return self.native_products(self.embed, hidden.float(), products)
        states.zero_()
        states[:, :count] = hidden.t()
        vocab = self.embed.shape[0]
        for start in range(0, vocab, self.chunk_rows):
            stop = min(start + self.chunk_rows, vocab)
            rows, products = chunk[: stop - start], out[start:stop]
            rows.copy_(self.embed[start:stop])
            torch.mm(rows, states, out=products)
            products.copy_(products.to(self.embed.dtype))
        return out[:, :count]

    def _buffers_for(self, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chunk, states and output buffers (allocated at the first check, then reused: one
        sequence at a time checks, under the decoder's cache lock)."""
        if self._buffers is None:
            rows = min(self.chunk_rows, self.embed.shape[0])
            with torch.inference_mode(False):  # ordinary tensors: writable in and out of inference mode
                self._buffers = (torch.empty(rows, width), torch.empty(width, self.slots),
                                 torch.empty(self.embed.shape[0], self.slots))
        return self._buffers
