"""The report tab's image viewer: one image of the study at a time with a window preset, the
finding probabilities of the shipped vision encoder, and a Grad-CAM heatmap for a chosen finding.

What is shown is computed in `assistant.app_images` and `Assistant.findings/heatmap`; this module
only lays out the components and wires their events. Viewer events do not join the model queue:
the vision encoder is small (milliseconds per image), so the viewer stays usable while a draft
streams. The tower is the LLM's own; a heatmap briefly switches it to eager attention (the only
kind that returns attention weights), which changes the kernel but not the result of a draft's
concurrent image encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gradio as gr

from assistant.app_images import OWN_WINDOW, WINDOWS, display_image, finding_caption, finding_metrics, \
    finding_rows, window_caption
from assistant.cli import user_message
from assistant.pipeline import Assistant, view_name

log = logging.getLogger("app")
NO_HEATMAP = "none"
TABLE_HEADERS = ["finding", "probability", "held-out AUROC"]


@dataclass(frozen=True)
class Viewer:
    image_choice: gr.Radio
    window: gr.Radio
    finding: gr.Dropdown
    image: gr.Image
    window_note: gr.Markdown
    caption: gr.Markdown
    table: gr.Dataframe

    @property
    def controls(self) -> list:
        return [self.image_choice, self.window, self.finding]

    @property
    def outputs(self) -> list:
        """What render_view fills, in its order."""
        return [self.image, self.window_note, self.caption, self.table]


def viewer_panel(assistant: Assistant) -> Viewer:
    findings = list(assistant.vision.findings) if assistant.vision is not None else []
    image_choice = gr.Radio([], label="Image", elem_id="viewer-image")
    window = gr.Radio(list(WINDOWS), value=OWN_WINDOW, label="Window preset", elem_id="viewer-window")
    # No share button: pixels stay on this server (download of the de-identified view is fine).
    image = gr.Image(label="Viewer (de-identified pixels)", type="numpy", format="png", interactive=False,
                     height=420, buttons=["fullscreen", "download"], elem_id="viewer")
    window_note = gr.Markdown(elem_id="viewer-window-note")
    finding = gr.Dropdown([NO_HEATMAP, *findings], value=NO_HEATMAP, label="Heatmap (Grad-CAM) for finding",
                          interactive=bool(findings), elem_id="viewer-heatmap")
    caption = gr.Markdown(elem_id="findings-caption")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True, column_widths=["44%", "26%", "30%"],
                         elem_id="findings-table")
    return Viewer(image_choice, window, finding, image, window_note, caption, table)


def wire_viewer(viewer: Viewer, assistant: Assistant, study: gr.State) -> None:
    def on_change(scans, index, window, finding):
        return render_view(assistant, scans, index, window, finding)

    for control in viewer.controls:  # `input`: user changes only; a new study renders itself
        control.input(on_change, inputs=[study, *viewer.controls], outputs=viewer.outputs, api_name=False)


def image_choices(scans) -> gr.Radio:
    """The image selector for a new study: '1 · PA view', '2 · lateral view', ..."""
    labels = [(f"{n} · {view_name(scan)}", n - 1) for n, scan in enumerate(scans or [], start=1)]
    return gr.Radio(choices=labels, value=0 if labels else None)


def render_view(assistant: Assistant, scans, index, window: str, finding: str) -> tuple:
    """(image, window note, finding caption, finding rows) for image `index` of the study.

    A failure is one line under the image, never a traceback, and leaves the image as it was.
    """
    if not scans:
        return None, "", "", []
    scan = scans[min(max(int(index or 0), 0), len(scans) - 1)]
    metrics = finding_metrics(assistant.config.vision)
    try:
        heat = assistant.heatmap(scan, finding) if finding and finding != NO_HEATMAP else None
        image = display_image(scan, window or OWN_WINDOW, heat)
        note = window_caption(scan, window or OWN_WINDOW)
        rows = finding_rows(assistant.findings(scan), metrics)
    except ValueError as err:
        return gr.skip(), f"⚠️ {user_message(err)}", gr.skip(), gr.skip()
    except Exception as err:  # the session must stay usable
        log.error("viewer rendering failed: %s", type(err).__name__)
        return gr.skip(), f"⚠️ The viewer could not render this image ({user_message(err)}).", gr.skip(), gr.skip()
    caption = finding_caption(metrics, assistant.config.vision.weights,
                              scan.view_position, trained=assistant.vision is not None)
    if heat is not None:
        note += f" Heatmap: {finding.replace('_', ' ')} (relative: where the model looked, not a lesion outline)."
    return image, note, caption, rows

