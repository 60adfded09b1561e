"""The Gradio app's handlers with a tiny model (the browser test drives the real one)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import app
import app_report
import app_viewer
from assistant.pipeline import Assistant
from assistant.safety import DRAFT_LABEL
from assistant.store import Store
from assistant.workflow import Workflow


@pytest.fixture
def assistant(tiny_vlm):
    return Assistant(tiny_vlm)


def outputs(event: tuple) -> dict:
    """A draft_events step by output name."""
    return dict(zip(app_report.DRAFT_OUTPUTS, event))


@pytest.fixture
def workflow(tmp_path):
    return Workflow(Store.open(tmp_path / "db.sqlite"), tmp_path / "exports")


def png(tmp_path, name="cxr.png"):
    path = tmp_path / name
    Image.fromarray((np.random.default_rng(1).random((90, 70)) * 255).astype(np.uint8)).save(path)
    return path


def test_app_builds_with_a_named_api_endpoint(assistant, workflow):
    blocks = app.build_app(assistant, workflow)
    assert "/draft_report" in {f"/{dep['api_name']}" for dep in blocks.config["dependencies"] if dep.get("api_name")}


def test_no_upload_asks_for_one(assistant):
    (event,) = [outputs(e) for e in app_report.draft_events(assistant, [], "", [])]
    assert "Upload at least one" in event["status"] and event["chat"] == []


def test_non_dicom_upload_gets_a_clear_message_and_is_deleted(assistant, tmp_path):
    bogus = tmp_path / "JOHN_DOE_chest.dcm"  # uploaded file names can carry PHI
    bogus.write_bytes(b"%PDF-1.4 not an image")
    (event,) = [outputs(e) for e in app_report.draft_events(assistant, [str(bogus)], "", [])]
    assert event["status"].startswith("⚠️ Image 1 could not be used:")
    assert "JOHN" not in event["status"] and "Traceback" not in event["status"]
    assert not bogus.exists() and event["files"] is None


def test_a_draft_streams_into_the_chat(assistant, tmp_path):
    upload = png(tmp_path)
    events = [outputs(e) for e in app_report.draft_events(assistant, [str(upload)], "cough", [])]
    assert events[0]["files"] is None and len(events[0]["study"]) == 1  # uploads consumed; study in session state
    final_history = events[-1]["chat"]
    assert final_history[-2]["role"] == "user" and "cough" in final_history[-2]["content"]
    assert final_history[-1]["content"].startswith(DRAFT_LABEL)
    assert events[-1]["status"].startswith("✅")
    assert not upload.exists()


def test_redrafting_reuses_the_session_study(assistant, tmp_path):
    study = [assistant.read(png(tmp_path))]
    events = [outputs(e) for e in app_report.draft_events(assistant, [], "new indication", [], study)]
    assert events[-1]["status"].startswith("✅")
    assert "new indication" in events[-1]["chat"][-2]["content"]


def test_a_draft_click_that_raced_the_upload_event_drafts_the_read_study(assistant, tmp_path):
    upload = png(tmp_path)
    study, _, _ = app_report.read_uploads(assistant, [upload])  # the upload event read (and deleted) it first
    assert not upload.exists()
    events = [outputs(e) for e in app_report.draft_events(assistant, [str(upload)], "", [], study)]
    assert events[-1]["status"].startswith("✅")


def test_too_many_uploads_are_refused_and_deleted(assistant, tmp_path):
    uploads = [png(tmp_path, f"{n}.png") for n in range(4)]
    (event,) = [outputs(e) for e in app_report.draft_events(assistant, [str(p) for p in uploads], "", [])]
    assert "At most 3 images" in event["status"] and not any(p.exists() for p in uploads)


def test_model_failure_ends_the_answer_and_keeps_the_session(assistant, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        yield "FINDINGS: partial"
        raise RuntimeError("out of memory")

    monkeypatch.setattr(assistant, "draft_report", broken)
    events = list(app_report.draft_events(assistant, [str(png(tmp_path))], "", [{"role": "user", "content": "hi"}]))
    history, status = outputs(events[-1])["chat"], outputs(events[-1])["status"]
    assert "model failed" in status and "out of memory" in status
    assert history[0] == {"role": "user", "content": "hi"}  # earlier turns survive
    assert history[-1]["content"].endswith("Generation stopped.")


def test_every_mode_has_a_named_api_endpoint(assistant, workflow):
    blocks = app.build_app(assistant, workflow)
    names = {dep.get("api_name") for dep in blocks.config["dependencies"]}
    assert {"draft_report", "triage", "summarize", "educate", "accept_report", "export_report", "history"} <= names


def test_chat_streams_and_clears_the_box(assistant):
    events = list(app.chat_events(lambda h, m: assistant.triage(h, m), "sore throat for two days", []))
    history, box, status = events[-1]
    assert history[-2] == {"role": "user", "content": "sore throat for two days"}
    assert history[-1]["content"].startswith(DRAFT_LABEL) and box == "" and status.startswith("✅")


def test_emergency_banner_leads_the_triage_answer(assistant):
    events = list(app.chat_events(lambda h, m: assistant.triage(h, m), "I want to kill myself tonight", []))
    assert all(e[0][-1]["content"].startswith("🚨") for e in events if len(e[0]) == 2)


def test_refused_input_keeps_the_users_text(assistant):
    huge = "x " * 40_000
    (history, box, status), = list(app.chat_events(lambda h, m: assistant.summarize(m), huge, []))
    assert history == [] and box == huge.strip() and "at most 8,000" in status


def test_empty_message_is_refused(assistant):
    (_, _, status), = list(app.chat_events(lambda h, m: assistant.triage(h, m), "   ", []))
    assert "Type a message" in status


def test_chat_model_failure_keeps_the_conversation(assistant):
    def broken(history, message):
        yield "partial"
        raise RuntimeError("killed")

    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    history, _, status = list(app.chat_events(broken, "next", earlier))[-1]
    assert history[:2] == earlier and history[-1]["content"].endswith("Generation stopped.")
    assert "killed" in status


def test_completed_draft_opens_in_the_editor_and_can_be_accepted_and_exported(assistant, workflow, tmp_path):
    events = [outputs(e) for e in app_report.draft_events(assistant, [str(png(tmp_path))], "cough", [])]
    history, study = events[-1]["chat"], events[0]["study"]
    editor, draft_id, report_id = app_report.record_draft(workflow, "alice", history, study)
    assert not editor.startswith(DRAFT_LABEL) and "FINDINGS:" in editor and report_id is None
    status, report_id = app_report.accept_draft(workflow, "alice", draft_id, editor + "\nEdited by me.")
    assert "Accepted by **alice**" in status
    path, message = app_report.export_report(workflow, "alice", report_id, "markdown", study)
    assert "Edited by me." in open(path).read() and message.startswith("✅")


def test_stopped_drafts_are_not_offered_for_acceptance(workflow):
    history = [{"role": "assistant", "content": f"{DRAFT_LABEL}\n\nFINDINGS: x\n\n{app_report.STOPPED}"}]
    import gradio as gr

    result = app_report.record_draft(workflow, "alice", history, ["scan"])
    assert all(item == gr.skip() for item in result)  # nothing stored, nothing put in the editor


def test_accept_and_export_need_their_previous_step(workflow):
    assert app_report.accept_draft(workflow, "alice", None, "text")[0].startswith("⚠️ Draft a report first")
    assert app_report.export_report(workflow, "alice", None, "fhir", [])[1].startswith("⚠️ Accept")


def test_chat_turns_are_recorded_once_per_user(workflow):
    history = [{"role": "user", "content": "sore throat"}, {"role": "assistant", "content": "Urgency: routine"}]
    stored = app.record_chat(workflow, "alice", "triage", history, None)
    stored = app.record_chat(workflow, "alice", "triage", history, stored)  # refused input: nothing new
    history += [{"role": "user", "content": "and fever"}, {"role": "assistant", "content": "ok"}]
    stored = app.record_chat(workflow, "alice", "triage", history, stored)
    assert len(workflow.conversation("alice", stored[0])) == 4
    assert workflow.history("bob") == []


def test_red_flags_in_earlier_turns_escalate_with_gradio_shaped_history(assistant):
    earlier = [{"role": "user", "content": [{"type": "text", "text": "my face is drooping on one side"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "When did it start?"}]}]
    final = list(app.chat_events(lambda h, m: assistant.triage(h, m), "ten minutes ago", earlier))[-1]
    assert final[0][-1]["content"].startswith("🚨")


# ---- viewer: window presets, findings, heatmap -----------------------------------------------

@pytest.fixture
def trained_assistant(tmp_path):
    """A tiny Assistant whose vision weights folder has a finding head and held-out metrics."""
    import json

    import torch

    from assistant.model import ClinicalVLM
    from assistant.vision import VisionEncoder, build_vision_tower, save_vision_encoder
    from conftest import tiny_config, tiny_language_model, tiny_tokenizer

    torch.manual_seed(0)
    vision = tiny_config().vision
    folder = save_vision_encoder(VisionEncoder(build_vision_tower(vision)), tmp_path / "weights", vision, dtype=None)
    metrics = {"normal_vs_abnormal_auroc": {"noisy_or": 0.644}, "per_finding": {"Effusion": {"auroc": 0.687}}}
    (folder / "metadata.json").write_text(json.dumps({"metrics": {"nih_test": metrics}}))
    config = tiny_config(**{"vision.weights": str(folder)})
    return Assistant(ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), config))


@pytest.fixture
def chest_scan(assistant):
    from conftest import CHEST_DICOM

    return assistant.read(CHEST_DICOM)


def test_window_presets_change_the_displayed_image(chest_scan):
    from assistant.app_images import OWN_WINDOW, display_image

    shown = {window: display_image(chest_scan, window) for window in (OWN_WINDOW, "lung", "mediastinum", "bone")}
    assert max(shown[OWN_WINDOW].shape) <= 1024 and shown[OWN_WINDOW].dtype == np.uint8
    for window in ("lung", "mediastinum", "bone"):
        assert np.abs(shown[window].astype(int) - shown[OWN_WINDOW]).mean() > 5, window
    # lung opens the lucent end, mediastinum the dense end: the lung window is the brighter picture
    assert shown["lung"].mean() > shown["mediastinum"].mean()


def test_relative_windows_follow_the_photometric_interpretation(chest_scan):
    import dataclasses

    from assistant.app_images import windowed

    other = "MONOCHROME2" if chest_scan.photometric == "MONOCHROME1" else "MONOCHROME1"
    inverted = dataclasses.replace(chest_scan, values=chest_scan.values.max() - chest_scan.values, photometric=other)
    # the same anatomy stored the other way round displays the same under each preset
    for window in ("lung", "bone"):
        assert np.abs(windowed(inverted, window).pixels - windowed(chest_scan, window).pixels).mean() < 0.02


def test_ct_uses_the_hounsfield_presets(chest_scan):
    import dataclasses

    from assistant.app_images import windowed
    from assistant.dicom import WINDOW_PRESETS

    ct = dataclasses.replace(chest_scan, modality="CT")
    assert windowed(ct, "lung").window == WINDOW_PRESETS["lung"]
    assert windowed(chest_scan, "lung").window != WINDOW_PRESETS["lung"]
    with pytest.raises(ValueError, match="unknown window"):
        windowed(chest_scan, "brain")


def test_upload_shows_the_image_findings_and_caption(trained_assistant, tmp_path):
    uploads = [png(tmp_path, "a.png"), png(tmp_path, "b.png")]
    files, study, status, choices, image, note, caption, rows, review = app_report.upload_events(
        trained_assistant, [str(p) for p in uploads], None, "DICOM window", "none")
    assert review == ""  # PNGs carry no DICOM burned-in annotation flag
    assert files is None and len(study) == 2 and not any(p.exists() for p in uploads)
    assert "2 image(s) ready" in status and [value for _, value in choices.choices] == [0, 1]
    assert image.shape == (90, 70) and "Window: DICOM window" in note
    assert len(rows) == 14 and [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)
    assert ["Effusion", rows[[r[0] for r in rows].index("Effusion")][1], "0.69"] in rows
    assert "not measured" in {r[2] for r in rows}
    assert "not a diagnosis" in caption and "0.64" in caption and "frontal" in caption


def test_a_finding_renders_its_heatmap_overlay(trained_assistant, tmp_path):
    study = [trained_assistant.read(png(tmp_path))]
    plain, *_ = app_viewer.render_view(trained_assistant, study, 0, "DICOM window", "none")
    image, note, _, _ = app_viewer.render_view(trained_assistant, study, 0, "DICOM window", "Effusion")
    assert plain.ndim == 2 and image.shape == (90, 70, 3) and "Heatmap: Effusion" in note
    assert (image[..., 0] != image[..., 2]).any()  # coloured where the model looked


def test_viewer_errors_are_one_line(trained_assistant, tmp_path, monkeypatch):
    study = [trained_assistant.read(png(tmp_path))]
    monkeypatch.setattr(trained_assistant, "heatmap", lambda scan, finding: 1 / 0)
    image, note, _, _ = app_viewer.render_view(trained_assistant, study, 0, "lung", "Effusion")
    assert note.startswith("⚠️ The viewer could not render") and "\n" not in note and "Traceback" not in note
    image, note, _, _ = app_viewer.render_view(trained_assistant, study, 0, "brain", "none")
    assert note.startswith("⚠️ unknown window")


def test_without_a_trained_head_the_table_is_empty_and_says_why(assistant, tmp_path):
    study = [assistant.read(png(tmp_path))]
    _, _, caption, rows = app_viewer.render_view(assistant, study, 0, "DICOM window", "none")
    assert rows == [] and "No trained finding head" in caption


# ---- similar prior cases ---------------------------------------------------------------------

from test_retrieval_sources import DIM, stub_text as stub_embed  # noqa: E402  (shared stub)


def stub_embedding():
    from assistant.retrieval import EmbedderSpec

    return EmbedderSpec("stub", "1", DIM), stub_embed


@pytest.fixture
def case_finder(tmp_path):
    from assistant.app_retrieval import CaseFinder, build_case_index

    assert build_case_index(tmp_path / "index-iu", stub_embedding(), limit=40)
    return CaseFinder.open(tmp_path / "index-iu", stub_embedding())


def test_similar_cases_follow_the_draft_and_say_what_they_searched_by(assistant, case_finder, tmp_path,
                                                                      monkeypatch):
    report = case_finder.store.records[0].report  # a draft that repeats an indexed report: a sure match
    monkeypatch.setattr(assistant, "draft_report", lambda *a, **k: iter([f"{DRAFT_LABEL}\n\n{report}"]))
    events = [outputs(e) for e in app_report.draft_events(assistant, [str(png(tmp_path))], "", [],
                                                           cases=case_finder)]
    assert all(e["cases_note"] == app_report.gr.skip() for e in events[:-1])  # only after the draft
    final = events[-1]
    assert final["cases_note"].startswith("3 similar prior case(s)")
    assert "Searched by the drafted findings." in final["cases_note"]
    case_id, similarity, findings, text = final["cases_table"][0]
    assert case_id.startswith("iu-") and 0.6 <= float(similarity) <= 1.0 and text and findings


def test_use_similar_cases_puts_them_into_the_prompt_first(assistant, case_finder, tmp_path, monkeypatch):
    seen = {}

    def fake_draft(scans, indication="", similar=()):
        seen["similar"] = similar
        yield f"{DRAFT_LABEL}\n\nFINDINGS: x"

    monkeypatch.setattr(assistant, "draft_report", fake_draft)
    report = case_finder.store.records[1].report
    events = [outputs(e) for e in app_report.draft_events(assistant, [str(png(tmp_path))], report, [], None,
                                                           True, case_finder)]
    shown = next(e for e in events if e["cases_table"] != app_report.gr.skip())
    assert events.index(shown) < len(events) - 1  # before the draft
    assert [c.report for c in seen["similar"]][0] == report and len(shown["cases_table"]) == len(seen["similar"])
    assert "the drafted findings" not in shown["cases_note"]


def test_no_close_case_and_no_index_are_said_plainly(assistant, case_finder):
    from assistant.app_retrieval import NO_INDEX, find_similar

    far = find_similar(case_finder, "zebra xylophone quantum banana")
    assert far.note.startswith("No close prior case found") and far.rows == [] and far.cases == ()
    assert find_similar(None, "cough").note == NO_INDEX
    assert find_similar(case_finder, "", "").note.startswith("Nothing to search")


def test_a_failed_case_search_does_not_stop_the_draft(assistant, case_finder, tmp_path, monkeypatch):
    monkeypatch.setattr(case_finder, "search", lambda *a, **k: 1 / 0)
    final = outputs(list(app_report.draft_events(assistant, [str(png(tmp_path))], "cough", [], cases=case_finder))[-1])
    assert final["status"].startswith("✅") and final["cases_note"].startswith("⚠️ Similar-case search failed")


def test_case_queries_are_phi_masked_before_embedding(case_finder, monkeypatch):
    from assistant.app_retrieval import find_similar

    seen = []
    monkeypatch.setattr(case_finder, "embed", lambda texts: seen.extend(texts) or stub_embed(texts))
    find_similar(case_finder, "Mr. John Smith, MRN: 48213377, cough since 03/04/2025")
    assert seen and "Smith" not in seen[0] and "48213377" not in seen[0] and "cough" in seen[0]


def test_image_spec_matches_what_index_build_records():
    from assistant.app_retrieval import image_spec
    from assistant.cli_index import image_embedder
    from assistant.config import AssistantConfig

    assert image_spec(AssistantConfig()) == image_embedder(AssistantConfig())[0]
    assert image_spec(AssistantConfig().override({"vision.weights": None})) is None


def test_an_image_indexed_case_store_is_queried_by_the_study_vector(trained_assistant, tmp_path):
    from assistant.app_retrieval import CaseFinder, find_similar, image_spec
    from assistant.retrieval import Case, CaseIndex, IndexSpec

    scan = trained_assistant.read(png(tmp_path))
    spec = image_spec(trained_assistant.config)
    index = CaseIndex(IndexSpec(stub_embedding()[0], spec))
    index.add([Case("case-1", "Findings: clear lungs.", image_vector=trained_assistant.study_vector([scan]))])
    finder = CaseFinder(index, stub_embedding(), spec)
    lookup = find_similar(finder, "", "", lambda: trained_assistant.study_vector([scan]))
    assert finder.uses_images and lookup.rows[0][0] == "case-1" and "Searched by the image" in lookup.note


# ---- building the indexes once (prepare) -----------------------------------------------------

def test_indexes_are_built_once_and_atomically(tmp_path):
    from assistant.app_retrieval import CASE_INDEX, build_once, default_index

    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "manifest.json").write_text("{}")

    assert default_index(tmp_path, CASE_INDEX) is None
    assert build_once(tmp_path / CASE_INDEX, build) and not build_once(tmp_path / CASE_INDEX, build)
    assert len(calls) == 1 and default_index(tmp_path, CASE_INDEX) == tmp_path / CASE_INDEX

    def broken(folder):
        (folder / "half.faiss").write_text("x")
        raise KeyboardInterrupt  # an interrupted build

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "other", broken)
    assert not (tmp_path / "other").exists() and [p.name for p in tmp_path.iterdir()] == [CASE_INDEX]


def test_a_killed_build_leaves_nothing_behind_for_long(tmp_path):
    import os
    import subprocess
    import sys

    from assistant.app_retrieval import build_once

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".index-iu.building-{gone.stdout.strip()}-abc").mkdir()  # SIGKILLed mid-build
    (tmp_path / f".index-iu.building-{os.getpid()}-xyz").mkdir()  # a build still running
    build_once(tmp_path / "index-iu", lambda folder: (folder / "manifest.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".index-iu.building-{os.getpid()}-xyz", "index-iu"]


def test_prepare_builds_missing_indexes_only(tmp_path, monkeypatch):
    import assistant.app_retrieval as retrieval

    built = []
    monkeypatch.setattr(retrieval, "build_case_index", lambda out, emb: built.append(out.name))
    monkeypatch.setattr(retrieval, "build_passage_index", lambda out, emb, say: built.append(out.name))
    (tmp_path / retrieval.CASE_INDEX).mkdir()
    (tmp_path / retrieval.CASE_INDEX / "manifest.json").write_text("{}")
    retrieval.prepare_indexes(tmp_path, None, stub_embedding())
    assert built == [retrieval.PASSAGE_INDEX]


# ---- patient education cites its sources -----------------------------------------------------

@pytest.fixture
def passage_finder(tmp_path):
    from assistant.app_retrieval import PassageFinder, build_passage_index

    records = [{"qid": "q1", "question": "What is asthma?", "focus": "Asthma", "source": "MedlinePlus",
                "url": "https://medlineplus.gov/asthma.html", "answer": "Asthma is a disease of the airways."},
               {"qid": "q2", "question": "What is gout?", "focus": "Gout", "source": "NIAMS",
                "url": "https://www.niams.nih.gov/gout", "answer": "Gout is a kind of arthritis."}]
    assert build_passage_index(tmp_path / "index-medquad", stub_embedding(), records)
    return PassageFinder.open(tmp_path / "index-medquad", stub_embedding())


def test_education_answers_cite_the_retrieved_source(assistant, workflow, passage_finder):
    from assistant.app_retrieval import Retrieval

    assert passage_finder.find("what is asthma?")[0][1] == "MedlinePlus: https://medlineplus.gov/asthma.html"
    assert passage_finder.find("zebra xylophone") == []  # nothing close: cite nothing
    blocks = app.build_app(assistant, workflow, Retrieval(passages=passage_finder))
    educate = next(d for d in blocks.fns.values() if d.api_name == "educate")
    history, _, status = list(educate.fn([], "What is asthma?", "general (about age 14)"))[-1]
    assert "https://medlineplus.gov/asthma.html" in history[-1]["content"] and status.startswith("✅")


def test_an_unexpected_reader_failure_is_one_line(assistant, tmp_path, monkeypatch):
    upload = png(tmp_path, "Jane_Roe.png")
    monkeypatch.setattr(assistant, "read", lambda path: 1 / 0)
    result = app_report.upload_events(assistant, [str(upload)], None, "DICOM window", "none")
    assert result[2] == "⚠️ Image 1 could not be read (ZeroDivisionError); try another export of it."
    assert not upload.exists()


# ---- red flags before the model queue ------------------------------------------------------------

EMERGENCY = "crushing chest pain radiating to my left arm and sweating"


def triage_flags(history, message):
    from assistant.pipeline import red_flag_text

    return red_flag_text("triage", history, message)


def test_red_flags_first_shows_the_banner_without_touching_the_model(assistant, monkeypatch):
    from assistant.safety import escalation_message, find_red_flags

    monkeypatch.setattr(assistant.vlm, "stream", lambda *a, **k: pytest.fail("the model was called"))
    monkeypatch.setattr(assistant.vlm, "build_inputs", lambda *a, **k: pytest.fail("the model was called"))
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat, status = app.red_flags_first(triage_flags, EMERGENCY, earlier)
    assert chat[:2] == earlier and chat[2] == {"role": "user", "content": EMERGENCY}
    assert chat[3]["content"] == escalation_message(find_red_flags(EMERGENCY))
    assert chat[3]["content"].startswith("🚨 EMERGENCY") and "Safety notice" in status
    import gradio as gr

    assert app.red_flags_first(triage_flags, "mild runny nose for two days", []) == (gr.skip(), gr.skip())


def test_the_model_step_replaces_the_early_banner_and_never_drops_it(assistant):
    shown, _ = app.red_flags_first(triage_flags, EMERGENCY, [])

    def dismissive(history, message):
        assert history == []  # the pending banner turn is not sent to the model as history
        yield "It is probably just indigestion, you can safely wait."
        raise RuntimeError("killed")

    events = list(app.chat_events(dismissive, EMERGENCY, shown, triage_flags))
    for history, _, _ in events:
        assert len(history) == 2 and history[-1]["content"].startswith(shown[-1]["content"].split("\n")[0])
        assert history[-1]["content"].count("🚨 EMERGENCY") == 1 and "indigestion" not in history[-1]["content"]
    real = list(app.chat_events(lambda h, m: assistant.triage(h, m), EMERGENCY, shown, triage_flags))[-1][0]
    assert len(real) == 2 and real[-1]["content"].count("🚨 EMERGENCY") == 1 and DRAFT_LABEL in real[-1]["content"]


def test_every_model_event_shares_one_configured_concurrency_group(tiny_vlm, workflow):
    import dataclasses

    config = dataclasses.replace(tiny_vlm.config, app=dataclasses.replace(tiny_vlm.config.app,
                                                                          max_concurrent_generations=3))
    tiny_vlm.config = config
    blocks = app.build_app(Assistant(tiny_vlm), workflow)
    fns = list(blocks.fns.values())
    model = [f for f in fns if f.concurrency_id == app.MODEL_QUEUE]
    assert {"draft_report", "triage", "summarize", "educate"} <= {f.api_name for f in model}
    assert all(f.concurrency_limit == 3 for f in model)
    early = [f for f in fns if f.fn is not None and f.queue is False]
    assert [f.fn.__name__ for f in early] == ["on_flags"] * 3
    assert all(f.api_visibility == "private" for f in early)  # not an API endpoint of its own


# ---- image check and burned-in pixels in the draft tab -------------------------------------------

def low_probabilities(assistant, monkeypatch, value=0.01):
    import dataclasses

    import torch

    encode = assistant.vision.encode
    monkeypatch.setattr(assistant.vision, "encode", lambda pixel_values: dataclasses.replace(
        out := encode(pixel_values), finding_probs=torch.full_like(out.finding_probs, value)))


def test_an_unsupported_finding_is_flagged_under_the_draft_and_stored_without_text(trained_assistant, workflow,
                                                                                   tmp_path, monkeypatch):
    import json

    from assistant.guard import NOTE_HEADER
    from assistant.safety import label_draft

    low_probabilities(trained_assistant, monkeypatch)
    monkeypatch.setattr(trained_assistant, "draft_report",
                        lambda *a, **k: iter([label_draft("FINDINGS: Large right pleural effusion.")]))
    events = [outputs(e) for e in app_report.draft_events(trained_assistant, [str(png(tmp_path))], "", [])]
    assert events[0]["image_check"] == ""  # a new draft clears the last one's check
    done = events[-1]
    assert done["image_check"].startswith(NOTE_HEADER) and done["image_check"].startswith("Image check")
    assert "uncertain: the image evidence does not support 'pleural effusion' (p=0.01)" in done["image_check"]
    assert done["checked"]["flags"] == [{"kind": "unsupported", "finding": "Pleural Effusion",
                                         "nih_findings": ["Effusion"], "probability": 0.01, "validated": True}]
    _, draft_id, _ = app_report.record_draft(workflow, "alice", done["chat"], events[0]["study"], done["checked"])
    stored = workflow.store.get_draft(draft_id, "alice").metadata
    assert stored["image_check"] == done["checked"] and "Large" not in json.dumps(stored)


def test_a_draft_the_image_supports_gets_a_clear_image_check(trained_assistant, tmp_path, monkeypatch):
    from assistant.safety import label_draft

    low_probabilities(trained_assistant, monkeypatch, 0.3)
    monkeypatch.setattr(trained_assistant, "draft_report",
                        lambda *a, **k: iter([label_draft("FINDINGS: Small right pleural effusion.")]))
    done = outputs(list(app_report.draft_events(trained_assistant, [str(png(tmp_path))], "", []))[-1])
    assert done["image_check"] == app_report.IMAGE_CHECK_CLEAR and done["checked"]["flags"] == []


def test_without_a_finding_head_the_image_check_says_so(assistant, tmp_path):
    done = outputs(list(app_report.draft_events(assistant, [str(png(tmp_path))], "", []))[-1])
    assert done["image_check"] == app_report.IMAGE_CHECK_OFF and done["checked"] is None


def test_burned_in_annotation_is_a_one_line_warning_in_the_draft_tab(assistant, tmp_path):
    import pydicom

    from conftest import CHEST_DICOM

    ds = pydicom.dcmread(CHEST_DICOM)
    ds.BurnedInAnnotation = "YES"
    flagged = tmp_path / "burned.dcm"
    ds.save_as(flagged)
    result = app_report.upload_events(assistant, [str(flagged)], None, "DICOM window", "none")
    assert result[-1].startswith("⚠️ Image 1: the DICOM may show patient text burned into the pixels")
    assert "\n" not in result[-1] and not flagged.exists()
    ds.BurnedInAnnotation = "NO"
    ds.save_as(flagged)
    events = [outputs(e) for e in app_report.draft_events(assistant, [str(flagged)], "", [])]
    assert events[0]["pixel_note"] == ""


def test_fhir_upload_fills_the_message_with_deidentified_text(tmp_path):
    import shutil
    from pathlib import Path

    upload = tmp_path / "bundle.json"
    shutil.copy(Path(__file__).parent / "data" / "fhir_bundle_one_patient.json", upload)
    cleared, text, status = app.record_text_from_upload([str(upload)])
    assert cleared is None and "Record loaded" in status
    assert text.strip() and "Quigleyton" not in text and "Marisol" not in text and "1961" not in text
    assert not upload.exists()  # the upload is deleted once read


def test_malformed_record_upload_is_one_line_and_deleted(tmp_path):
    upload = tmp_path / "record.json"
    upload.write_text("{not json")
    cleared, text, status = app.record_text_from_upload([str(upload)])
    assert status.startswith("⚠️") and "\n" not in status and "Traceback" not in status
    assert not upload.exists()


def test_summary_tab_has_a_record_upload(assistant, workflow):
    config = app.build_app(assistant, workflow).get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert "summarize-upload" in ids
