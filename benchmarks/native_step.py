"""Native-step benchmark: the C++ step's product paths on the real Gemma 3 270M, in the same run:
AVX2 (rows widened to fp32), AVX2 with the check's int8 screen (assistant.fast_screen, the
default), and where the CPU has it AVX512-BF16 (bf16 pairs multiplied in hardware), with and
without the screen (with it: the default there; the screen then sums with AVX512-VNNI, or, where
the CPU has AMX, in AMX tiles: both are measured, recorded per path as `screen_sums`).

Measures, for each path:
  check_ms        one whole-vocabulary check (greedy tokens of up to 16 drafted states) on the
                  rounds a decode of the prompt really checked, best and median over the rounds x
                  `--repeats`
  served_tok_s    greedy decoding as served (shortlist drafts checked against every row), the base
                  model without LoRA on a fixed text prompt, 64 new tokens, median of `--runs`
The paths alternate run by run, so a neighbour on a shared host slows all alike; the load
average is recorded. Greedy tokens of the paths are compared (the AVX512-BF16 fp32 sums run in
another order, so a near-tie may flip one; the screen changes no token).

    .venv/bin/python benchmarks/native_step.py [--runs 3] [--repeats 3]

Writes benchmarks/results/native-step.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from assistant import fast_native  # noqa: E402
from benchmarks.generation import differs_at, environment  # noqa: E402

SCREEN = " + int8 screen"
SCREENED = "AVX2" + SCREEN
AMX = " + AMX"  # the screen's sums in AMX tiles (without it, AVX512-VNNI)
PROMPT = "FINDINGS: The heart size is normal. The lungs are"
NEW_TOKENS = 64


def load_decoder():
    """The default base LLM (bf16) and a FastDecoder over it with the shipped vocabulary shortlist."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    from assistant.base_models import resolve_llm_dir
    from assistant.config import AssistantConfig
    from assistant.fast_check import Shortlist
    from assistant.fast_decode import FastDecoder
    from assistant.model import repo_path
    from assistant.vocab_shortlist import load

    folder = resolve_llm_dir(AssistantConfig().llm.path)
    model = Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    text = model.model
    shortlist = Shortlist(load(repo_path(AssistantConfig().generation.shortlist), text.config.vocab_size))
    decoder = FastDecoder(text, max_positions=512, shortlist=shortlist)
    if decoder.kernel != "native":
        raise SystemExit("the native step is not available here (see the log): nothing to compare")
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids[0]
    with torch.inference_mode():
        embeds = text.embed_tokens(ids[None])[0]  # Gemma 3's embedding applies its own scale
    return decoder, ids, embeds


def decode_rate(decoder, ids, embeds) -> tuple[float, list[int]]:
    """Tokens/s after the first (which comes from the prefill), and the tokens."""
    tokens, first = [], None
    for token in decoder.decode(None, embeds, ids, NEW_TOKENS + 1, penalty=1.1):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(token))
    return (len(tokens) - 1) / (time.perf_counter() - first), tokens


def checked_rounds(decoder, ids, embeds) -> list[tuple]:
    """The (hidden states, penalised ids, penalty, drafts) of each check a decode of the prompt runs."""
    rounds, greedy = [], decoder.check.greedy

    def recording(hidden, penalised, penalty, candidates=None):
        rounds.append((hidden.clone(), [p.clone() for p in penalised], penalty, candidates))
        return greedy(hidden, penalised, penalty, candidates)

    decoder.check.greedy = recording
    try:
        decode_rate(decoder, ids, embeds)
    finally:
        del decoder.check.greedy
    return rounds


def check_seconds(decoder, rounds, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        for hidden, penalised, penalty, candidates in rounds:
            start = time.perf_counter()
            decoder.check.greedy(hidden, penalised, penalty, candidates)
            seconds.append(time.perf_counter() - start)
    return seconds


def use_path(decoder, path: str, screen) -> None:
    fast_native.allow_avx512_bf16(path.startswith("AVX512-BF16"))
    fast_native.allow_amx(path.endswith(AMX))
    decoder.check.screen = screen if SCREEN in path else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "native-step.json"))
    args = parser.parse_args(argv)
    before = os.getloadavg()
    decoder, ids, embeds = load_decoder()
    from assistant.fast_screen import Int8Screen

    screen = decoder.check.screen or Int8Screen(decoder.check.embed, decoder.native, decoder.check.rows_logits)
    bf16_paths = ["AVX512-BF16", "AVX512-BF16" + SCREEN] if fast_native.check_instructions() == "AVX512-BF16" else []
    if fast_native.screen_instructions() == "AMX-INT8":
        bf16_paths.append("AVX512-BF16" + SCREEN + AMX)
    paths = ["AVX2", SCREENED] + bf16_paths
    rates, checks, tokens, sums = {p: [] for p in paths}, {p: [] for p in paths}, {}, {}
    try:
        use_path(decoder, "AVX2", screen)
        rounds = checked_rounds(decoder, ids, embeds)
        for path in paths:  # warm-up: caches, allocator, the first-token path
            use_path(decoder, path, screen)
            sums[path] = fast_native.screen_instructions() if SCREEN in path else None
            decode_rate(decoder, ids, embeds)
        for _ in range(args.runs):
            for path in paths:
                use_path(decoder, path, screen)
                rate, tokens[path] = decode_rate(decoder, ids, embeds)
                rates[path].append(rate)
                checks[path] += check_seconds(decoder, rounds, args.repeats)
    finally:
        fast_native.allow_avx512_bf16(True)
        fast_native.allow_amx(True)
    left = []  # how many of the 262,144 rows each round's screen left to the exact check
    for hidden, penalised, penalty, candidates in rounds:
        screen.greedy(hidden, penalised, penalty, candidates)
        left.append(screen.last_rows_left)
    rows = [{"path": p, "screen_sums": sums[p], "served_tok_s_all": rates[p], "served_tok_s_median": statistics.median(rates[p]),
             "check_ms_best": 1e3 * min(checks[p]), "check_ms_median": 1e3 * statistics.median(checks[p])}
            for p in paths]
    # Where the instruction sets' greedy tokens part (a near-tie summed in another order); None: they
    # agree. The screen must change no token of the products it screens for.
    first = differs_at(tokens["AVX2"], tokens[bf16_paths[0] if bf16_paths else "AVX2"])
    screen_first = next((at for path in paths if SCREEN in path
                         if (at := differs_at(tokens[path.split(SCREEN)[0]], tokens[path])) is not None), None)
    result = {"benchmark": "native_step", "rows": rows, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
              "tokens_equal": first is None, "first_difference_at": first,
              "screen_tokens_equal": screen_first is None, "checked_rounds": len(rounds),
              "checked_states": [int(round_[0].shape[0]) for round_ in rounds], "screen_rows_left": left,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/native_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(), "loadavg_before": list(before), "loadavg_after": list(os.getloadavg())}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['path']}: served {row['served_tok_s_median']:.1f} tok/s, check {row['check_ms_median']:.1f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
