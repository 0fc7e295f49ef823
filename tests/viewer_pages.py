"""Helpers of the browser tests of jointdiff's viewer pages (the 360° page and the mesh page):
open a page and wait for it to say it is ready, read what its canvas drew."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
from PIL import Image


def open_page(driver, url: str, timeout_s: float = 60) -> dict:
    """Load ``url`` and wait until the page's ``window.jointdiffViewer`` is ready (its state)
    or reports an error (the test fails with it)."""
    driver.get(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = driver.execute_script("return window.jointdiffViewer || null")
        if state and (state.get("ready") or state.get("error")):
            assert "error" not in state, state["error"]
            return state
        time.sleep(0.1)
    raise AssertionError(f"the viewer at {url} did not become ready in {timeout_s:g} s")


def canvas_pixels(driver) -> np.ndarray:
    """The page's WebGL canvas as ``(H, W, 3)`` float32 RGB in [0, 255]."""
    url = driver.execute_script("return document.querySelector('canvas').toDataURL('image/png')")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"), np.float32)
