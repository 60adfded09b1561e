"""The int8 screen of the whole-vocabulary check: its bounds hold for every row, and the greedy
tokens it gives are the full check's, penalties and ties included; where it cannot decide cheaply
it says so and the full check runs."""

import pytest
import torch

import assistant.fast_native as fast_native
import assistant.fast_screen as fast_screen
from assistant.fast_check import VocabularyCheck
from assistant.fast_native import NativeStep, NativeUnavailable
from assistant.fast_screen import ScreenedRows, ScreenedStates

try:
    fast_native.library()
except NativeUnavailable as err:  # a CPU without AVX2 or a machine without a compiler
    pytest.skip(f"native step unavailable here: {err}", allow_module_level=True)


def kernels() -> NativeStep:
    step = NativeStep.__new__(NativeStep)  # the kernels only, no model
    step.lib = fast_native.library()
    return step


PATHS = ["AVX2", "AVX512-VNNI", "AMX-INT8"]  # the screen's integer paths, widest last


def use_screen(path: str) -> None:
    """Make `path` the screen's widest allowed path, or skip where this CPU lacks it."""
    fast_native.allow_avx512_bf16(True)
    fast_native.allow_amx(True)
    if PATHS.index(fast_native.screen_instructions()) < PATHS.index(path):
        pytest.skip(f"this CPU (or its kernel) gives the screen no {path}")
    fast_native.allow_avx512_bf16(path != "AVX2")
    fast_native.allow_amx(path == "AMX-INT8")
    assert fast_native.screen_instructions() == path


@pytest.fixture(params=PATHS)
def native(request):
    """The kernels, with each of the screen's integer paths this CPU has: vpmaddubsw with AVX2,
    vpdpbusd with AVX512-VNNI, tile products with AMX (the widest present is the default)."""
    use_screen(request.param)
    yield kernels()
    fast_native.allow_avx512_bf16(True)
    fast_native.allow_amx(True)


def bf16(*shape, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)


def hidden_states(count, width, seed=0):
    """bf16 states with a few large dimensions, as Gemma's final hidden states have."""
    states = bf16(count, width, scale=3.0, seed=seed).float()
    states[:, :3] *= 20
    return states.to(torch.bfloat16)


def checks(native, matrix):
    return (VocabularyCheck(matrix, products=native.products),
            VocabularyCheck(matrix, products=native.products, screen=native))


def test_every_rows_bound_is_at_least_its_check_logit(native):
    matrix = bf16(1003, 96, seed=1)  # rows not a multiple of the kernel's blocks
    matrix[7] = 0  # a zero row, and a state of zeros below: scale 1, bound 0 + margin
    states = torch.cat([hidden_states(6, 96, seed=2), torch.zeros(1, 96, dtype=torch.bfloat16)])
    full, screened = checks(native, matrix)
    bounds = native.screen_bounds(screened.screen.rows, ScreenedStates.of(states), torch.empty(7, 1003))
    exact = full.logits(states)  # (states, rows)
    assert bool((bounds >= exact).all())


def test_bounds_hold_where_the_codes_are_exact_and_the_sums_cancel(native):
    # Integer rows and states: no quantisation error, so only the margin for the exact check's
    # roundings keeps the bound above the logit of a sum whose terms cancel.
    generator = torch.Generator().manual_seed(11)
    matrix = torch.randint(-127, 128, (500, 640), generator=generator).to(torch.bfloat16)
    states = torch.randint(-63, 64, (5, 640), generator=generator).float()
    states[:, 0] = 63  # the state scale is exactly 1
    matrix[:, 0] = 127
    full, screened = checks(native, matrix)
    bounds = native.screen_bounds(screened.screen.rows, ScreenedStates.of(states), torch.empty(5, 500))
    assert float(screened.screen.rows.error.max()) == 0.0
    assert bool((bounds >= full.logits(states)).all())


def bounds_with(path: str, rows, states, count: int) -> torch.Tensor:
    use_screen(path)
    try:
        return kernels().screen_bounds(rows, states, torch.empty(len(states.scale), count))
    finally:
        fast_native.allow_avx512_bf16(True)
        fast_native.allow_amx(True)


# 640 codes: the model's width (AMX takes it); 96: a last block of 32 codes for the 64-wide loads
# (AMX cannot, the VNNI screen runs). 1003 rows: 64-row AMX blocks, then a VNNI tail.
@pytest.mark.parametrize("width, states", [(640, 13), (640, 16), (96, 13)])
@pytest.mark.parametrize("path", ["AVX512-VNNI", "AMX-INT8"])
def test_the_wider_screens_give_the_avx2_screens_bounds_bit_for_bit(path, width, states):
    matrix, hidden = bf16(1003, width, seed=5), ScreenedStates.of(hidden_states(states, width, seed=6))
    rows = ScreenedRows.of(matrix)
    wide = bounds_with(path, rows, hidden, 1003)
    assert torch.equal(wide, bounds_with("AVX2", rows, hidden, 1003))  # the same exact integer sums, same float arithmetic


def test_the_codes_rebuild_rows_and_states_within_their_errors():
    matrix = bf16(50, 64, seed=3)
    rows = ScreenedRows.of(matrix)
    assert rows.codes.dtype == torch.int8 and int(rows.codes.abs().max()) <= 127
    assert torch.equal(rows.sums, rows.codes.sum(1, dtype=torch.int32))
    rebuilt = rows.scale[:, None] * rows.codes.float()
    torch.testing.assert_close((matrix.float() - rebuilt).norm(dim=1), rows.error)
    states = ScreenedStates.of(hidden_states(4, 64))
    assert int(states.codes.min()) >= 1 and int(states.codes.max()) <= 127  # code + 64, codes within +-63


def test_the_rows_left_are_those_whose_bound_reaches_a_floor(native):
    matrix = bf16(1003, 96, seed=12)
    screened = ScreenedStates.of(hidden_states(6, 96, seed=13))
    rows = ScreenedRows.of(matrix)
    bounds = native.screen_bounds(rows, screened, torch.empty(6, 1003))
    floors = bounds.quantile(0.97, dim=1)  # about 3% of each state's rows reach it
    left = native.screen_rows_left(rows, screened, floors, torch.full((1003,), 7, dtype=torch.uint8))
    assert torch.equal(left.bool(), (bounds >= floors[:, None]).any(0))
    assert int(left.max()) == 1  # every byte written: no 7 left over


@pytest.mark.parametrize("candidates", ["none", "best", "random"])
@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_the_screened_greedy_tokens_are_the_full_checks(native, penalty, candidates):
    matrix = bf16(2000, 64, seed=4)
    states = hidden_states(9, 64, seed=5)
    full, screened = checks(native, matrix)
    best = full.logits(states).argmax(1)
    # Each state's best row is penalised in some states, so the penalty moves the answer there.
    penalised = [torch.cat([best[j: j + 1] if j % 2 else best[:0], torch.tensor([3, 3, 1999])]) for j in range(9)]
    # Drafts are the usual candidates; wrong ones must not change the tokens, only the work.
    drafts = {"none": None, "best": best, "random": torch.randint(0, 2000, (9,), generator=torch.Generator().manual_seed(1))}
    tokens = screened.screen.greedy(states, penalised, penalty, drafts[candidates])
    assert tokens is not None and torch.equal(tokens, full.greedy(states, penalised, penalty))
    limit = 2001 if candidates == "random" else 200  # good candidates leave a tenth of the rows or fewer
    assert 0 < screened.screen.last_rows_left < limit


def test_one_checks_penalised_tokens_do_not_carry_into_the_next(native):
    matrix = bf16(2000, 64, seed=4)
    states = hidden_states(9, 64, seed=5)
    full, screened = checks(native, matrix)
    best = full.logits(states).argmax(1)
    every_best = [best.clone() for _ in range(9)]  # each state's best row penalised in the first check
    none = [best[:0] for _ in range(9)]
    for penalised in (every_best, none, every_best[:4]):
        tokens = screened.screen.greedy(states[: len(penalised)], penalised, 1.3, None)
        assert tokens is not None and torch.equal(tokens, full.greedy(states[: len(penalised)], penalised, 1.3))
    assert torch.equal(screened.screen.greedy(states, none, 1.3, None), best)


def test_a_tie_goes_to_the_lowest_row_as_in_the_full_check(native):
    matrix = bf16(600, 64, seed=6)
    states = hidden_states(3, 64, seed=7)
    full, _ = checks(native, matrix)
    best = full.logits(states).argmax(1)
    matrix[5] = matrix[best[0]]  # the same logits as state 0's best row, at a lower id
    matrix[590] = matrix[best[1]]  # and at a higher one for state 1
    full, screened = checks(native, matrix)
    nothing = [torch.tensor([], dtype=torch.long)] * 3
    tokens = screened.greedy(states, nothing, 1.0)
    assert torch.equal(tokens, full.greedy(states, nothing, 1.0))
    assert int(tokens[0]) == min(5, int(best[0])) and int(tokens[1]) == int(best[1])
    drafted_higher = torch.tensor([max(5, int(best[0])), 590, int(best[2])])  # drafts on the higher ids of the ties
    assert torch.equal(screened.greedy(states, nothing, 1.0, candidates=drafted_higher), tokens)


def test_the_full_check_runs_where_the_screen_leaves_too_many_rows(native, monkeypatch):
    matrix = bf16(800, 64, seed=8)
    states = hidden_states(4, 64, seed=9)
    full, screened = checks(native, matrix)
    monkeypatch.setattr(fast_screen, "MAX_SCREENED_ROWS", 0)
    nothing = [torch.tensor([], dtype=torch.long)] * 4
    assert screened.screen.greedy(states, nothing, 1.0) is None
    assert torch.equal(screened.greedy(states, nothing, 1.0), full.greedy(states, nothing, 1.0))
    broken = states.float()
    broken[1, 2] = float("nan")
    assert screened.screen.greedy(broken, nothing, 1.0) is None  # no bound holds for NaN: the full check decides


def test_a_width_the_kernel_cannot_read_is_refused(native):
    with pytest.raises(ValueError, match="multiple of 32"):
        fast_screen.Int8Screen(bf16(10, 48), native, None)
