"""The whole-vocabulary check: chunked fp32 products give lm_head's bf16 logits and the greedy token
after the repetition penalty, for any number of states up to its slots and any chunking of the rows.

Integer-valued matrices make every fp32 sum exact whatever its order, so the check must equal the
dense reference exactly, ties (many, after bf16 rounding) included."""

import pytest
import torch

from assistant.fast_check import Shortlist, VocabularyCheck, rows_of
from assistant.fast_math import penalise as _penalise


def integers(*shape: int, seed: int, high: int = 6) -> torch.Tensor:
    return torch.randint(-high, high + 1, shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def reference_logits(hidden: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(hidden.float(), embed.float()).to(torch.bfloat16).float()


@pytest.mark.parametrize("chunk_rows", [7, 256, 4096])
@pytest.mark.parametrize("count", [1, 5, 16])
def test_logits_are_lm_heads_bf16_logits(chunk_rows, count):
    embed, hidden = integers(1000, 64, seed=0), integers(count, 64, seed=count)
    logits = VocabularyCheck(embed, slots=16, chunk_rows=chunk_rows).logits(hidden)
    assert logits.dtype == torch.float32 and torch.equal(logits, reference_logits(hidden, embed))


@pytest.mark.parametrize("penalty", [1.0, 1.1, 3.0])
@pytest.mark.parametrize("chunk_rows", [7, 300])
def test_greedy_tokens_equal_the_dense_penalised_argmax_ties_included(penalty, chunk_rows):
    embed, hidden = integers(1000, 64, seed=1, high=20), integers(12, 64, seed=2)
    generator = torch.Generator().manual_seed(3)
    penalised = [torch.randint(0, 1000, (state * 20,), generator=generator) for state in range(12)]
    seen = torch.zeros(12, 1000, dtype=torch.bool)
    for state, ids in enumerate(penalised):
        seen[state, ids] = True
    logits = _penalise(reference_logits(hidden, embed), seen, torch.tensor(penalty))
    top = logits.max(-1, keepdim=True).values
    assert ((logits == top).sum(-1) > 1).any()  # ties exist: the first row must win
    got = VocabularyCheck(embed, slots=16, chunk_rows=chunk_rows).greedy(hidden, penalised, penalty)
    assert torch.equal(got, logits.argmax(-1))


def test_buffers_are_reused_and_earlier_states_do_not_leak_into_a_smaller_check():
    embed = integers(1000, 64, seed=4)
    check = VocabularyCheck(embed, slots=8, chunk_rows=300)
    big = integers(8, 64, seed=5)
    with torch.inference_mode():  # buffers made in inference mode stay usable outside it
        check.logits(big)
    buffers = [b.data_ptr() for b in check._buffers]
    assert torch.equal(check.logits(big[:2]), reference_logits(big[:2], embed))
    assert [b.data_ptr() for b in check._buffers] == buffers


def test_a_check_refuses_more_states_than_its_slots():
    check = VocabularyCheck(integers(10, 64, seed=0), slots=4)
    with pytest.raises(ValueError, match="1 to 4 hidden states, not 5"):
        check.logits(torch.zeros(5, 64, dtype=torch.bfloat16))


def test_the_shortlist_adds_the_prompt_tokens_sorted_and_rows_are_ordinary_tensors():
    shortlist = Shortlist(torch.tensor([9, 3, 3, 7], dtype=torch.int32))
    assert shortlist.ids.tolist() == [3, 7, 9]
    assert shortlist.for_prompt(torch.tensor([[8, 3, 1]])).tolist() == [1, 3, 7, 8, 9]
    embed = integers(12, 64, seed=0)
    with torch.inference_mode():
        rows = rows_of(embed, torch.tensor([1, 5]))
    assert not rows.is_inference() and torch.equal(rows, embed[[1, 5]])
