"""The 360° viewer page: self-contained, served on localhost only, and — in headless Chromium
with software WebGL — rendering the view that ``py360convert.e2p`` computes for the same
yaw, pitch and field of view, before and after a drag.

The browser tests need the Debian packages ``chromium`` and ``chromium-driver``
(``scripts/install-browser.sh``) and the ``selenium`` package; set ``JOINTDIFF_SKIP_BROWSER=1``
to skip them where no browser can be installed.
"""

from __future__ import annotations

import base64
import io
import math
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import py360convert
import pytest
from PIL import Image
from viewer_pages import canvas_pixels, open_page

from jointdiff.cli import main
from jointdiff.surfaces import viewer
from jointdiff.utils.errors import ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "equirect_demo_1024x512.png"


# ---- the page ----------------------------------------------------------------------------


def test_page_is_self_contained_and_embeds_the_image_bytes():
    page = viewer.viewer_html(FIXTURE)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)  # nothing fetched
    assert "<script src" not in page and "<link" not in page
    match = re.search(r'"data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1)) == FIXTURE.read_bytes()
    for name in ("three.core.min.js", "three.module.min.js"):
        vendored = (Path(viewer.__file__).parent / "assets" / "viewer" / name).read_text(encoding="utf-8")
        assert vendored in page
    license_text = (Path(viewer.__file__).parent / "assets" / "viewer" / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in license_text


def test_page_downscales_panoramas_wider_than_webgl_textures(tmp_path):
    Image.new("RGB", (400, 200), (10, 200, 30)).save(tmp_path / "wide.png")
    url = viewer.pano_data_url(tmp_path / "wide.png", max_width_px=100)
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        assert image.size == (100, 50) and image.getpixel((50, 25)) == (10, 200, 30)


def test_write_viewer_and_errors(tmp_path):
    page = viewer.write_viewer(FIXTURE, tmp_path / "page.html")
    assert page.read_text(encoding="utf-8") == viewer.viewer_html(FIXTURE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
    with pytest.raises(ConfigError, match="missing.png"):
        viewer.write_viewer(tmp_path / "missing.png", tmp_path / "x.html")
    with pytest.raises(ConfigError, match="page.txt"):
        viewer.write_viewer(FIXTURE, tmp_path / "page.txt")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ConfigError, match="is not an image Pillow can read"):
        viewer.write_viewer(tmp_path / "notes.png", tmp_path / "x.html")
    with pytest.raises(ConfigError, match="fov_deg"):
        viewer.viewer_html(FIXTURE, fov_deg=170)


def test_cli_view_writes_the_page_and_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["view", str(FIXTURE), "--output", str(tmp_path / "v.html")]) == 0
    assert (tmp_path / "v.html").read_text(encoding="utf-8") == viewer.viewer_html(FIXTURE)
    (tmp_path / "v.html").write_text("mine")
    assert main(["view", str(FIXTURE), "--output", str(tmp_path / "v.html")]) == 0  # kept: the next free name
    assert (tmp_path / "v.html").read_text() == "mine" and (tmp_path / "v-1.html").is_file()
    assert "--overwrite" in capsys.readouterr().err
    assert main(["view", str(FIXTURE), "--output", str(tmp_path / "v.html"), "--overwrite"]) == 0
    assert (tmp_path / "v.html").read_text(encoding="utf-8") == viewer.viewer_html(FIXTURE)
    assert main(["view", str(tmp_path / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_server_listens_on_localhost_only_and_serves_the_page():
    server = viewer.make_server(FIXTURE, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.read().decode("utf-8") == viewer.viewer_html(FIXTURE)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    finally:
        server.shutdown()
        server.server_close()


# ---- in the browser ----------------------------------------------------------------------


def reference_view(pixels: np.ndarray, state: dict) -> np.ndarray:
    """py360convert's perspective view of the fixture for the viewer's yaw, pitch and
    (vertical) field of view, at the canvas size."""
    h, w = pixels.shape[:2]
    v_fov = state["fov_deg"]
    h_fov = math.degrees(2 * math.atan(math.tan(math.radians(v_fov) / 2) * w / h))
    pano = np.asarray(Image.open(FIXTURE).convert("RGB"), np.float32)
    return py360convert.e2p(pano, (h_fov, v_fov), state["yaw_deg"], state["pitch_deg"], (h, w), mode="bilinear")


def test_viewer_renders_the_panorama_and_dragging_turns_the_view(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    page = viewer.write_viewer(FIXTURE, tmp_path / "view.html")
    state = open_page(browser, page.as_uri(), timeout_s=30)
    before = canvas_pixels(browser)
    assert before.std() > 20 and len(np.unique(before.reshape(-1, 3), axis=0)) > 50  # not blank
    # Sphere tessellation and GPU filtering differ from e2p's exact sampling only at edges.
    assert np.abs(before - reference_view(before, state)).mean() < 3

    canvas = browser.find_element("tag name", "canvas")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(-120, 60).release().perform()
    state = browser.execute_script("return window.jointdiffViewer")
    assert state["yaw_deg"] > 10 and state["pitch_deg"] > 5  # dragged left and down: look right and up
    after = canvas_pixels(browser)
    assert np.abs(after - before).mean() > 20
    assert np.abs(after - reference_view(after, state)).mean() < 3


def test_wheel_zooms_and_the_served_page_renders(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    server = viewer.make_server(FIXTURE, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        state = open_page(browser, f"http://127.0.0.1:{server.server_address[1]}/", timeout_s=30)
        canvas = browser.find_element("tag name", "canvas")
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -400).perform()
        zoomed = browser.execute_script("return window.jointdiffViewer")
        assert zoomed["fov_deg"] < state["fov_deg"] - 5
        pixels = canvas_pixels(browser)
        assert np.abs(pixels - reference_view(pixels, zoomed)).mean() < 3
    finally:
        server.shutdown()
        server.server_close()
