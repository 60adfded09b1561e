"""Generation benchmark on the real default model (ClinicalVLM via Assistant.from_config).

Measures, greedy and on a fixed prompt (the 966_fixed chest DICOM + "cough"):
- decode tokens/s, excluding prefill (median over runs; a fixed token count is forced),
- time to first token, and prefill time of a study (image tokens + prompt, one forward pass),
- end to end: DICOM file -> read -> prompt -> complete 120-token labelled draft,
- peak RSS; the machine's memory bandwidth and the bound it puts on decoding
  (bytes read per token = every language-model weight in the runtime dtype, the tied 262k x 640
  embedding once, as lm_head), and achieved / bound;
- the same decode on plain transformers (bf16 and fp32), without the LLaVA wrapper;
- the fast path (assistant.fast_decode with its native C++ step, or the compiled torch step where
  that cannot be built) in both modes, as served (greedy drafts over the
  vocabulary shortlist, checked against the whole vocabulary) and scoring every output row at every
  step: decode tokens/s, the bytes its steps and checks read per token and the bound they put on
  it, achieved / bound, the longest wait between two tokens, whether its greedy tokens equal the
  reference's; the served mode again with the compiled torch step (what the native one replaced);
  and greedy agreement with `generate` over held-out report prompts;
- llama.cpp (llama-cpp-python, an optional extra) on the packaged Q4_K_M GGUF of the same base
  model, same 2 threads, with the fast path's ratio to it.

    .venv/bin/python benchmarks/generation.py [--runs 5] [--tokens 64] [--e2e-runs 3] [--no-reference]
                                              [--agreement-prompts 20]

Writes benchmarks/results/generation.json and generation.md. Decoding is memory-bound, so a busy
machine distorts the numbers: the load average before and after is recorded with them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from assistant.config import AssistantConfig  # noqa: E402
from assistant.evaluate import write_atomic  # noqa: E402
from assistant.fast_decode import CACHE_BLOCK  # noqa: E402
from assistant.pipeline import Assistant, report_prompt  # noqa: E402

DICOM = ROOT.parent / "shared" / "data" / "dicom" / "pylibjpeg-data" / "JPEG2000Lossless" / "966_fixed.dcm"
RESULTS = ROOT / "benchmarks" / "results"
INDICATION = "cough"
E2E_TOKENS = 120


class TokenClock(BaseStreamer):
    """Timestamps each generated token as generate() hands it over (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def timed_generate(model, inputs: dict, tokens: int, pad_token_id: int | None) -> dict:
    """One greedy generation of exactly `tokens` new tokens: time to first token, decode rate."""
    clock = TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, streamer=clock, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                       repetition_penalty=1.1, pad_token_id=pad_token_id)
    decode_s = clock.times[-1] - clock.times[0]
    return {"ttft_s": clock.times[0] - start, "decode_tokens_per_s": (len(clock.times) - 1) / decode_s,
            "tokens": len(clock.times)}


def decode_runs(model, inputs: dict, tokens: int, runs: int, pad_token_id: int | None) -> dict:
    timed_generate(model, inputs, 8, pad_token_id)  # warm-up: kernels, allocator, caches
    wall, cpu = time.perf_counter(), time.process_time()
    samples = [timed_generate(model, inputs, tokens, pad_token_id) for _ in range(runs)]
    # CPU seconds per wall second per torch thread: well below 1 means other work took the cores.
    cpu_share = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()
    rates = [s["decode_tokens_per_s"] for s in samples]
    return {"runs": runs, "new_tokens": tokens, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "cpu_share": cpu_share,
            "decode_tokens_per_s_median": statistics.median(rates), "decode_tokens_per_s_best": max(rates),
            "decode_tokens_per_s_all": rates,
            "ttft_s_median": statistics.median(s["ttft_s"] for s in samples)}


def prefill_seconds(model, inputs: dict, runs: int) -> float:
    """One forward pass over the whole study prompt (vision tower + projector + LLM) as generation
    runs it (logits of the last position only), median."""
    seconds = []
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def end_to_end(assistant: Assistant, runs: int) -> dict:
    """DICOM file to a complete labelled draft of exactly E2E_TOKENS new tokens, through the public API."""
    hf = assistant.vlm.hf
    original = hf.generation_config
    hf.generation_config = copy.deepcopy(original)
    hf.generation_config.min_new_tokens = E2E_TOKENS  # no early stop: every run drafts the same length
    seconds, draft = [], ""
    try:
        for _ in range(runs):
            start = time.perf_counter()
            scan = assistant.read(DICOM)
            for draft in assistant.draft_report([scan], INDICATION):
                pass
            seconds.append(time.perf_counter() - start)
    finally:
        hf.generation_config = original
    return {"runs": runs, "new_tokens": E2E_TOKENS, "seconds_median": statistics.median(seconds),
            "seconds_all": seconds, "draft_chars": len(draft)}


def memory_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict:
    """Best-of-N read (sum) and copy bandwidth of a large array, in GB/s (1e9 bytes)."""
    a = np.ones(megabytes * 2**20 // 8)
    b = np.empty_like(a)
    t = torch.ones(megabytes * 2**20 // 4)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    read_np = a.nbytes / best(a.sum) / 1e9
    copy_np = 2 * a.nbytes / best(lambda: np.copyto(b, a)) / 1e9  # read + write
    read_torch = t.numel() * 4 / best(t.sum) / 1e9
    return {"array_mb": megabytes, "repeats": repeats, "numpy_sum_read_gb_s": read_np,
            "numpy_copy_gb_s": copy_np, "torch_sum_read_gb_s": read_torch,
            "torch_threads": torch.get_num_threads(), "best_read_gb_s": max(read_np, read_torch)}


def decode_bytes(language_model, lm_head) -> dict:
    """Bytes of weights read per decoded token: each distinct tensor once (tied embedding = lm_head)."""
    seen: dict[int, int] = {}
    for p in (*language_model.parameters(), *lm_head.parameters()):
        seen[p.data_ptr()] = p.numel() * p.element_size()
    head = lm_head.weight
    return {"bytes_per_token": sum(seen.values()), "lm_head_bytes": head.numel() * head.element_size(),
            "lm_head_shape": list(head.shape), "dtype": str(head.dtype).replace("torch.", ""),
            "tied_embedding": head.data_ptr() == language_model.get_input_embeddings().weight.data_ptr()}


def fast_path(assistant: Assistant, inputs: dict, tokens: int, runs: int, bandwidth_gb_s: float,
              reference: list[int], agreement_prompts: int) -> dict:
    """The compiled decoder on the same study prompt, as shipped (greedy drafts over the vocabulary
    shortlist, checked against every row) and scoring every row at every step; then greedy
    agreement with `generate` over held-out report prompts."""
    vlm = assistant.vlm
    start = time.perf_counter()
    generation = vlm.start_fast_decoding(wait=True)
    if not generation.ready.is_set():
        return {"error": generation.failure}
    compile_s = time.perf_counter() - start
    shortlist = generation.decoder.shortlist
    modes = {"every_row": fast_mode(assistant, generation, inputs, tokens, runs, bandwidth_gb_s, reference, None)}
    if shortlist is not None:
        modes["shortlist"] = fast_mode(assistant, generation, inputs, tokens, runs, bandwidth_gb_s, reference, shortlist)
        modes["shortlist"]["tokens_equal_every_row"] = modes["shortlist"]["ids"] == modes["every_row"]["ids"]
    kernel = generation.decoder.kernel
    if kernel == "native":  # the torch step the native one replaced, in the same run, for the ratio
        modes["torch_step"] = torch_step_mode(assistant, generation, inputs, tokens, runs, bandwidth_gb_s,
                                              reference, shortlist)
        served_ids = modes["shortlist" if shortlist is not None else "every_row"]["ids"]
        modes["torch_step"]["first_difference_from_native"] = differs_at(modes["torch_step"]["ids"], served_ids)
    for mode in modes.values():
        mode.pop("ids")
    served = "shortlist" if shortlist is not None else "every_row"
    if kernel == "native":
        from assistant.fast_native import check_instructions

        kernel = f"native ({check_instructions()})"  # the products' instruction set on this CPU
    result = {"kernel": kernel, "compile_or_cache_load_s": compile_s, "served_mode": served, "modes": modes,
              **modes[served],
              "shortlist_rows": int(shortlist.ids.numel()) if shortlist is not None else None,
              "prefill_s_median": fast_prefill_seconds(assistant, generation, inputs, runs)}
    if agreement_prompts:
        result["drafts"] = drafts_to_eos(assistant, generation, shortlist, agreement_prompts)
        generation.decoder.shortlist = shortlist
        result["agreement"] = greedy_agreement(assistant, generation, tokens, agreement_prompts)
    return result


def torch_step_mode(assistant: Assistant, generation, inputs: dict, tokens: int, runs: int, bandwidth_gb_s: float,
                    reference: list[int], shortlist) -> dict:
    """The served mode with the compiled torch step (assistant.fast_decode's Inductor graph)
    instead of the native one: a second decoder, swapped in for these runs only."""
    from assistant.fast_decode import FastDecoder

    native = generation.decoder
    start = time.perf_counter()
    decoder = FastDecoder(native.text_model, native.max_positions, compile=True, shortlist=shortlist, native=False)
    decoder.warm_up(assistant.vlm.adapter_name("report"))
    compile_s = time.perf_counter() - start
    generation.decoder = decoder
    try:
        return {**fast_mode(assistant, generation, inputs, tokens, runs, bandwidth_gb_s, reference, shortlist),
                "compile_or_cache_load_s": compile_s}
    finally:
        generation.decoder = native


def fast_prefill_seconds(assistant: Assistant, generation, inputs: dict, runs: int) -> float:
    """The fast path's prefill of the study prompt (input embeddings with the image features, then
    assistant.fast_prefill into the decoder's cache and the last logits), median."""
    from assistant.fast_generate import prompt_embeddings

    vlm, decoder = assistant.vlm, generation.decoder
    weights = decoder.weights_for(vlm.adapter_name("report"))
    seconds = []
    with vlm.adapter_for("report"), torch.inference_mode():
        for _ in range(runs + 1):  # the first is a warm-up
            start = time.perf_counter()
            decoder.prefill(weights, prompt_embeddings(vlm, inputs))
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def drafts_to_eos(assistant: Assistant, generation, shortlist, prompts: int) -> dict:
    """Each fast mode on the first `prompts` held-out report prompts as the app runs them: greedy,
    stopping at the model's end-of-sequence token or `generation.max_new_tokens`. Fixed-length runs
    go on past the end of a report into text no report has (out of the shortlist), so this is the
    speed a clinician sees. Decode rate = tokens after the first / time after the first."""
    from assistant.evaluate_report import load_studies

    vlm, decoder = assistant.vlm, generation.decoder
    adapter = vlm.adapter_name("report")
    gen = dataclasses.replace(assistant.config.generation, temperature=0.0)
    studies = load_studies("test")[:prompts]
    modes = {"every_row": None, **({"shortlist": shortlist} if shortlist is not None else {})}
    result, texts = {}, {}
    for name, rows in modes.items():
        decoder.shortlist = rows
        tokens, seconds, checks, rejected, texts[name] = 0, 0.0, 0, 0, []
        for study in studies:
            inputs = vlm.build_inputs(report_prompt([], study.indication))
            with vlm.adapter_for("report"):
                stamps, ids = [], []
                for token in generation.tokens(inputs, gen, adapter):
                    stamps.append(time.perf_counter())
                    ids.append(token)
            tokens, seconds = tokens + len(ids) - 1, seconds + (stamps[-1] - stamps[0] if stamps else 0.0)
            checks, rejected = checks + decoder.last_stats.checks, rejected + decoder.last_stats.rejected
            texts[name].append(ids)
        result[name] = {"new_tokens": tokens + len(studies), "decode_tokens_per_s": tokens / seconds,
                        "checks": checks, "rejected_drafts": rejected}
    if "shortlist" in result:
        result["shortlist"]["tokens_equal_every_row"] = texts["shortlist"] == texts["every_row"]
    decoder.shortlist = shortlist
    return {"prompts": prompts, "max_new_tokens": gen.max_new_tokens, "modes": result}


def fast_mode(assistant: Assistant, generation, inputs: dict, tokens: int, runs: int, bandwidth_gb_s: float,
              reference: list[int], shortlist) -> dict:
    """Timed fixed-length greedy runs (no EOS) of one decoding mode, and the bytes its steps and
    checks read per token (so its own memory-bandwidth bound)."""
    vlm, decoder = assistant.vlm, generation.decoder
    decoder.shortlist = shortlist
    adapter = vlm.adapter_name("report")

    def one(count: int) -> tuple[dict, list[int]]:
        gen = dataclasses.replace(assistant.config.generation, max_new_tokens=count, temperature=0.0)
        begin = time.perf_counter()
        stamps, ids = [], []
        with vlm.adapter_for("report"):
            for token in generation.tokens(inputs, gen, adapter, eos_ids=()):  # no EOS: a fixed count
                stamps.append(time.perf_counter())
                ids.append(token)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"ttft_s": stamps[0] - begin, "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "longest_gap_s": max(gaps)}, ids

    one(8)
    samples = [one(tokens) for _ in range(runs)]
    rates = [s["decode_tokens_per_s"] for s, _ in samples]
    ids = samples[0][1]
    read = bytes_read(decoder, adapter, decoder.last_stats, int(inputs["input_ids"].shape[1]))
    bound = bandwidth_gb_s * 1e9 / read["bytes_per_token"]
    median = statistics.median(rates)
    same = differs_at(ids, reference)
    return {"runs": runs, "new_tokens": tokens, "decode_tokens_per_s_median": median, "decode_tokens_per_s_all": rates,
            "ttft_s_median": statistics.median(s["ttft_s"] for s, _ in samples),
            "longest_gap_between_tokens_s": max(s["longest_gap_s"] for s, _ in samples), **read,
            "bound_tokens_per_s": bound, "achieved_over_bound": median / bound,
            "greedy_tokens_equal_reference": same is None and len(ids) == len(reference),
            "first_difference_at": same, "compared_tokens": min(len(ids), len(reference)), "ids": ids}


def bytes_read(decoder, adapter: str | None, stats, prompt_tokens: int) -> dict:
    """Bytes one decoded token costs, from what the last sequence did (`DecodeStats`): each step
    reads every layer's weights, one embedding row, the output rows it scores and the KV cache
    blocks up to its position; each whole-vocabulary check reads the output matrix once (with the
    int8 screen, its int8 codes and per-row numbers, the few rows it leaves not counted)."""
    weights = decoder.weights_for(adapter)
    row = weights.embed[0].numel() * weights.embed.element_size()
    matrix = weights.embed.numel() * weights.embed.element_size()
    screen = getattr(decoder.check, "screen", None)
    checked = matrix if screen is None else sum(t.numel() * t.element_size() for t in vars(screen.rows).values())
    layers = weights.bytes_per_token() - matrix
    shape = decoder.shape
    per_position = 2 * shape.layers * shape.kv_heads * shape.head_dim * decoder.cache()[0].element_size()
    spans = [-(-max(1, prompt_tokens + i) // CACHE_BLOCK) * CACHE_BLOCK for i in range(stats.steps)]
    cache = per_position * sum(spans)
    total = stats.steps * (layers + row) + stats.head_rows * row + stats.checks * checked + cache
    decoded = max(1, stats.tokens - 1)  # the first token comes from the prefill
    return {"bytes_per_token": total / decoded, "layer_bytes": layers, "output_matrix_bytes": matrix,
            "check_bytes": checked, "check_screened": screen is not None,
            "kv_cache_bytes_per_token": cache / decoded, "steps": stats.steps, "checks": stats.checks,
            "rejected_drafts": stats.rejected, "output_rows_per_step": stats.head_rows / max(1, stats.steps)}


def greedy_agreement(assistant: Assistant, generation, tokens: int, prompts: int) -> dict:
    """Greedy tokens of the fast path (as served) against `generate` on the first `prompts` held-out
    IU test indications (text-only report prompts, the report adapter). Beside it, as a yardstick
    of how far two correct bf16 implementations drift apart, `generate` with transformers' eager
    attention against `generate` with its default (SDPA): the same model, another summation order."""
    from assistant.evaluate_report import load_studies

    vlm = assistant.vlm
    adapter = vlm.adapter_name("report")
    gen = dataclasses.replace(assistant.config.generation, max_new_tokens=tokens, temperature=0.0)
    studies = load_studies("test")[:prompts]
    fast, yardstick = [], []
    for study in studies:
        inputs = vlm.build_inputs(report_prompt([], study.indication))
        expected = reference_tokens(vlm, inputs, tokens)
        with vlm.adapter_for("report"):
            fast.append(first_difference(list(generation.tokens(inputs, gen, adapter, eos_ids=())), expected))
        yardstick.append(first_difference(with_attention(vlm, "eager", lambda: reference_tokens(vlm, inputs, tokens)),
                                          expected))
    return {"prompts": prompts, "tokens_each": tokens,
            "prompt_source": "first IU X-ray test studies' indications, text-only report prompt, report adapter",
            "fast_vs_generate": agreement_summary(fast, tokens),
            "eager_attention_vs_generate": agreement_summary(yardstick, tokens)}


def differs_at(got: list[int], expected: list[int]) -> int | None:
    """The first index where two token sequences part, None where their common length agrees."""
    return next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)


def first_difference(got: list[int], expected: list[int]) -> int:
    """Tokens before the first difference (the shorter length where none)."""
    first = differs_at(got, expected)
    return min(len(got), len(expected)) if first is None else first


def agreement_summary(firsts: list[int], tokens: int) -> dict:
    return {"identical": sum(f >= tokens for f in firsts), "tokens_before_first_difference_mean": statistics.mean(firsts),
            "tokens_before_first_difference_median": statistics.median(firsts),
            "tokens_before_first_difference_min": min(firsts)}


def with_attention(vlm, implementation: str, run):
    """`run()` with the HF model's attention switched to `implementation`, then switched back."""
    model = vlm._base_model()
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        return run()
    finally:
        model.set_attn_implementation(before)


def reference_tokens(vlm, inputs: dict, tokens: int) -> list[int]:
    """Greedy tokens of the reference path (transformers generate) on the study prompt."""
    with vlm.adapter_for("report"), torch.inference_mode():
        out = vlm.hf.generate(**inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                              repetition_penalty=vlm.config.generation.repetition_penalty,
                              pad_token_id=vlm.tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def in_child_process(function, *args, crashed: dict) -> dict:
    """function(*args) in a fresh child process, or `crashed` where the child dies (a signal, an
    abort): a crash inside a native library is then reported in the results, not fatal to the run.
    `function` must be importable in the child: a module-level function of an imported module, or
    of this script run as `python benchmarks/generation.py`."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding OpenMP threads
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            return crashed


def llama_cpp_isolated(prompt: str, tokens: int, runs: int, bandwidth_gb_s: float) -> dict:
    """llama_cpp_decode in a child process with this process's thread count (llama.cpp's native
    library can die, as an AMX build on a VM that forbids the tiles did)."""
    return in_child_process(llama_cpp_decode, prompt, tokens, runs, bandwidth_gb_s, torch.get_num_threads(),
                            crashed={"error": "llama.cpp's child process died before it answered (its stderr and "
                                              "the kernel log say why; an AMX build on a VM that forbids the "
                                              "tiles dies so: `make setup` builds llama-cpp-python without AMX)"})


def llama_cpp_decode(prompt: str, tokens: int, runs: int, bandwidth_gb_s: float, threads: int) -> dict:
    """llama.cpp on the packaged Q4_K_M GGUF (`threads` threads), greedy, tokens/s after the first."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install '.[serve]')"}
    from assistant.serve_export import packaged_gguf

    gguf = packaged_gguf()
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=1024, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=True)

    def one(count: int) -> float:
        llm.reset()
        stamps = []
        for _ in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == count:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    one(8)
    rates = [one(tokens) for _ in range(runs)]
    size = gguf.stat().st_size
    median = statistics.median(rates)
    return {"gguf": gguf.name, "gguf_bytes": size, "threads": threads,
            "decode_tokens_per_s_median": median, "decode_tokens_per_s_all": rates,
            "bound_tokens_per_s": bandwidth_gb_s * 1e9 / size, "achieved_over_bound": median * size / (bandwidth_gb_s * 1e9),
            "note": "bound from the file size: every tensor read once per token (tied embedding as output)"}


def plain_reference(llm_dir: Path, prompt: str, tokens: int, runs: int) -> list[dict]:
    """The bare causal LM (no vision, no LLaVA wrapper) on the same prompt text, bf16 and fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    inputs = tokenizer(prompt, return_tensors="pt")
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype).eval()
        result = decode_runs(model, dict(inputs), tokens, runs, tokenizer.pad_token_id)
        result["bytes"] = decode_bytes(model.get_decoder(), model.get_output_embeddings())
        out.append({"dtype": str(dtype).replace("torch.", ""), **result})
        del model
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_assistant(max_new_tokens: int) -> tuple[Assistant, str | None]:
    """The default assistant; a fresh vision tower if the shipped weights are not there yet (timing
    does not depend on weight values, and the note says so)."""
    config = AssistantConfig().override({"generation.max_new_tokens": max_new_tokens,
                                         "generation.temperature": 0.0})
    weights = config.vision.weights
    note = None
    if weights and not ((ROOT / weights).is_dir() or Path(weights).is_dir()):
        config = config.override({"vision.weights": None})
        note = f"vision weights {weights!r} not found: freshly initialised tower (same cost per token)"
    return Assistant.from_config(config, progress=True), note


def environment() -> dict:
    from importlib import metadata

    return {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "transformers": metadata.version("transformers"),
            "torch_threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The CPU's model name (bf16 speed depends on its vector units: see cpu_capability)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def run(args: argparse.Namespace) -> dict:
    from assistant.base_models import resolve_llm_dir

    load_before = list(os.getloadavg())
    start = time.perf_counter()
    assistant, note = load_assistant(E2E_TOKENS)
    load_s = time.perf_counter() - start
    vlm = assistant.vlm
    scan = assistant.read(DICOM)
    inputs = vlm.build_inputs(report_prompt([scan], INDICATION), [scan.pixels])
    decode = decode_runs(vlm.hf, inputs, args.tokens, args.runs, vlm.tokenizer.pad_token_id)
    prefill = prefill_seconds(vlm.hf, inputs, args.runs)
    e2e = end_to_end(assistant, args.e2e_runs)
    rss_vlm = peak_rss_mb()
    bandwidth = memory_bandwidth()
    reference = reference_tokens(vlm, inputs, args.tokens)
    fast = fast_path(assistant, inputs, args.tokens, args.runs, bandwidth["best_read_gb_s"], reference,
                     args.agreement_prompts)
    llama = llama_cpp_isolated(report_prompt([], INDICATION), args.tokens, args.runs, bandwidth["best_read_gb_s"])
    if "decode_tokens_per_s_median" in fast and "decode_tokens_per_s_median" in llama:
        for mode in (fast, *fast["modes"].values()):
            mode["over_llama_cpp"] = mode["decode_tokens_per_s_median"] / llama["decode_tokens_per_s_median"]
    base = vlm._base_model()
    model_bytes = decode_bytes(base.model.language_model, base.lm_head)
    bound = bandwidth["best_read_gb_s"] * 1e9 / model_bytes["bytes_per_token"]
    result = {
        "benchmark": "generation", "model": "ClinicalVLM (default config) via Assistant.from_config",
        "note": note, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/generation.py " + " ".join(sys.argv[1:]),
        "environment": environment(), "loadavg_before": load_before,
        "load_seconds": load_s, "prompt": {"indication": INDICATION, "dicom": DICOM.name,
                                          "image_tokens": vlm.num_image_tokens,
                                          "prompt_tokens": decode["prompt_tokens"]},
        "decode": decode, "prefill_s_median": prefill, "end_to_end": e2e, "peak_rss_mb": rss_vlm,
        "memory_bandwidth": bandwidth, "model_bytes": model_bytes,
        "decode_bound_tokens_per_s": bound,
        "achieved_over_bound": decode["decode_tokens_per_s_median"] / bound,
        "fast_path": fast, "llama_cpp": llama,
    }
    if args.reference:
        prompt = report_prompt([], INDICATION)
        result["plain_transformers"] = plain_reference(resolve_llm_dir(assistant.config.llm.path), prompt,
                                                       args.tokens, max(1, args.runs // 2 + 1))
    result["loadavg_after"] = list(os.getloadavg())
    result["elapsed_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed decode/prefill runs (median)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    parser.add_argument("--e2e-runs", type=int, default=3, help="end-to-end runs (median)")
    parser.add_argument("--agreement-prompts", type=int, default=20,
                        help="held-out report prompts on which the fast path's greedy tokens are compared with generate's")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the plain-transformers bf16/fp32 runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not DICOM.is_file():
        print(f"chest DICOM not found at {DICOM}", file=sys.stderr)
        return 2
    result = run(args)
    from report import render_generation  # benchmarks/report.py, beside this script

    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "generation.json", json.dumps(result, indent=2) + "\n")
    write_atomic(args.out / "generation.md", render_generation(result) + "\n")
    print(render_generation(result))
    print(f"wrote {args.out / 'generation.json'} and {args.out / 'generation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
