"""evaluate --task educate: answer extraction, citation checks, retrieval hits, and the task on a tiny model."""

from __future__ import annotations

import json

import pytest

from assistant.evaluate_educate import (
    answer_parts,
    by_site,
    cites_in_text,
    held_out_questions,
    passage_index,
    retrieval_hits,
    run_educate,
    score_system,
)
from assistant.retrieval_passages import medquad_split
from assistant.safety import label_draft
from test_evaluate import WordHashEmbedder

EMBED = WordHashEmbedder()


def embed(texts):
    return EMBED.encode(list(texts))


def records(n: int = 60) -> list[dict]:
    """Fake MedQuAD: pages of three questions each, so a test question's page is usually in train."""
    topics = ["glaucoma eye pressure vision", "asthma airway wheeze inhaler", "gout joint uric acid",
              "anemia blood iron tired", "migraine headache light aura", "eczema skin itch rash"]
    out = []
    for i in range(n):
        topic = topics[(i // 3) % len(topics)]
        out.append({"qid": f"{i // 3:04d}-{i % 3}", "url": f"https://example.org/page{i // 3}", "source": "Test",
                    "focus": topic.split()[0], "question": f"What is {topic.split()[0]} question {i % 3} ?",
                    "answer": f"{topic.capitalize()} answer number {i}. It is common. See a doctor."})
    return out


def test_answer_parts_and_citations():
    shown = "⚠️ URGENT — banner\n\n" + label_draft("Glaucoma harms the eye [1].\n\nSources:\n[1] https://x.org/a")
    assert answer_parts(shown) == ("Glaucoma harms the eye [1].", True)
    assert answer_parts(label_draft("No sources here.")) == ("No sources here.", False)
    assert cites_in_text("see [2]") and not cites_in_text("see [4]") and not cites_in_text("no citation")


def test_score_system_is_per_question_mean():
    scores = score_system(["the cat sat", "a dog ran"], ["the cat sat", ""], [True, False], [True, False])
    assert scores["ROUGE_L"] == pytest.approx(0.5) and scores["citation_listed"] == 0.5
    assert scores["cited_in_text"] == 0.5 and scores["empty_answers"] == 1


def test_scores_per_source_site_sit_beside_the_references_grade():
    from assistant.evaluate_tables import _by_site_line
    from assistant.metrics import flesch_kincaid_grade

    plain, dense = "Gout hurts. Ice helps it.", "Hyperuricemia predisposes individuals to urate crystallization."
    questions = [{"url": "https://ghr.nlm.nih.gov/condition/a", "answer": dense},
                 {"url": "https://www.ghr.nlm.nih.gov/condition/b", "answer": dense},
                 {"url": "https://www.cdc.gov/gout", "answer": plain}]
    sites = by_site(questions, [plain, dense, plain])
    assert list(sites) == ["ghr.nlm.nih.gov", "cdc.gov"]  # most questions first, "www." dropped
    ghr = sites["ghr.nlm.nih.gov"]
    assert ghr["n"] == 2 and ghr["ROUGE_L"] == pytest.approx(0.5)  # one answer copies its reference
    assert ghr["fk_grade_mean"] == pytest.approx((flesch_kincaid_grade(plain) + flesch_kincaid_grade(dense)) / 2)
    assert ghr["reference_fk_grade_mean"] == pytest.approx(flesch_kincaid_grade(dense))
    assert sites["cdc.gov"]["ROUGE_L"] == pytest.approx(1.0)
    line = _by_site_line(sites)[0]
    assert line.index("ghr.nlm.nih.gov 2") < line.index("cdc.gov 1")
    assert _by_site_line(None) == []  # results written before the breakdown


def test_questions_are_held_out_and_seeded():
    data = records()
    split, questions = held_out_questions(data)
    assert questions and {q["qid"] for q in questions} == set(split.test_qids)
    assert held_out_questions(data, limit=1)[1] == questions[:1]
    index = passage_index(split.train, embed, ("word-hash", "1"), None)
    assert not {p.qid for p in index.passages} & split.test_qids  # a test answer is never retrievable
    hits = [index.search(v, k=3) for v in embed([q["question"] for q in questions])]
    result = retrieval_hits(questions, hits, index)
    expected = sum(h[0].passage.url == q["url"] for q, h in zip(questions, hits)) / len(questions)
    assert result["hit_at_1"] == expected and result["hit_at_3"] >= result["hit_at_1"]


def test_passage_index_cache_is_reused_and_checked(tmp_path):
    split = medquad_split(records())
    first = passage_index(split.train, embed, ("word-hash", "1"), tmp_path / "cache")
    calls = []
    again = passage_index(split.train, lambda texts: calls.append(texts) or embed(texts), ("word-hash", "1"),
                          tmp_path / "cache")
    assert not calls and len(again.passages) == len(first.passages)  # loaded, not rebuilt
    from assistant.retrieval_io import CaseIndexError

    with pytest.raises(CaseIndexError, match="rebuild"):
        passage_index(split.train, embed, ("another-embedder", "2"), tmp_path / "cache")


def test_educate_run_on_a_tiny_model(tiny_vlm):
    from assistant.evaluate import _greedy_assistant
    from assistant.pipeline import Assistant

    assistant = _greedy_assistant(Assistant(tiny_vlm), None, 4)
    result = run_educate(assistant, 2, embed, ("word-hash", "1"), records=records(), progress=False)
    assert result["dataset"]["n_evaluated"] == 2 and set(result["metrics"]) == {"model", "top_passage"}
    assert result["metrics"]["model"]["citation_listed"] == 1.0  # the pipeline always lists its sources
    assert result["metrics"]["top_passage"]["cited_in_text"] == 0.0
    assert 0.0 <= result["metrics"]["top_passage"]["ROUGE_L"] <= 1.0
    assert [p["qid"] for p in result["predictions"]] == [q["qid"] for q in held_out_questions(records(), 2)[1]]
    assert all(len(p["sources"]) == 3 for p in result["predictions"])
    assert sum(site["n"] for site in result["model_by_site"].values()) == 2


@pytest.mark.skipif(not (__import__("conftest").SHARED_DATA / "medquad").is_dir(), reason="needs MedQuAD")
def test_educate_task_writes_its_result(tiny_vlm, tmp_path, capsys):
    from assistant.evaluate import evaluate
    from assistant.pipeline import Assistant

    out = tmp_path / "eval-educate.json"
    evaluate("educate", limit=1, assistant=Assistant(tiny_vlm), embedder=EMBED, out=out, max_new_tokens=4,
             command="python -m assistant evaluate --task educate --limit 1", progress=False)
    saved = json.loads(out.read_text())
    assert saved["task"] == "educate" and saved["dataset"]["n_split"] > 1000 and saved["dataset"]["n_evaluated"] == 1
    assert saved["dataset"]["n_passages"] > 20000 and saved["embedder"]["version"] == "supplied by the caller"
    assert saved["model"]["parameters"] > 0 and saved["generation"]["decoding"] == "greedy"
    assert saved["predictions_file"].endswith("eval-educate.predictions.jsonl")
    printed = capsys.readouterr().out
    assert "Retrieval: hit@1" in printed and "baseline: top retrieved passage" in printed


def test_every_answer_is_asked_for_the_chosen_reading_level_and_redrafts_are_counted():
    from assistant.config import AssistantConfig
    from assistant.pipeline import REDRAFTING
    from assistant.readability import READING_LEVELS

    class RecordingAssistant:
        levels: list[str] = []
        config = AssistantConfig()

        def educate(self, question, reading_level, passages):
            self.levels.append(reading_level)
            if len(self.levels) == 1:  # the first answer read too hard and was re-drafted
                yield f"Asthma is a chronic inflammatory airway disease.\n\n(... {REDRAFTING}, 1 of 4.)"
            yield "Asthma narrows the airways.\n\nSources:\n[1] https://example.org/a"

    assistant = RecordingAssistant()
    result = run_educate(assistant, 2, embed, ("word-hash", "1"), records=records(), progress=False,
                         reading_level=READING_LEVELS[0])
    assert assistant.levels == [READING_LEVELS[0]] * 2 and result["reading_level"] == READING_LEVELS[0]
    assert result["plain_redrafts"] == {"plain_redrafts": 4, "redraft_temperature": 0.3, "answers_redrafted": 1}
    from assistant.evaluate_tables import render_educate

    result.update(generation={"max_new_tokens": 4}, model={}, elapsed_s=1.0, command="evaluate",
                  environment={"cpu_count": 2, "loadavg_1m_5m_15m": [0.0, 0.0, 0.0]})
    assert "Plainer re-drafts: 1 answers read above" in render_educate(result)


def test_the_reading_level_option_is_for_the_education_task_only(capsys):
    from assistant.cli_evaluate import main

    assert main(["evaluate", "--task", "triage", "--reading-level", "simple"]) == 2
    assert "--reading-level applies to --task educate only" in capsys.readouterr().err


def test_the_reading_level_option_names_the_pipelines_levels():
    from assistant.cli_evaluate import LEVEL_NAMES
    from assistant.readability import READING_LEVELS

    assert [level.split()[0] for level in READING_LEVELS] == list(LEVEL_NAMES)  # a literal kept beside its source
