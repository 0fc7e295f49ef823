"""A self-contained HTML page that shows an equirectangular panorama as a draggable 360° view.

The page carries everything inline (three.js r185, vendored in ``assets/viewer`` with its MIT
license, and the image as base64), so it works offline, opened straight from a file.
The panorama is textured on the inside of a sphere; the camera sits at its centre.

View conventions: ``yaw_deg`` 0 looks at the image's centre column, positive yaw turns
right (toward larger image columns); ``pitch_deg`` positive looks up; ``fov_deg`` is the
vertical field of view. Dragging moves the scene with the pointer; the wheel zooms.
The page exposes ``window.jointdiffViewer`` (``{ready, yaw_deg, pitch_deg, fov_deg}``, or
``{error}``) for scripts and tests.
"""

from __future__ import annotations

import base64
import html
import http.server
import io
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from PIL import Image

from jointdiff.utils import images
from jointdiff.utils.errors import ConfigError

THREE_CORE = "three.core.min.js"
THREE_MODULE = "three.module.min.js"
MAX_TEXTURE_WIDTH_PX = 8192  # the widest texture WebGL implementations commonly accept
FORMAT_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

PAGE_HEAD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
html, body {{ margin: 0; height: 100%; overflow: hidden; background: {background}; }}
canvas {{ display: block; cursor: grab; touch-action: none; }}
canvas:active {{ cursor: grabbing; }}
#hud {{ position: fixed; left: 8px; bottom: 8px; padding: 4px 8px; border-radius: 4px;
  font: 12px sans-serif; color: #eee; background: rgba(0, 0, 0, 0.55); user-select: none; }}
</style>
</head>
<body>
"""
"""The start of every viewer page (the 360° page and the mesh page): a full-window canvas
under a small heads-up line."""

PAGE = PAGE_HEAD.replace("{background}", "#000") + """<div id="hud">{title} · drag to look around · wheel to zoom · <span id="fov"></span></div>
<script type="text/plain" id="three-core">{three_core}</script>
<script type="text/plain" id="three-module">{three_module}</script>
<script type="module">
const PANO = {pano_json};
const VIEW = {{ yaw_deg: {yaw_deg}, pitch_deg: {pitch_deg}, fov_deg: {fov_deg} }};
const state = (window.jointdiffViewer = {{ ready: false, ...VIEW }});
const hud = document.getElementById("hud");
// three.module.min.js imports "./three.core.min.js": point it at a blob URL of the inlined copy.
const script = (id) => document.getElementById(id).textContent;
const blobUrl = (text) => URL.createObjectURL(new Blob([text], {{ type: "text/javascript" }}));
try {{
  const core = blobUrl(script("three-core"));
  const THREE = await import(blobUrl(script("three-module").split('"./{core_name}"').join(JSON.stringify(core))));
  const renderer = new THREE.WebGLRenderer({{ antialias: true, preserveDrawingBuffer: true }});
  renderer.setPixelRatio(window.devicePixelRatio);
  renderer.setSize(window.innerWidth, window.innerHeight);
  document.body.appendChild(renderer.domElement);
  const camera = new THREE.PerspectiveCamera(state.fov_deg, window.innerWidth / window.innerHeight, 1, 1000);
  // Mirrored in x so the image is seen unmirrored from inside; its centre (u = 0.5) lies at -x.
  const sphere = new THREE.SphereGeometry(500, 120, 60);
  sphere.scale(-1, 1, 1);
  const texture = await new THREE.TextureLoader().loadAsync(PANO);
  texture.colorSpace = THREE.SRGBColorSpace;
  const scene = new THREE.Scene();
  scene.add(new THREE.Mesh(sphere, new THREE.MeshBasicMaterial({{ map: texture }})));
  const rad = THREE.MathUtils.degToRad;
  function render() {{
    state.pitch_deg = Math.max(-89.9, Math.min(89.9, state.pitch_deg));
    state.fov_deg = Math.max(10, Math.min(120, state.fov_deg));
    const yaw = rad(state.yaw_deg), pitch = rad(state.pitch_deg);
    camera.fov = state.fov_deg;
    camera.updateProjectionMatrix();
    camera.lookAt(-Math.cos(pitch) * Math.cos(yaw), Math.sin(pitch), -Math.cos(pitch) * Math.sin(yaw));
    renderer.render(scene, camera);
    document.getElementById("fov").textContent = `FOV ${{state.fov_deg.toFixed(0)}}°`;
  }}
  let drag = null;
  const canvas = renderer.domElement;
  canvas.addEventListener("pointerdown", (e) => {{ drag = {{ x: e.clientX, y: e.clientY }}; canvas.setPointerCapture(e.pointerId); }});
  canvas.addEventListener("pointerup", () => {{ drag = null; }});
  canvas.addEventListener("pointermove", (e) => {{
    if (!drag) return;
    const degPerPx = state.fov_deg / window.innerHeight;  // the scene follows the pointer
    state.yaw_deg -= (e.clientX - drag.x) * degPerPx;
    state.pitch_deg += (e.clientY - drag.y) * degPerPx;
    drag = {{ x: e.clientX, y: e.clientY }};
    render();
  }});
  canvas.addEventListener("wheel", (e) => {{ e.preventDefault(); state.fov_deg += e.deltaY * 0.05; render(); }}, {{ passive: false }});
  window.addEventListener("resize", () => {{
    renderer.setSize(window.innerWidth, window.innerHeight);
    camera.aspect = window.innerWidth / window.innerHeight;
    render();
  }});
  render();
  state.ready = true;
}} catch (error) {{
  state.error = String(error);
  hud.textContent = `The panorama could not be shown: ${{error}}`;
}}
</script>
</body>
</html>
"""


def vendored_text(name: str) -> str:
    """The text of the vendored three.js file ``name`` (``assets/viewer``, see its PROVENANCE.md)."""
    return resources.files("jointdiff.surfaces").joinpath("assets", "viewer", name).read_text(encoding="utf-8")


def pano_data_url(pano_path: str | Path, max_width_px: int = MAX_TEXTURE_WIDTH_PX) -> str:
    """The panorama as a ``data:`` URL: the file's own bytes when it is a PNG, JPEG or WebP
    at most ``max_width_px`` wide, else re-encoded as PNG (downscaled to that width)."""
    path = Path(pano_path)
    opened = images.open_image_file(path, "panorama")
    upright = opened.getexif().get(0x0112) in (None, 1)
    if opened.format in FORMAT_MIME and opened.width <= max_width_px and upright and opened.mode in ("RGB", "RGBA", "L", "P"):
        return f"data:{FORMAT_MIME[opened.format]};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    # Browsers disagree on EXIF orientation in WebGL textures; 16-bit is not a texture format.
    image = images.load_image(opened, "RGB", f"panorama {str(path)!r}")
    if image.width > max_width_px:
        image = image.resize((max_width_px, max(1, round(image.height * max_width_px / image.width))), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def viewer_html(
    pano_path: str | Path, *, yaw_deg: float = 0.0, pitch_deg: float = 0.0, fov_deg: float = 75.0, title: str | None = None
) -> str:
    """The HTML page (one string, no external references) showing ``pano_path``; the
    initial view is ``yaw_deg``/``pitch_deg``/``fov_deg`` (module conventions)."""
    if not 10 <= fov_deg <= 120:
        raise ConfigError(f"fov_deg must be in 10..120, got {fov_deg}")
    core, module = vendored_text(THREE_CORE), vendored_text(THREE_MODULE)
    if any("</script" in text.lower() for text in (core, module)):
        raise ConfigError("a vendored three.js file contains '</script' and cannot be inlined")
    if f'"./{THREE_CORE}"' not in module:
        raise ConfigError(f"the vendored {THREE_MODULE} no longer imports ./{THREE_CORE}; update jointdiff/surfaces/viewer.py")
    return PAGE.format(
        title=html.escape(title if title is not None else Path(pano_path).name),
        three_core=core,
        three_module=module,
        core_name=THREE_CORE,
        pano_json=json.dumps(pano_data_url(pano_path)),
        yaw_deg=float(yaw_deg),
        pitch_deg=float(pitch_deg),
        fov_deg=float(fov_deg),
    )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_viewer(pano_path: str | Path, html_path: str | Path, **view: float) -> Path:
    """Write the self-contained viewer page for ``pano_path`` to ``html_path`` (atomically);
    ``view`` takes :func:`viewer_html`'s ``yaw_deg``, ``pitch_deg``, ``fov_deg``."""
    html_path = Path(html_path)
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"html_path {str(html_path)!r} must end in .html or .htm")
    if not html_path.parent.is_dir():
        raise ConfigError(f"output folder {str(html_path.parent)!r} does not exist")
    page = viewer_html(pano_path, **view)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{html_path.stem}.", suffix=".html", dir=html_path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a page is meant to be shared
        os.replace(tmp, html_path)
    except OSError as error:  # named by the page, never by the temporary file
        raise ConfigError(f"cannot write the viewer page {str(html_path)!r} ({error.strerror or type(error).__name__})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return html_path


def equirect_shape_note(pano_path: str | Path) -> str | None:
    """A sentence when ``pano_path`` is not 2:1 (an equirectangular panorama covers 360° by
    180°, so it is twice as wide as high; another shape shows stretched), else None."""
    with Image.open(pano_path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # shown turned by 90°
            width, height = height, width
    if width != 2 * height:
        return (f"{str(pano_path)!r} is {width}×{height} px, not 2:1: the viewer shows it as a full 360°×180° "
                "sphere, stretched; an equirectangular panorama is twice as wide as high")
    return None


def make_server(pano_path: str | Path, port: int = 8360, **view: float) -> http.server.ThreadingHTTPServer:
    """An HTTP server bound to 127.0.0.1 only (``port`` 0 picks a free one) that answers
    ``GET /`` with the viewer page of ``pano_path``; call ``serve_forever()`` on it."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    page = viewer_html(pano_path, **view).encode("utf-8")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path not in ("/", "/index.html"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: object) -> None:  # quiet: one line per request is noise
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve_viewer(pano_path: str | Path, port: int = 8360, **view: float) -> None:
    """Serve the viewer page of ``pano_path`` at ``http://127.0.0.1:PORT/`` until interrupted."""
    server = make_server(pano_path, port, **view)
    print(f"serving {Path(pano_path).name} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
