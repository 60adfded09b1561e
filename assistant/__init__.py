"""Multimodal clinical assistant (research use only; every output is a draft for clinician review).

The library never imports gradio; `app.py` is the browser front end.
"""

__version__ = "0.1.0"
