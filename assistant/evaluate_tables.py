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


def _run_line(result: dict) -> str:
    env = result["environment"]
    return (f"{result['elapsed_s']:.0f} s on {env['cpu_count']} CPUs, 1-minute load "
            f"{env['loadavg_1m_5m_15m'][0]:.1f} at the end (`{result['command']}`)")


def _model_line(result: dict, per: str = "") -> str:
    gen = result["generation"]
    model = result["model"]
    task_adapter = (model.get("task_adapters") or {}).get(result.get("task"), {}).get("path")
    adapter = task_adapter or (model.get("adapter") or {}).get("path") or "none (untrained base model)"
    return (f"Greedy, max {gen['max_new_tokens']} new tokens; LoRA adapter: {adapter}; "
            f"{per + '; ' if per else ''}{_run_line(result)}.")


def _seconds(value: float | None, what: str) -> str:
    return f"{value:.1f} s {what}" if value is not None else ""


def _words(value: float | None) -> str | None:
    return f"{value:.0f}" if value is not None else None


def _educate_timing(timing: dict) -> str:
    per = _seconds(timing.get("seconds_per_question"), "per question")
    index = timing.get("index_s")
    return f"{per}, {index:.0f} s to build or load the passage index (cached after the first run)" if index else per


def render_summary(result: dict) -> str:
    data, metrics, names = result["dataset"], result["metrics"], result["systems"]
    head = (f"**EHR summarisation, {data['n_evaluated']} of {data['n_split']} held-out Synthea patients** "
            f"(seeded split; {data['n_train']} training patients). "
            f"{_model_line(result, _seconds(result['timing'].get('seconds_per_patient'), 'per patient'))}")
    sections = ("problems", "medications", "allergies", "results", "follow_up")
    rows = [[names.get(name, name), *[m["coverage"][s] for s in sections], m["coverage_all"],
             m["grounding_precision"], m["hallucinated_facts"], m["named_supported_fraction"]]
            for name, m in metrics.items()]
    facts = next(iter(metrics.values()))["facts"]
    table = markdown_table(["system", *[f"{s.replace('_', '-')} recall ({facts[s]})" for s in sections],
                            "all facts recall", "grounding precision", "hallucinated facts",
                            "named items in record"], rows)
    note = ("Recall: share of the record's facts (count in brackets) the summary mentions; grounding precision: "
            "share of summary statements the source check links to a record line; hallucinated: condition, "
            "medication and allergy names (Synthea vocabulary) absent from the record. n/a: nothing to measure.")
    return "\n\n".join([head, table, note])


def render_educate(result: dict) -> str:
    data, metrics, names, hits = result["dataset"], result["metrics"], result["systems"], result["retrieval"]
    head = (f"**Patient education, {data['n_evaluated']} of {data['n_split']} held-out MedQuAD questions** "
            f"(passages: {data['n_passages']:,} from the train split; reading level {result['reading_level']}). "
            f"{_model_line(result, _educate_timing(result['timing']))}")
    rows = [[names.get(name, name), m["ROUGE_L"], m["fk_grade_mean"], m["citation_listed"], m["cited_in_text"],
             _words(m["mean_words"])] for name, m in metrics.items()]
    table = markdown_table(["system", "ROUGE-L", "FK grade", "sources listed", "cites [n] in text", "words"], rows)
    k = result["k"]
    line = (f"Retrieval: hit@1 {_cell(hits['hit_at_1'])}, hit@{k} {_cell(hits[f'hit_at_{k}'])} "
            f"({hits['criterion']}; {_cell(hits['answerable'])} of questions have their source page in the index). "
            f"Reference answers: FK grade {_cell(result['reference_fk_grade_mean'])}.")
    return "\n\n".join([head, table, line, *_redraft_line(result.get("plain_redrafts")),
                          *_by_site_line(result.get("model_by_site"))])


def _redraft_line(redrafts: dict | None) -> list[str]:
    """How many answers were re-drafted for a plainer reading ([] for results written before)."""
    if not redrafts:
        return []
    if not redrafts["plain_redrafts"]:
        return ["Plainer re-drafts: off (greedy answers only)."]
    return [f"Plainer re-drafts: {redrafts['answers_redrafted']} answers read above the level asked for and were "
            f"re-drafted (up to {redrafts['plain_redrafts']} seeded samples at temperature "
            f"{redrafts['redraft_temperature']:g}; the first within the level kept, else the plainest)."]


def _by_site_line(sites: dict | None) -> list[str]:
    """The model's grade per source site ([] for results written before the breakdown existed)."""
    if not sites:
        return []
    parts = [f"{site} {s['n']}: FK grade {_cell(s['fk_grade_mean'])} (references {_cell(s['reference_fk_grade_mean'])}), "
             f"ROUGE-L {_cell(s['ROUGE_L'])}" for site, s in sites.items()]
    return ["Model by source site of the question (questions: scores): " + "; ".join(parts) + "."]


def render_retrieval(result: dict) -> str:
    data, metrics = result["dataset"], result["metrics"]
    recall, labels = metrics["report_retrieval"], metrics["label_agreement"]
    emb = result["embedder"]
    head = (f"**Similar-case retrieval on IU X-ray, {data['n_evaluated']} of {data['n_split']} test studies as "
            f"queries** ({emb['name']}, exact search through CaseIndex; {_run_line(result)}).")
    ks = [int(key.rsplit("_", 1)[1]) for key in recall if key.startswith("recall_at_") and key[10:].isdigit()]
    first = markdown_table(
        ["impression -> own findings (among %d test findings)" % recall["n_indexed"], *[f"@{k}" for k in ks]],
        [["recall", *[recall[f"recall_at_{k}"] for k in ks]],
         ["recall, identical findings text counts", *[recall[f"recall_at_{k}_identical_text_counts"] for k in ks]],
         ["chance", *[recall[f"chance_at_{k}"] for k in ks]]])
    lk = [int(key.rsplit("_", 1)[1]) for key in labels if key.startswith("precision_at_")]
    second = markdown_table(
        ["test report -> %d train cases: labeler agreement" % labels["n_indexed"], *[f"@{k}" for k in lk], "chance"],
        [["agrees: shares a label or both have none (precision)", *[labels[f"precision_at_{k}"] for k in lk],
          labels["chance_precision"]],
         ["identical label set", *[labels[f"exact_at_{k}"] for k in lk], labels["chance_exact"]]])
    return "\n\n".join([head, first, second])


RENDERERS = {"report": render_report, "triage": render_triage, "summary": render_summary, "educate": render_educate,
             "retrieval": render_retrieval}
