"""Regenerate the README's "Results" section from benchmarks/results/*.json.

Every number in that section comes from a result file written by a command (`evaluate`,
benchmarks/*.py), and each table names the command that made it: nothing is typed in by hand.

    .venv/bin/python benchmarks/report.py [--readme README.md] [--results benchmarks/results] [--check]

Replaces the text between `<!-- results:start -->` and `<!-- results:end -->`; `--check` only
reports (exit 1) whether the README is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, installed or not

from assistant.evaluate_tables import RENDERERS, markdown_table  # noqa: E402
from benchmarks.retrieval import _setting_name, best_setting  # noqa: E402  (the same choice as its own table)

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = ROOT / "benchmarks" / "results"
# Section order and titles; result files of other kinds follow in name order.
TITLES = {"eval-report": "Report drafting with the shipped adapter report-lora (IU X-ray, text-only)",
          "eval-report-base": "Report drafting, untrained base model (IU X-ray, text-only)",
          "eval-report-rag": "Report drafting with similar cases in the prompt (IU X-ray, first 100 test studies)",
          "rag-effect": "Effect of retrieval-augmented drafting", "eval-summary": "EHR summarisation (Synthea)",
          "eval-educate": "Patient education (MedQuAD), untrained base model",
          "eval-educate-lora": "Patient education with the shipped adapter educate-lora, greedy answers only",
          "eval-educate-lora-simple": "Patient education with educate-lora, the simple reading level asked for, "
                                      "greedy answers only",
          "eval-educate-lora-redraft": "Patient education with educate-lora as served (plainer re-drafts)",
          "eval-educate-lora-simple-redraft": "Patient education with educate-lora as served (plainer re-drafts), "
                                              "the simple reading level asked for",
          "eval-educate-simple-redraft": "Patient education, untrained base model with plainer re-drafts, the "
                                         "simple reading level asked for",
          "eval-triage": "Red-flag triage",
          "eval-retrieval": "Similar-case retrieval quality (IU X-ray)",
          "eval-vision": "Vision encoder (NIH ChestX-ray14, PneumoniaMNIST)",
          "generation": "Generation speed", "native-step": "Native decoding step: AVX2 and AVX512-BF16 products",
          "ingest": "DICOM ingest speed",
          "retrieval": "Case-index speed and recall (FAISS)", "concurrency": "Concurrent users (queue and memory)",
          "backend": "Text generation backends (local model, llama.cpp server)",
          "train-step": "Training speed (LoRA step, all layers)", "train-step-top8": "Training speed (LoRA step, top 8 layers)",
          "train-parallel": "Training on several processes: data parallel and sharded (FSDP2)"}
VISION_COMMAND = "python -m assistant evaluate-vision --out benchmarks/results/eval-vision.json"
MIN_RECALL = 0.95  # the case-index table shows the fastest setting reaching this recall@10


def render_generation(r: dict) -> str:
    d, e2e, bw, mb = r["decode"], r["end_to_end"], r["memory_bandwidth"], r["model_bytes"]
    env = r["environment"]
    cpu = f"{env['cpu_model']}, {env['cpu_capability']}, " if "cpu_model" in env else ""
    head = (f"**{r['model']}**, {env['cpu_count']} CPUs ({cpu}{env['machine']}, {env['torch_threads']} torch threads), "
            f"torch {env['torch']}; load average before/after "
            f"{r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f} (`{r['command'].strip()}`).")
    rows = [
        [f"decode tokens/s (greedy, median of {d['runs']} x {d['new_tokens']} tokens, prefill excluded)",
         f"{d['decode_tokens_per_s_median']:.1f}"],
        ["CPU share of the torch threads while decoding (1.00 = cores to itself)", f"{d['cpu_share']:.2f}"],
        ["time to first token", f"{d['ttft_s_median']:.2f} s"],
        [f"prefill of a study ({d['prompt_tokens']} tokens incl. {r['prompt']['image_tokens']} image tokens)",
         f"{r['prefill_s_median']:.2f} s"],
        [f"end to end: DICOM file to a {e2e['new_tokens']}-token draft (median of {e2e['runs']})",
         f"{e2e['seconds_median']:.1f} s"],
        ["peak RSS (model loaded, all of the above)", f"{r['peak_rss_mb']:.0f} MB"],
        [f"memory bandwidth (best read of a {bw['array_mb']} MB array)", f"{bw['best_read_gb_s']:.1f} GB/s"],
        [f"weights read per token ({mb['dtype']}, tied embedding once)", f"{mb['bytes_per_token'] / 1e6:.0f} MB"],
        ["decode bound = bandwidth / bytes per token", f"{r['decode_bound_tokens_per_s']:.1f} tokens/s"],
        ["achieved / bound", f"{r['achieved_over_bound']:.2f}"],
    ]
    parts = [head, markdown_table(["measure", "value"], rows, numeric_from=1)]
    if r.get("plain_transformers"):
        bound = bw["best_read_gb_s"] * 1e9
        ref = [[f"plain transformers, {x['dtype']}", f"{x['decode_tokens_per_s_median']:.1f}",
                f"{x['ttft_s_median']:.2f}", f"{x['bytes']['bytes_per_token'] / 1e6:.0f}",
                f"{bound / x['bytes']['bytes_per_token']:.1f}",
                f"{x['decode_tokens_per_s_median'] * x['bytes']['bytes_per_token'] / bound:.2f}"]
               for x in r["plain_transformers"]]
        parts.append(markdown_table(["reference (text prompt, no image)", "decode tokens/s", "TTFT (s)",
                                     "MB per token", "bound (tokens/s)", "achieved / bound"], ref))
    parts.extend(render_fast_path(r))
    if r.get("note"):
        parts.append(f"Note: {r['note']}.")
    if r["loadavg_before"][0] >= 1.0:
        # Other work on the cores stalls torch's threads: these speeds are then lower bounds.
        parts.append(f"Warning: the machine was busy when this ran (1-minute load {r['loadavg_before'][0]:.1f} "
                     f"on {env['cpu_count']} CPUs before it started); rerun on a quiet machine.")
    return "\n\n".join(parts)


FAST_MODE_NAMES = {"shortlist": "fast path as served: {kernel} step, greedy drafts over {rows} shortlist rows "
                                "checked against all 262,144",
                   "every_row": "fast path, {kernel} step, scoring every output row at every step",
                   "torch_step": "the same drafts with the compiled torch step (Inductor) instead"}


def startup_line(fast: dict) -> str:
    """How long the decoder took to get ready, and for the torch step how its tokens compare."""
    if not fast.get("kernel", "").startswith("native"):
        return f"compile (or Inductor cache load) {fast['compile_or_cache_load_s']:.0f} s"
    line = f"native step built (or loaded) and weights laid out in {fast['compile_or_cache_load_s']:.0f} s"
    if torch_step := fast.get("modes", {}).get("torch_step"):
        first = torch_step.get("first_difference_from_native")
        same = "the same tokens" if first is None else f"tokens that first differ at token {first}"
        line += (f"; the compiled torch step compiled (or loaded) in {torch_step['compile_or_cache_load_s']:.0f} s "
                 f"and gave {same}")
    return line


def render_fast_path(r: dict) -> list[str]:
    """The compiled decoder's modes and llama.cpp beside the reference path (generation.json)."""
    fast, llama = r.get("fast_path"), r.get("llama_cpp") or {}
    if not fast:
        return []
    if "error" in fast:
        return [f"Fast path unavailable: {fast['error']}."]
    reference = r["decode"]["decode_tokens_per_s_median"]
    llama_rate = llama.get("decode_tokens_per_s_median")
    rows = [["reference: transformers generate (study prompt)", f"{reference:.1f}",
             f"{r['model_bytes']['bytes_per_token'] / 1e6:.0f}", f"{r['decode_bound_tokens_per_s']:.1f}",
             f"{r['achieved_over_bound']:.2f}", "1.00", f"{reference / llama_rate:.2f}" if llama_rate else "-"]]
    for key, mode in fast.get("modes", {"served": fast}).items():
        name = FAST_MODE_NAMES.get(key, "fast path").format(rows=f"{fast.get('shortlist_rows') or 0:,}",
                                                            kernel=fast.get("kernel", "compiled"))
        if mode.get("check_screened") and mode.get("checks"):
            name += " (the check screened in int8)"
        rate = mode["decode_tokens_per_s_median"]
        rows.append([name, f"{rate:.1f}", f"{mode['bytes_per_token'] / 1e6:.0f}", f"{mode['bound_tokens_per_s']:.1f}",
                     f"{mode['achieved_over_bound']:.2f}", f"{rate / reference:.2f}",
                     f"{rate / llama_rate:.2f}" if llama_rate else "-"])
    if llama_rate:
        rows.append([f"llama.cpp, {llama['gguf']} ({llama['threads']} threads, text prompt)", f"{llama_rate:.1f}",
                     f"{llama['gguf_bytes'] / 1e6:.0f}", f"{llama['bound_tokens_per_s']:.1f}",
                     f"{llama['achieved_over_bound']:.2f}", f"{llama_rate / reference:.2f}", "1.00"])
    parts = [markdown_table(["decoder", "decode tokens/s", "MB read / token", "bound (tokens/s)", "achieved / bound",
                             "x reference", "x llama.cpp"], rows)]
    same = ("equal to the reference's" if fast["greedy_tokens_equal_reference"]
            else f"first differ from the reference's at token {fast['first_difference_at']}")
    prefill = f"prefill of the study {fast['prefill_s_median']:.2f} s; " if "prefill_s_median" in fast else ""
    lines = [f"Fast path greedy tokens on this prompt ({fast['compared_tokens']} compared) {same}; {prefill}time to first "
             f"token {fast['ttft_s_median']:.2f} s; longest wait between two tokens "
             f"{fast['longest_gap_between_tokens_s'] * 1000:.0f} ms; " + startup_line(fast) + "."]
    if "shortlist" in fast.get("modes", {}):
        mode = fast["modes"]["shortlist"]
        lines.append(f"Shortlist drafting: {mode['steps']} steps and {mode['checks']} whole-vocabulary checks for "
                     f"{mode['new_tokens']} tokens, {mode['rejected_drafts']} drafts replaced; tokens "
                     f"{'equal to' if mode['tokens_equal_every_row'] else 'DIFFERENT from'} the every-row mode's.")
    if drafts := fast.get("drafts"):
        modes = drafts["modes"]
        line = (f"Whole drafts as the app runs them ({drafts['prompts']} held-out report prompts, greedy to the end "
                f"of the report or {drafts['max_new_tokens']} tokens): every row {modes['every_row']['decode_tokens_per_s']:.1f} "
                f"tokens/s")
        if served := modes.get("shortlist"):
            line += (f", as served {served['decode_tokens_per_s']:.1f} tokens/s ({served['new_tokens']} tokens, "
                     f"{served['checks']} checks, {served['rejected_drafts']} drafts replaced; tokens "
                     f"{'equal to' if served['tokens_equal_every_row'] else 'DIFFERENT from'} the every-row mode's)")
        lines.append(line + ".")
    if agreement := fast.get("agreement"):
        ours, yardstick = agreement["fast_vs_generate"], agreement["eager_attention_vs_generate"]
        lines.append(f"Greedy agreement with `generate` on {agreement['prompts']} held-out report prompts "
                     f"({agreement['tokens_each']} tokens each): the fast path {ours['identical']} identical, "
                     f"first difference after {ours['tokens_before_first_difference_median']:.0f} tokens (median; "
                     f"minimum {ours['tokens_before_first_difference_min']}); for scale, `generate` with eager "
                     f"attention instead of SDPA (same model, another bf16 summation order) "
                     f"{yardstick['identical']} identical, after {yardstick['tokens_before_first_difference_median']:.0f} "
                     f"(minimum {yardstick['tokens_before_first_difference_min']}).")
    if llama.get("skipped") or llama.get("error"):
        lines.append(f"llama.cpp: {llama.get('skipped') or llama['error']}.")
    parts.append(" ".join(lines))
    return parts


def render_ingest(r: dict) -> str:
    env = r["environment"]
    head = (f"**`{r['function']}`**, {env['cpu_count']} CPUs ({env['machine']}), pydicom "
            f"{env['packages']['pydicom']}; median of {r['results'][0]['repeats']} reads "
            "(`python benchmarks/ingest.py`).")
    rows = [[x["case"], x["codec"], f"{x['shape'][0]}x{x['shape'][1]}", f"{x['images_per_s']:.1f}",
             f"{x['median_s'] * 1000:.0f}", f"{x['peak_python_heap_mb']:.0f}"] for x in r["results"]]
    return "\n\n".join([head, markdown_table(["case", "codec", "pixels", "images/s", "median (ms)",
                                              "peak heap (MB)"], rows, numeric_from=3)])


def render_concurrency(r: dict) -> str:
    setup, server, res, load = r["setup"], r["server"], r["results"], r["machine"]["load_before"]
    head = (f"**{setup['users']} simulated users** at once on `{setup['endpoint']}` ({setup['max_new_tokens']} new tokens "
            f"each), {r['machine']['cpus']} CPUs, {setup['max_concurrent_generations']} generation(s) at a time, "
            f"queue of {setup['max_queue_size']}; 1-minute load {load[0]:.1f} before (`{r['command']}`).")
    rows = [
        ["answered / errors", f"{res['completed']} / {res['errors']}"],
        ["server alive afterwards", "yes" if server["alive_after"] else "NO"],
        ["time to first text p50 / p95 (includes waiting in line)", f"{res['ttft_p50_s']:.1f} s / {res['ttft_p95_s']:.1f} s"],
        ["latency p50 / p95 / max", f"{res['latency_p50_s']:.1f} / {res['latency_p95_s']:.1f} / {res['latency_max_s']:.1f} s"],
        ["users who waited in line (furthest place seen)", f"{res['users_who_waited_in_line']} ({res['max_queue_position_seen']})"],
        ["service time per answer", f"{res['service_s_per_answer']:.1f} s"],
        ["red-flag users: longest wait for the escalation text",
         f"{res['red_flag_first_text_max_s']:.1f} s ({res['red_flag_users']} users)"],
        ["server memory idle → peak", f"{server['idle_rss_mb']} → {server['peak_rss_mb']} MB"],
    ]
    parts = [head, markdown_table(["measure", "value"], rows, numeric_from=1)]
    if "report_workflow" in r:
        parts += render_report_workflow(r["report_workflow"])
    return "\n\n".join(parts)


def render_report_workflow(r: dict) -> list[str]:
    """The browser scenario of benchmarks/concurrency.py: accepted reports checked in the store."""
    setup, server, res, machine = r["setup"], r["server"], r["results"], r["machine"]
    load = f"{machine['load_before'][0]:.1f} before, {machine['load_after'][0]:.1f} after"  # a shared machine
    head = (f"**{setup['users']} signed-in browser users** at once ({setup['client']}): {setup['flow']}; "
            f"{setup['max_new_tokens']} new tokens per draft, 1-minute load {load} (`{r['command']}`).")
    rows = [
        ["completed / errors / crashes", f"{res['completed']} / {res['errors']} / {res['crashes']}"],
        ["accepted reports: confirmed in the browser / found in the store / lost",
         f"{res['accepted_expected']} / {res['accepted_found']} / {res['lost']}"],
        ["exports verified", f"{res['exports_verified']} / {res['exports_expected']}"],
        ["time to first draft text p50 / p95 (from the click, includes waiting in line)",
         f"{_s(res['ttft_p50_s'])} / {_s(res['ttft_p95_s'])}"],
        ["whole workflow p50 / p95 / max (upload to accepted or exported)",
         f"{_s(res['latency_p50_s'])} / {_s(res['latency_p95_s'])} / {_s(res['latency_max_s'])}"],
        ["server memory idle → peak", f"{server['idle_rss_mb']} → {server['peak_rss_mb']} MB"],
    ]
    return [head, markdown_table(["measure", "value"], rows, numeric_from=1)]


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f} s"


def render_case_index(r: dict) -> str:
    env = r["environment"]
    head = (f"**FAISS case index** ({env['cpu_count']} CPUs, faiss {env['faiss']}, {env['date']}; one query per call, "
            f"k=10; `python benchmarks/retrieval.py`). Per data set, size and index type: the fastest setting with "
            f"recall@10 >= {MIN_RECALL} against exact search (else the most accurate); full sweep in "
            "`benchmarks/results/retrieval.md`.")
    rows = [(data, row) for data, rows in (("synthetic", [x for v in r["synthetic"].values() for x in v]),
                                           ("IU MiniLM", (r.get("iu") or {}).get("index_types", [])))
            for row in rows]
    table = markdown_table(
        ["data", "n", "kind", "setting", "recall@10", "p50 ms", "p99 ms", "build s", "index MB"],
        [[data, f"{row['n']:,}", row["kind"], _setting_name(s := best_setting(row)), f"{s['recall_at_10']:.3f}",
          f"{s['latency_ms_1_thread']['p50']:.2f}", f"{s['latency_ms_1_thread']['p99']:.2f}", f"{row['build_s']:.1f}",
          f"{row['index_mb']:.1f}"] for data, row in rows], numeric_from=4)
    parts = [head, table]
    iu = (r.get("iu") or {}).get("retrieval")
    if iu:
        parts.append(f"IU X-ray impression -> own findings among {iu['n_queries']} test studies (exact, MiniLM): "
                     f"recall@1 {iu['recall_at_1']:.3f}, recall@10 {iu['recall_at_10']:.3f}.")
    if env.get("note"):
        parts.append(f"Note: {env['note']}.")
    return "\n\n".join(parts)


def render_vision(r: dict) -> str:
    nih, pneu = r["nih_test"], r["pneumoniamnist_test"]
    head = (f"**Vision encoder `adapters/vision-nih14` (the shipped default)**: AUROC on held-out NIH ChestX-ray14 "
            f"patients ({nih['images']} images, {nih['abnormal']} abnormal, 64 px) and the PneumoniaMNIST test set "
            f"({pneu['images']} images, 28 px) (`{VISION_COMMAND}`).")
    either = nih["normal_vs_abnormal_auroc"]
    ci = either.get("noisy_or_ci95")
    rows = [["NIH normal vs abnormal (noisy-OR of the 14 outputs)",
             f"{either['noisy_or']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""), nih["images"]],
            [f"NIH macro AUROC over the {nih['findings_scored']} scored findings",
             f"{nih['macro_auroc']:.3f}", nih["images"]]]
    rows += [[f"NIH {name.replace('_', ' ')}", f"{x['auroc']:.3f}", x["positives"]]
             for name, x in nih["per_finding"].items() if x["auroc"] is not None]
    rows.append(["PneumoniaMNIST pneumonia (pediatric)", f"{pneu['auroc']:.3f}", pneu["images"]])
    rows += [[f"PneumoniaMNIST published baseline: {name}", f"{value:.3f}", pneu["images"]]
             for name, value in pneu.get("published_baselines_auroc", {}).items()]
    table = markdown_table(["measure", "AUROC", "positives / images"], rows)
    skipped = [name for name, x in nih["per_finding"].items() if x["auroc"] is None]
    note = f"Not scored (too few test positives): {', '.join(skipped)}." if skipped else ""
    return "\n\n".join(part for part in (head, table, note) if part)


def render_rag_effect(r: dict) -> str:
    """Retrieval-augmented drafting against plain drafting on the same studies (benchmarks/rag_effect.py)."""
    settings = r.get("rag_settings") or {}
    head = (f"Same model, same test studies, with and without similar training-split reports in the prompt "
            f"(`{r['command'].strip()}` over `{r['runs']['rag']}` and `{r['runs']['plain']}`). Retrieval queries "
            f"by {settings.get('query', 'the indication')}; cases below similarity {settings.get('min_similarity')} "
            "are left out, so some prompts get no context.")
    names = {"all": "all studies", "with_context": "studies whose prompt got a case",
             "without_context": "studies whose prompt got none"}
    rows = []
    for subset, pair in r["scores"].items():
        for system in ("plain", "rag"):
            m = pair[system]
            rows.append([f"{names.get(subset, subset)}, {'with context' if system == 'rag' else 'plain'}", m["n"],
                         m["BLEU_1"], m["BLEU_4"], m["METEOR"], m["ROUGE_L"], m["CIDEr"], m["finding_f1_micro"]])
    return "\n\n".join([head, markdown_table(["studies, drafting", "n", "BLEU-1", "BLEU-4", "METEOR", "ROUGE-L",
                                              "CIDEr", "finding F1 micro"], rows)])


def render_train_step(r: dict) -> str:
    """The LoRA step micro-benchmark (benchmarks/train_step.py): seconds per step by loss mode."""
    m = r["machine"]
    head = (f"LoRA training step, {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s), torch {m['torch']}; "
            f"peak RSS {r['peak_rss_mb']:.0f} MB; load average before {m['loadavg_before'][0]:.2f} "
            f"(`{r['command']}`).")
    rows = [[row["mode"], row["dtype"], row["batch"], row["tokens"], row["lora_layers"] or "all",
             f"{row['s_per_step']:.2f}", f"{row['batch'] / row['s_per_step']:.2f}"] for row in r["rows"]]
    return "\n\n".join([head, markdown_table(["loss over", "dtype", "batch", "tokens", "LoRA layers", "s/step",
                                              "samples/s"], rows, numeric_from=2)])


def render_train_parallel(r: dict) -> str:
    """Data parallel against fully sharded training under torchrun (benchmarks/train_parallel.py)."""
    m, diff = r["machine"], r["adapter_difference"]
    where = f"{m['gpus']} GPUs" if m.get("gpus") else f"{m['cpu_count']} CPUs over gloo, {m['OMP_NUM_THREADS']} thread(s) each"
    head = (f"LoRA training of the report task under torchrun, {r['runs'][0]['processes']} processes ({where}), "
            f"torch {m['torch']}; load average before {m['loadavg_before'][0]:.2f} (`{r['command'].strip()}`). "
            f"The two adapters differ by at most {diff['max_abs_difference']:.2g} ({diff['tensors']} {diff['dtype']} "
            f"tensors, largest value {diff['max_abs_value']:.2g}).")
    rows = [[row["mode"] + (" (--shard fsdp)" if row["sharded"] else ""), row["steps"], row["samples"],
             f"{row['s_per_step']:.2f}", f"{row['samples_per_s']:.2f}", f"{row['weights_mb_per_process']:.0f}",
             f"{row['peak_rss_mb']:.0f}",
             f"{row['held_out_loss_full_vocab']['before']:.4f} -> {row['held_out_loss_full_vocab']['after']:.4f}"]
            for row in r["runs"]]
    return "\n\n".join([head, markdown_table(["mode", "steps", "samples", "s/step", "samples/s",
                                              "weights per process, MB", "peak memory of the main process, MB",
                                              "held-out loss"], rows, numeric_from=1)])


def render_native_step(r: dict) -> str:
    """The native step's product paths side by side (benchmarks/native_step.py)."""
    env = r["environment"]
    head = (f"Native decoding step, base model without LoRA, {r['new_tokens']} greedy tokens after "
            f"\"{r['prompt']}\"; {env['cpu_count']} CPUs ({env['cpu_model']}), {env['torch_threads']} threads; "
            f"paths alternating run by run; load average before {r['loadavg_before'][0]:.2f}; greedy tokens "
            + ("equal across paths" if r["tokens_equal"] else
               f"of the paths first differ at token {r.get('first_difference_at')} (another fp32 sum order)")
            + screen_sentence(r) + f" (`{r['command'].strip()}`).")
    rows = [[row["path"] + (f" (screen sums: {row['screen_sums']})" if row.get("screen_sums") else ""),
             f"{row['served_tok_s_median']:.1f}",
             " / ".join(f"{rate:.1f}" for rate in row["served_tok_s_all"]),
             f"{row['check_ms_median']:.1f}", f"{row['check_ms_best']:.1f}"] for row in r["rows"]]
    check = "check of 16 states, ms (median)" if "checked_rounds" not in r else \
        f"check of the decode's {r['checked_rounds']} rounds (up to 16 states), ms (median)"
    return "\n\n".join([head, markdown_table(["products", "served tokens/s (median)", "runs", check, "best"], rows,
                                              numeric_from=1)])


def screen_sentence(r: dict) -> str:
    if "screen_tokens_equal" not in r:
        return ""  # a run from before the int8 screen
    left = sorted(r.get("screen_rows_left") or [0])
    return ("; the int8 screen's tokens " + ("equal" if r["screen_tokens_equal"] else "DIFFER FROM")
            + f" those of the check it screens, and it left {left[len(left) // 2]:,} rows per round (median; at most "
            f"{left[-1]:,}) to the exact check")


def render_training_runs(adapters: Path = ROOT / "adapters") -> str | None:
    """Per stage, the shipped adapters' own training runs (their metadata.json, written by `train`)."""
    rows = []
    for meta_path in sorted(adapters.glob("*/metadata.json")):
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        run = meta.get("training")
        if not run or "samples_per_s" not in run:
            continue  # the vision encoder's card has its own section
        loss = run.get("held_out_loss_full_vocab") or {}
        rows.append([meta_path.parent.name, meta.get("stage"), meta.get("task"), run["steps"], run["samples"],
                     f"{run['seconds'] / 60:.1f}", f"{run['samples_per_s']:.2f}", f"{run['peak_rss_mb'] / 1024:.1f}",
                     f"{loss['before']:.2f} → {loss['after']:.2f}" if loss else "n/a"])
    if not rows:
        return None
    return ("Training runs of the shipped adapters on the shared 2-core CPU (from each `adapters/NAME/metadata.json`; "
            "its `commands.train` is the exact command):\n\n"
            + markdown_table(["adapter", "stage", "task", "steps", "samples", "minutes", "samples/s", "peak RSS (GB)",
                              "held-out loss"], rows, numeric_from=3))


def render_backend(r: dict) -> str:
    """Text generation through each backend (benchmarks/backend.py)."""
    head = (f"One summary prompt streamed through each backend, greedy, at most {r['max_tokens']} new tokens, "
            f"median of {r['runs']} runs; {r['cpu_count']} CPUs, torch {r['torch_threads']} thread(s), llama.cpp "
            f"{r['llama_threads']} thread(s); load average {r['load_average_before']:.1f} before, "
            f"{r['load_average_after']:.1f} after (`python benchmarks/backend.py`).")
    rows = [[name, x["decode_tokens_per_s"], x["first_piece_s"], x["cpu_ms_per_token"], max(x["tokens"]),
             x.get("gguf_mb")] for name, x in r["results"].items()]
    parts = [head, markdown_table(["backend", "decode tokens/s", "first piece (s)", "CPU ms per token",
                                   "tokens", "GGUF MB"], rows)]
    if r.get("busy_machine"):
        parts.append("Warning: the machine was busy (other jobs on the 2 cores); rerun on a quiet machine.")
    return "\n\n".join(parts)


BENCHMARKS = {"generation": render_generation, "ingest": render_ingest, "concurrency": render_concurrency,
              "rag_effect": render_rag_effect, "train_step": render_train_step, "native_step": render_native_step,
              "train_parallel": render_train_parallel}


def render_file(path: Path) -> str | None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if "benchmark" in data and data["benchmark"] in BENCHMARKS:
        return BENCHMARKS[data["benchmark"]](data)
    if "task" in data and data["task"] in RENDERERS:
        return RENDERERS[data["task"]](data)
    # Result files written before they named their kind: recognised by their shape.
    if {"synthetic", "method", "environment"} <= data.keys():
        return render_case_index(data)
    if {"nih_test", "pneumoniamnist_test"} <= data.keys():
        return render_vision(data)
    if {"results", "llama_threads"} <= data.keys():
        return render_backend(data)
    return None  # a result kind this script does not know yet


def build_section(results: Path = RESULTS) -> str:
    files = sorted(results.glob("*.json"), key=lambda p: (list(TITLES).index(p.stem) if p.stem in TITLES
                                                         else len(TITLES), p.name))
    parts = ["_Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; "
             "regenerate with `make bench`. Do not edit by hand._"]
    for path in files:
        body = render_file(path)
        if body:
            parts.append(f"### {TITLES.get(path.stem, path.stem)}\n\n{body}")
    runs = render_training_runs()
    if runs:
        parts.append(f"### Training runs per stage (shipped adapters)\n\n{runs}")
    return "\n\n".join(parts)


def replace_section(text: str, section: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {START} ... {END} markers")
    return f"{text[:start + len(START)]}\n{section}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's section is out of date")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        updated = replace_section(text, build_section(args.results))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print("README results are up to date" if updated == text else "README results are out of date")
        return 0 if updated == text else 1
    args.readme.write_text(updated, encoding="utf-8")
    print(f"updated the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
