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

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = ROOT / "benchmarks" / "results"
# Section order and titles; result files of other kinds follow in name order.
TITLES = {"eval-report": "Report drafting (IU X-ray, text-only)", "eval-triage": "Red-flag triage",
          "generation": "Generation speed", "ingest": "DICOM ingest speed"}


def render_generation(r: dict) -> str:
    d, e2e, bw, mb = r["decode"], r["end_to_end"], r["memory_bandwidth"], r["model_bytes"]
    env = r["environment"]
    head = (f"**{r['model']}**, {env['cpu_count']} CPUs ({env['machine']}, {env['torch_threads']} torch threads), "
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
    if r.get("note"):
        parts.append(f"Note: {r['note']}.")
    if r["loadavg_before"][0] >= 1.0:
        # Other work on the cores stalls torch's threads: these speeds are then lower bounds.
        parts.append(f"Warning: the machine was busy when this ran (1-minute load {r['loadavg_before'][0]:.1f} "
                     f"on {env['cpu_count']} CPUs before it started); rerun on a quiet machine.")
    return "\n\n".join(parts)


def render_ingest(r: dict) -> str:
    env = r["environment"]
    head = (f"**`{r['function']}`**, {env['cpu_count']} CPUs ({env['machine']}), pydicom "
            f"{env['packages']['pydicom']}; median of {r['results'][0]['repeats']} reads "
            "(`python benchmarks/ingest.py`).")
    rows = [[x["case"], x["codec"], f"{x['shape'][0]}x{x['shape'][1]}", f"{x['images_per_s']:.1f}",
             f"{x['median_s'] * 1000:.0f}", f"{x['peak_python_heap_mb']:.0f}"] for x in r["results"]]
    return "\n\n".join([head, markdown_table(["case", "codec", "pixels", "images/s", "median (ms)",
                                              "peak heap (MB)"], rows, numeric_from=3)])


BENCHMARKS = {"generation": render_generation, "ingest": render_ingest}


def render_file(path: Path) -> str | None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if "benchmark" in data and data["benchmark"] in BENCHMARKS:
        return BENCHMARKS[data["benchmark"]](data)
    if "task" in data and data["task"] in RENDERERS:
        return RENDERERS[data["task"]](data)
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
