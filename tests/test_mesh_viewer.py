"""The textured-mesh viewer page (``jointdiff view model.glb``): self-contained, and — in
headless Chromium with software WebGL (the session's one browser, tests/conftest.py) —
drawing the model's texture, orbiting on a drag and zooming on the wheel.

The test model is a cube built in code with trimesh: three faces map to the red half of a
two-colour texture, three to the blue half; shown unlit, the page must draw those colours.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from viewer_pages import canvas_pixels, open_page

from jointdiff.cli import main
from jointdiff.surfaces import mesh_viewer
from jointdiff.utils.errors import ConfigError

RED, BLUE = (220, 40, 40), (40, 60, 220)
BACKGROUND = tuple(int(mesh_viewer.BACKGROUND[i : i + 2], 16) for i in (1, 3, 5))
ASSETS = Path(mesh_viewer.__file__).parent / "assets" / "viewer"

# The cube's 6 faces as (normal axis, sign); 4 corners each, counter-clockwise seen from outside.
FACES = [(0, 1), (1, 1), (2, 1), (0, -1), (1, -1), (2, -1)]


def cube_glb(path: Path) -> Path:
    """A unit cube with a 64×64 texture, left half RED, right half BLUE: faces +x, +y, +z
    sample the red half, -x, -y, -z the blue half (UVs kept off the boundary)."""
    trimesh = pytest.importorskip("trimesh")
    vertices, faces, uvs = [], [], []
    for index, (axis, sign) in enumerate(FACES):
        u_axis, v_axis = [(1, 2), (2, 0), (0, 1)][axis]
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        for a, b in corners:
            point = [0.0, 0.0, 0.0]
            point[axis], point[u_axis], point[v_axis] = 0.5 * sign, 0.5 * a * sign, 0.5 * b
            vertices.append(point)
            left = 0.05 if index < 3 else 0.55
            uvs.append((left + 0.4 * (a + 1) / 2, 0.05 + 0.9 * (b + 1) / 2))
        base = 4 * index
        faces += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[:, :32], texture[:, 32:] = RED, BLUE
    material = trimesh.visual.material.PBRMaterial(  # white factor: the texture's colours as they are
        baseColorTexture=Image.fromarray(texture), baseColorFactor=[255, 255, 255, 255]
    )
    visual = trimesh.visual.TextureVisuals(uv=np.array(uvs), material=material)
    mesh = trimesh.Trimesh(np.array(vertices), np.array(faces), visual=visual, process=False)
    assert (np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center) > 0).all()  # wound outward
    path.write_bytes(mesh.export(file_type="glb"))
    return path


@pytest.fixture
def cube(tmp_path):
    return cube_glb(tmp_path / "cube.glb")


# ---- the page ----------------------------------------------------------------------------


def test_page_is_self_contained_and_embeds_the_glb(cube):
    page = mesh_viewer.mesh_viewer_html(cube)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)  # nothing fetched
    assert "<script src" not in page and "<link" not in page
    glb = re.search(r'<script type="text/plain" id="glb">([A-Za-z0-9+/=]+)</script>', page)
    assert glb and base64.b64decode(glb.group(1)) == cube.read_bytes()
    for name in ("three.core.min.js", "three.module.min.js", *mesh_viewer.ADDONS):
        assert (ASSETS / name).read_text(encoding="utf-8") in page
    provenance = (ASSETS / "PROVENANCE.md").read_text(encoding="utf-8")
    assert all(name in provenance for name in mesh_viewer.ADDONS)


def test_bad_models_and_pages_are_refused_in_one_line(cube, tmp_path):
    cases = {
        tmp_path / "missing.glb": "does not exist",
        cube.with_suffix(".obj"): "must be a binary glTF",
        tmp_path / "text.glb": "no 'glTF' header",
        tmp_path / "short.glb": "not a valid glTF 2.0 binary",
    }
    cube.with_suffix(".obj").write_text("v 0 0 0\n")
    (tmp_path / "text.glb").write_text("not a model, just some text")
    (tmp_path / "short.glb").write_bytes(cube.read_bytes()[:-4])  # the header's length no longer fits
    for path, words in cases.items():
        with pytest.raises(ConfigError, match=words) as error:
            mesh_viewer.write_mesh_viewer(path, tmp_path / "page.html")
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="page.txt"):
        mesh_viewer.write_mesh_viewer(cube, tmp_path / "page.txt")
    with pytest.raises(ConfigError, match="fov_deg"):
        mesh_viewer.mesh_viewer_html(cube, fov_deg=170)
    assert not (tmp_path / "page.html").exists()


def test_an_existing_page_is_replaced_only_with_overwrite(cube, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("mine")
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):
        mesh_viewer.write_mesh_viewer(cube, page)
    assert page.read_text() == "mine"
    mesh_viewer.write_mesh_viewer(cube, page, overwrite=True)
    assert page.read_text(encoding="utf-8") == mesh_viewer.mesh_viewer_html(cube)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.glb", "page.html"]  # no temporary left


def test_cli_view_glb_keeps_existing_pages_unless_overwrite(cube, tmp_path, capsys):
    expected = mesh_viewer.mesh_viewer_html(cube)
    assert main(["view", str(cube)]) == 0  # next to the model, with .html
    assert cube.with_suffix(".html").read_text(encoding="utf-8") == expected
    capsys.readouterr()
    assert main(["view", str(cube)]) == 0
    assert (tmp_path / "cube-1.html").read_text(encoding="utf-8") == expected
    assert "--overwrite" in capsys.readouterr().err
    cube.with_suffix(".html").write_text("old")
    assert main(["view", str(cube), "--overwrite", "-o", str(cube.with_suffix(".html"))]) == 0
    assert cube.with_suffix(".html").read_text(encoding="utf-8") == expected
    assert main(["view", str(tmp_path / "nope.glb")]) == 2
    assert main(["view", str(cube), "--serve"]) == 2
    err = capsys.readouterr().err
    assert "nope.glb" in err and "--serve" in err
    cube.with_suffix(".obj").write_text("v 0 0 0\n")
    assert main(["view", str(cube.with_suffix(".obj"))]) == 2  # a mesh, but not a .glb
    assert "must be a binary glTF (.glb)" in capsys.readouterr().err


# ---- in the browser ----------------------------------------------------------------------


def share_of(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: float = 6) -> float:
    """The fraction of pixels within ``tolerance`` (per channel) of ``colour``."""
    return float((np.abs(pixels - np.array(colour, np.float32)).max(axis=-1) <= tolerance).mean())


def test_viewer_draws_the_texture_and_orbits_and_zooms(browser, cube, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    browser.get_log("browser")  # drop what earlier pages logged
    page = mesh_viewer.write_mesh_viewer(cube, tmp_path / "cube.html")
    state = open_page(browser, page.as_uri())
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    before = canvas_pixels(browser)
    background = share_of(before, BACKGROUND)
    # from azimuth 30°, elevation 20° the +x, +y, +z faces show: the red half of the texture
    assert 0.3 < background < 0.95 and share_of(before, RED) > 0.05 and share_of(before, BLUE) == 0
    assert abs(state["azimuth_deg"] - 30) < 0.5 and abs(state["elevation_deg"] - 20) < 0.5

    canvas = browser.find_element("tag name", "canvas")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(100, 0).release().perform()
    turned = browser.execute_script("return window.jointdiffViewer")
    # OrbitControls turns a full circle per canvas height of drag; dragging right orbits left
    height = browser.execute_script("return document.querySelector('canvas').clientHeight")
    assert abs(turned["azimuth_deg"] - (30 - 360 * 100 / height)) < 2 and abs(turned["elevation_deg"] - 20) < 0.5
    after = canvas_pixels(browser)
    assert share_of(after, BLUE) > 0.05 and share_of(after, RED) > 0.02  # now the -x face (blue) and +z (red)
    assert np.abs(after - before).mean() > 5

    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -500).perform()
    zoomed = browser.execute_script("return window.jointdiffViewer")
    assert zoomed["distance"] < 0.9 * turned["distance"]
    assert share_of(canvas_pixels(browser), BACKGROUND) < share_of(after, BACKGROUND) - 0.05  # the model grew
