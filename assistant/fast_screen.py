"""An int8 screen in front of the whole-vocabulary check (assistant.fast_check): the same greedy
tokens, a third to a half of the work.

Why: the check's 16 states x 262,144 rows x 640 products are compute-bound on 2 cores: 55-80 ms
where AVX2 widens the bf16 rows to fp32 (over a third of served decoding's time), still 54 ms on a
Xeon where AVX512-BF16 multiplies the pairs in hardware (benchmarks/native_step.py). Here every
row and state is also held as int8 codes, and the native kernel's exact integer sums bound each
row's logit from above: value = scale x code + error, so

    w.h = s_w s_h (q_w . q_h) + s_h (e_w . q_h) + w . e_h
        <= approximation + |e_w| s_h |q_h| + |w| |e_h|        (Cauchy-Schwarz, exact norms)

plus the exact check's own rounding (its fp32 sum, within width x 2^-23 x |w| |h| of the real dot
product; its bf16 rounding, relative 2^-8) and that of the bound's float arithmetic (the kernel's
margin, relative 2^-7 plus 0.01). A row whose bound stays below the exact logit of one row
already checked (the state's drafted token, usually its greedy one) cannot be the greedy token;
the kernel compares as it goes and returns a byte per row, and the rows left (2,000-8,000 of
262,144 for a round of 16 real states) get the exact bf16 check, whose value for a row does not
depend on which other rows are computed with it. So the greedy token is the full check's, ties
included (the lowest id among equal maxima), and the tests compare the two.

States are 7-bit codes (-63..63, stored + 64 for the unsigned operand of vpmaddubsw, so a pair
of products cannot saturate); rows 8-bit with a scale per row. The kernel sums them with the
widest integer products the CPU has (AVX2, AVX512-VNNI, AMX tiles: fast_native.screen_instructions),
the same exact integers on each, so the same bounds. The int8 copy of the output matrix
costs rows x width bytes of memory (168 MB for Gemma 3's).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from .fast_math import penalise

STATE_LEVELS = 63  # 7-bit state codes: see the module docstring
ROW_LEVELS = 127
QUANTISE_CHUNK = 4096  # rows converted at a time (an fp32 copy of the whole matrix is 671 MB)
# Above this many rows left by the screen the full check is cheaper than gathering them.
MAX_SCREENED_ROWS = 32768
WIDTH_MULTIPLE = 32  # the kernel reads 32 codes per instruction


def _quantise(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale per row, integer codes in -levels..levels as floats): values = scale x codes + error;
    an all-zero row gets scale 1."""
    scale = values.abs().amax(1) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(values / scale[:, None]).clamp_(-levels, levels)


@dataclasses.dataclass(frozen=True)
class ScreenedRows:
    """The output matrix as int8 codes and the per-row numbers the bounds need."""
    codes: torch.Tensor  # (rows, width) int8
    sums: torch.Tensor   # (rows,) int32: each row's code sum
    scale: torch.Tensor  # (rows,) fp32
    error: torch.Tensor  # (rows,) fp32: |row - scale x codes|
    norm: torch.Tensor   # (rows,) fp32: |row|

    @classmethod
    def of(cls, matrix: torch.Tensor) -> ScreenedRows:
        """Filled chunk by chunk into preallocated tensors: the peak is the result plus one chunk's
        fp32 temporaries, not a second copy."""
        count, width = matrix.shape
        screened = cls(torch.empty(count, width, dtype=torch.int8), torch.empty(count, dtype=torch.int32),
                       *(torch.empty(count) for _ in range(3)))
        for start in range(0, count, QUANTISE_CHUNK):
            rows = matrix[start:start + QUANTISE_CHUNK].float()
            scale, codes = _quantise(rows, ROW_LEVELS)
            stop = start + rows.shape[0]
            screened.codes[start:stop] = codes
            screened.sums[start:stop] = codes.sum(1)
            screened.scale[start:stop] = scale
            screened.error[start:stop] = (rows - scale[:, None] * codes).norm(dim=1)
            screened.norm[start:stop] = rows.norm(dim=1)
        return screened


@dataclasses.dataclass(frozen=True)
class ScreenedStates:
    """Hidden states as 7-bit codes (+ 64) and the per-state numbers the bounds need."""
    codes: torch.Tensor      # (n, width) uint8
    scale: torch.Tensor      # (n,) fp32
    code_term: torch.Tensor  # (n,) fp32: scale x |codes|
    error: torch.Tensor      # (n,) fp32: |state - scale x codes|, plus the exact sum's rounding share

    @classmethod
    def of(cls, states: torch.Tensor) -> ScreenedStates:
        states = states.float()
        scale, codes = _quantise(states, STATE_LEVELS)
        # |w . e_h| <= |w| |e_h|; the exact check's fp32 sum of `width` products is off the real
        # dot product by at most width x 2^-23 x |w| |h| (any summation order): both go on |w|.
        width = states.shape[1]
        error = (states - scale[:, None] * codes).norm(dim=1) + width * 2.0 ** -23 * states.norm(dim=1)
        return cls((codes + STATE_LEVELS + 1).to(torch.uint8).contiguous(), scale.contiguous(),
                   (scale * codes.norm(dim=1)).contiguous(), error.contiguous())


class Int8Screen:
    """The greedy tokens of the whole-vocabulary check, exactly, from the int8 bounds and the exact
    check (`exact(rows, states)`: the check's logits of the given output rows) of the rows left."""

    def __init__(self, matrix: torch.Tensor, native, exact):
        if matrix.shape[1] % WIDTH_MULTIPLE:
            raise ValueError(f"the int8 screen needs a width that is a multiple of {WIDTH_MULTIPLE}")
        self.rows, self.native, self.exact = ScreenedRows.of(matrix), native, exact
        self._left = torch.empty(matrix.shape[0], dtype=torch.uint8)  # the kernel's verdict per row, reused
        self._marks = torch.zeros(matrix.shape[0], 0, dtype=torch.bool)  # (rows, states): see _marked
        self.last_rows_left = 0

    def greedy(self, hidden: torch.Tensor, penalised: list[torch.Tensor], penalty: float,
               candidates: torch.Tensor | None = None) -> torch.Tensor | None:
        """The check's greedy token per state, or None where the screen leaves too many rows (or the
        states are not finite): then the caller runs the full check. `candidates`: a likely greedy
        row per state (the drafts); without them the best-bounded rows are found first."""
        if not torch.isfinite(hidden).all():
            return None
        with self._marked(penalised if penalty != 1.0 else []) as marks:
            return self._greedy(hidden, ScreenedStates.of(hidden), marks, penalty, candidates)

    def _greedy(self, hidden: torch.Tensor, states: ScreenedStates, marks: torch.Tensor | None, penalty: float,
                candidates: torch.Tensor | None) -> torch.Tensor | None:
        if candidates is None:
            bounds = self.native.screen_bounds(self.rows, states, torch.empty(hidden.shape[0], self._left.numel()))
            candidates = bounds.argmax(1)
        # A candidate's exact (penalised) logit is at most its state's greedy logit: a row bounded
        # below it cannot win. A penalty >= 1 only lowers logits, so the bounds without it still bound
        # them; one below 1 raises the penalised rows, which then all get the exact check.
        floors = self._checked_logits(candidates, hidden, marks, penalty).diagonal()
        if not torch.isfinite(floors).all():
            return None
        left = self.native.screen_rows_left(self.rows, states, floors, self._left)
        if penalty < 1.0:
            left |= marks.any(1)
        left = left.nonzero().flatten()
        self.last_rows_left = left.numel()  # sorted: ties go to the lowest id
        if left.numel() > MAX_SCREENED_ROWS:
            return None
        return left[self._checked_logits(left, hidden, marks, penalty).max(0).indices]

    def _checked_logits(self, rows: torch.Tensor, hidden: torch.Tensor, marks: torch.Tensor | None,
                        penalty: float) -> torch.Tensor:
        """(len(rows), n): the exact check's logits of `rows`, with the penalty where `marks` (rows, n) is set."""
        logits = self.exact(rows, hidden)
        if penalty == 1.0:
            return logits
        return penalise(logits, marks.index_select(0, rows), penalty)

    @contextlib.contextmanager
    def _marked(self, penalised: list[torch.Tensor]) -> Iterator[torch.Tensor | None]:
        """A (rows, n) bool table, True where row r is among state j's ids `penalised[j]`, cleared
        again afterwards (None without ids). Marking a reused table costs two small scatters a
        state; `torch.isin` of the rows left against each state's ids sorted them every time
        (3-4 ms of a 16-state check). One check at a time uses it (under the decoder's lock)."""
        if not penalised:
            yield None
            return
        if self._marks.shape[1] < len(penalised):
            with torch.inference_mode(False):  # an ordinary tensor: marked in and out of inference mode
                self._marks = torch.zeros(self._marks.shape[0], len(penalised), dtype=torch.bool)
        marks = self._marks[:, :len(penalised)]
        for state, ids in enumerate(penalised):
            marks[ids, state] = True
        try:
            yield marks
        finally:
            for state, ids in enumerate(penalised):
                marks[ids, state] = False
