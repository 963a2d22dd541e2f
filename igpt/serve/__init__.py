"""``igpt serve``: a local web page to complete, infill and sample images with a checkpoint.

``engine`` holds what the page computes (no web library needed, so it is tested without a browser);
``page`` lays it out with Gradio, the optional ``serve`` extra (imported when a page is built), and
launches it.
"""

from igpt.serve.engine import Draw, Engine, Picture
from igpt.serve.page import build_page, launch

__all__ = ["Draw", "Engine", "Picture", "build_page", "launch"]
