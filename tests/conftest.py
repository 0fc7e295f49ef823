"""Shared fixtures: everything offline, tiny models built in code with fixed seeds."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# One thread per test process: pytest-xdist runs one process per core, and OpenMP threads
# spinning against each other on a busy machine cost far more than they gain.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The built-in tiny SD pipeline on the CPU (shared; tests must not mutate it)."""
    from jointdiff.models.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="float32")


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WINDOW_PX = (640, 480)  # (w, h) of the browser window


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium with software WebGL (SwiftShader), a fresh profile, no network, its
    console kept (``driver.get_log("browser")``); one for the whole session (the viewer tests)."""
    import shutil
    import tempfile

    if os.environ.get("JOINTDIFF_SKIP_BROWSER") == "1":
        pytest.skip("JOINTDIFF_SKIP_BROWSER=1")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing: run scripts/install-browser.sh "
            "(or set JOINTDIFF_SKIP_BROWSER=1 to skip the browser tests)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install selenium (or set JOINTDIFF_SKIP_BROWSER=1)")
    profile = tempfile.mkdtemp(prefix="jointdiff-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}", f"--window-size={WINDOW_PX[0]},{WINDOW_PX[1]}", "--force-device-scale-factor=1",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def fresh_tiny_pipeline():
    """A private tiny pipeline a test may modify (e.g. swap the scheduler)."""
    from jointdiff.models.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="float32")


def make_job(pipeline, geometry="strip", geometry_options=None, prompt="a photo of a city", **engine_kwargs):
    """A JointDiffusion of built-in plugins created by name."""
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    geometry_obj = create("geometry", geometry, **(geometry_options or {}))
    text = create("conditioner", "text", prompt=prompt, guidance_scale=7.5)
    return JointDiffusion(pipeline, geometry_obj, [text], **engine_kwargs)


def assert_close_to_stock(ours, stock, rtol: float = 1e-4) -> None:
    """Largest difference from a stock pipeline's result within ``rtol`` of its largest value."""
    diff = (ours - stock).abs().max().item()
    scale = stock.abs().max().item()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} vs max |stock| {scale:.3g}"
