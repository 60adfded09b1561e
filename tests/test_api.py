"""Every mode through the Gradio HTTP API with gradio_client (in-process app, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import app
from assistant.dialogue import message_text
from assistant.pipeline import Assistant
from assistant.safety import DRAFT_LABEL
from assistant.store import Store
from assistant.workflow import Workflow


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    from assistant.model import ClinicalVLM
    from conftest import tiny_config, tiny_language_model, tiny_tokenizer
    from test_browser import free_port

    folder = tmp_path_factory.mktemp("api")
    vlm = ClinicalVLM.from_parts(tiny_language_model(), tiny_tokenizer(), tiny_config())
    blocks = app.build_app(Assistant(vlm), Workflow(Store.open(folder / "db.sqlite"), folder / "exports"))
    blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                  ssr_mode=False)
    try:
        yield Client(blocks.local_url, verbose=False), folder
    finally:
        blocks.close()


def test_the_api_lists_every_mode(client):
    api = client[0].view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/draft_report", "/triage", "/summarize", "/educate", "/accept_report", "/export_report",
            "/history"} <= set(api)


@pytest.mark.parametrize("endpoint,args", [
    ("/triage", (None, "sore throat for two days")),
    ("/summarize", (None, "Type 2 diabetes. Metformin 500 mg.")),
    ("/educate", (None, "What is asthma?", "general (about age 14)")),
])
def test_text_modes(client, endpoint, args):
    history, box, status = client[0].predict(*args, api_name=endpoint)
    assert message_text(history[-1]["content"]).startswith(DRAFT_LABEL) and status.startswith("✅")


def test_triage_api_still_returns_the_escalation(client):
    history, box, status = client[0].predict(None, "crushing chest pain radiating to my left arm and sweating",
                                             api_name="/triage")
    answer = message_text(history[-1]["content"])
    assert answer.startswith("🚨 EMERGENCY") and answer.count("🚨 EMERGENCY") == 1 and DRAFT_LABEL in answer
    assert len(history) == 2 and status.startswith("✅")


def test_draft_accept_export_history(client):
    from gradio_client import handle_file

    api, folder = client
    png = folder / "cxr.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(png)
    job = api.submit([handle_file(str(png))], "cough", False, None, api_name="/draft_report")
    chat, status, files, cases_note, cases_table, image_check, pixel_note = job.result()
    assert message_text(chat[-1]["content"]).startswith(DRAFT_LABEL) and status.startswith("✅")
    assert image_check.startswith("Image check") and pixel_note == ""  # a PNG has no burned-in flag
    assert "run `python -m assistant prepare`" in cases_note  # this app was built without a case index
    # accept/export act on the browser session's draft (session state is not part of the API, so
    # one API call cannot accept another's draft): through the API they refuse with a clear message.
    status = api.predict("text", api_name="/accept_report")
    assert status.startswith("⚠️ Draft a report first")
    _, message = api.predict("markdown", api_name="/export_report")
    assert message.startswith("⚠️ Accept")
    rows = api.predict(api_name="/history")
    assert isinstance(rows, dict) and "data" in rows
