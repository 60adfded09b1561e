"""Markdown tables of evaluation results: printed by `evaluate` and pasted into the README by
benchmarks/report.py, so the terminal and the README always show the same numbers."""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_NAMES = {
    "model": "model (indication only, no image)",
    "nearest_neighbour": "baseline: nearest-neighbour train report",
    "constant_normal": "baseline: most common normal report",
}
R2GEN_COLUMNS = [("BLEU-1", "BLEU_1"), ("BLEU-2", "BLEU_2"), ("BLEU-3", "BLEU_3"), ("BLEU-4", "BLEU_4"),
                 ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE_L"), ("CIDEr", "CIDEr")]
LEADERBOARD_COLUMNS = ("BLEU", "BertScore", "SembScore", "RadGraph", "RadCliQ-v1")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> str:
    """A GitHub table; columns from `numeric_from` on are right-aligned numbers (3 decimals)."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render_report(result: dict) -> str:
    data, metrics = result["dataset"], result["metrics"]
    head = (f"**Report drafting, IU X-ray test split (R2Gen), {data['n_evaluated']} of {data['n_split']} studies; "
            f"conditioning: {result['conditioning']}.** Greedy, max {result['generation']['max_new_tokens']} "
            f"new tokens; {result['elapsed_s']:.0f} s on {result['environment']['cpu_count']} CPUs, 1-minute load "
            f"{result['environment']['loadavg_1m_5m_15m'][0]:.1f} at the end (`{result['command']}`).")
    r2gen_rows = [[SYSTEM_NAMES.get(name, name), *[m["r2gen"].get(key) for _, key in R2GEN_COLUMNS],
                   m["r2gen"]["finding_f1"]["micro_f1"], m["r2gen"]["finding_f1"]["macro_f1"]]
                  for name, m in metrics.items()]
    r2gen = markdown_table(["system (R2Gen protocol: reference = findings)", *[h for h, _ in R2GEN_COLUMNS],
                            "finding F1 micro", "finding F1 macro"], r2gen_rows)
    ours = [[SYSTEM_NAMES.get(name, name), m["rexrank"]["BLEU_2"], None, None, None, None,
             m["rexrank"]["finding_f1"]["micro_f1"]] for name, m in metrics.items()]
    board = [[f"ReXrank published (all 590): {row['Model Name']}", *[row.get(c) for c in LEADERBOARD_COLUMNS], None]
             for row in result["leaderboard"]["rows"]]
    rexrank = markdown_table(["system (ReXrank protocol: findings + impression)", "BLEU-2", "BERTScore",
                              "SembScore", "RadGraph", "RadCliQ-v1 (lower is better)", "finding F1 micro"],
                             ours + board)
    missing = [f"{name}: {why}" for name, why in result["leaderboard"]["columns"].items() if why.startswith("not")]
    meteor_error = metrics["model"]["r2gen"].get("METEOR_error")
    notes = ["n/a = not computable offline. " + "; ".join(missing)]
    if meteor_error:
        notes.append(f"METEOR: {meteor_error}")
    return "\n\n".join([head, r2gen, rexrank, *notes])


def render_triage(result: dict) -> str:
    m, data = result["metrics"], result["dataset"]
    head = (f"**Red-flag triage, {data['n_evaluated']} written vignettes** ({result['system']}; "
            f"`{result['command']}`).")
    summary = markdown_table(["measure", "value", "vignettes"], [
        ["emergency recall", m["emergency_recall"], m["counts"].get("emergency", 0)],
        ["urgent accuracy (flagged exactly urgent)", m["urgent_accuracy"], m["counts"].get("urgent", 0)],
        ["urgent flagged at any level", m["urgent_flagged_any"], m["counts"].get("urgent", 0)],
        ["false-alarm rate on 'none'", m["false_alarm_rate"], m["counts"].get("none", 0)],
    ])
    recall = m["per_category_recall"]
    below = {c: r for c, r in recall.items() if r < 1.0}
    # Only the categories that miss need a row; the rest are counted, keeping the README short.
    line = f"Per-category recall: {len(recall) - len(below)} of {len(recall)} categories at 1.000."
    parts = [head, summary, line]
    if below:
        parts.append(markdown_table(["category below 1.000", "recall"], [[c, r] for c, r in below.items()]))
    return "\n\n".join(parts)


RENDERERS = {"report": render_report, "triage": render_triage}
