"""``igpt serve``: a local web page to complete, infill and sample images with a checkpoint.

``engine`` holds what the page computes (no web library needed, so it is tested without a browser);
``page`` lays it out with Gradio, the optional ``serve`` extra (imported when a page is built); ``server``
checks the address, runs the page with a temporary folder of its own for Gradio's files, and removes it when
the server stops.
"""

from igpt.serve.engine import Draw, Engine, Picture
from igpt.serve.page import build_page
from igpt.serve.server import Served, check_address, launch, serving

__all__ = ["Draw", "Engine", "Picture", "Served", "build_page", "check_address", "launch", "serving"]
