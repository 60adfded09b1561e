"""Native-step benchmark: the C++ step's product paths, AVX2 (rows widened to fp32) against
AVX512-BF16 (bf16 pairs multiplied in hardware), on the real Gemma 3 270M, in the same run.

Measures, for each path the CPU has:
  check_ms        one whole-vocabulary check: 16 bf16-valued states x 262,144 rows x 640
                  (assistant.fast_check with the native products), best and median of `--repeats`
  served_tok_s    greedy decoding as served (shortlist drafts checked against every row), the base
                  model without LoRA on a fixed text prompt, 64 new tokens, median of `--runs`
The paths alternate run by run, so a neighbour on a shared host slows both alike; the load
average is recorded. Greedy tokens of the two paths are compared (their fp32 sums run in another
order, so a near-tie may flip one).

    .venv/bin/python benchmarks/native_step.py [--runs 3] [--repeats 7]

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


def check_seconds(decoder, repeats: int) -> list[float]:
    torch.manual_seed(0)
    states = torch.randn(16, decoder.shape.hidden).to(torch.bfloat16)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoder.check.logits(states)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "native-step.json"))
    args = parser.parse_args(argv)
    before = os.getloadavg()
    decoder, ids, embeds = load_decoder()
    paths = ["AVX2"] + (["AVX512-BF16"] if fast_native.check_instructions() == "AVX512-BF16" else [])
    rates, checks, tokens = {p: [] for p in paths}, {p: [] for p in paths}, {}
    try:
        for path in paths:  # warm-up: caches, allocator, the first-token path
            fast_native.allow_avx512_bf16(path == "AVX512-BF16")
            decode_rate(decoder, ids, embeds)
        for _ in range(args.runs):
            for path in paths:
                fast_native.allow_avx512_bf16(path == "AVX512-BF16")
                rate, tokens[path] = decode_rate(decoder, ids, embeds)
                rates[path].append(rate)
                checks[path] += check_seconds(decoder, args.repeats)
    finally:
        fast_native.allow_avx512_bf16(True)
    rows = [{"path": p, "served_tok_s_all": rates[p], "served_tok_s_median": statistics.median(rates[p]),
             "check_ms_best": 1e3 * min(checks[p]), "check_ms_median": 1e3 * statistics.median(checks[p])}
            for p in paths]
    # Where the paths' greedy tokens part (a near-tie summed in another order); None: they agree.
    first = differs_at(tokens["AVX2"], tokens[paths[-1]])
    result = {"benchmark": "native_step", "rows": rows, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
              "tokens_equal": first is None, "first_difference_at": first,
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
