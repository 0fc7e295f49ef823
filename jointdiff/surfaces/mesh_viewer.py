"""A self-contained HTML page that shows a textured mesh (a binary glTF, ``.glb``) with orbit
and zoom.

The page carries everything inline: three.js r185 with its ``GLTFLoader`` and
``OrbitControls`` (vendored unchanged in ``assets/viewer`` with their MIT license, see its
PROVENANCE.md) and the GLB itself as base64, so it works offline, opened straight from a
file. The model is shown **unlit**: each material's base colour texture (and factor) is
drawn as it is, because a texture painted by a diffusion model already holds its shading;
lighting it again would darken and tint it.

View conventions: glTF's frame (+y up, the model faces +z). The camera orbits the centre of
the model's bounding box; ``azimuth_deg`` 0 looks from +z, positive turns the camera toward
+x; ``elevation_deg`` positive looks from above; ``fov_deg`` is the vertical field of view.
The first view frames the model's bounding sphere. Dragging orbits, the wheel zooms, the
right button pans (OrbitControls). The page exposes ``window.jointdiffViewer``
(``{ready, azimuth_deg, elevation_deg, distance}``, or ``{error}``) for scripts and tests.
"""

from __future__ import annotations

import base64
import html
import json
import re
import struct
from pathlib import Path

from jointdiff.surfaces.viewer import PAGE_HEAD, THREE_CORE, THREE_MODULE, vendored_text
from jointdiff.utils.errors import ConfigError
from jointdiff.utils.files import write_text_atomic

ADDONS = ("BufferGeometryUtils.js", "SkeletonUtils.js", "GLTFLoader.js", "OrbitControls.js")
"""The vendored three.js add-ons, in the order the page links them (each imports only
``three`` and the ones before it)."""
GLB_MAGIC = b"glTF"
BACKGROUND = "#3a3f44"

PAGE = PAGE_HEAD + """<div id="hud">{title} · drag to orbit · wheel to zoom · right-drag to pan</div>
{scripts}
<script type="text/plain" id="glb">{glb}</script>
<script type="module">
const VIEW = {{ azimuth_deg: {azimuth_deg}, elevation_deg: {elevation_deg}, fov_deg: {fov_deg} }};
const state = (window.jointdiffViewer = {{ ready: false }});
const text = (id) => document.getElementById(id).textContent;
const blobUrl = (source) => URL.createObjectURL(new Blob([source], {{ type: "text/javascript" }}));
// The vendored modules import "three", "./three.core.min.js" and "../utils/*.js": point each
// at a blob URL of its inlined copy.
const urls = {{}};
const link = (source, names) =>
  names.reduce((s, [from, name]) => s.split(from).join(JSON.stringify(urls[name])), source);
try {{
  urls.core = blobUrl(text("three.core.min.js"));
  urls.three = blobUrl(link(text("three.module.min.js"), [['"./{core_name}"', "core"]]));
  const three = [["'three'", "three"]];
  for (const name of {addons}) {{
    urls[name] = blobUrl(link(text(name), [...three, ["'../utils/BufferGeometryUtils.js'", "BufferGeometryUtils.js"],
                                            ["'../utils/SkeletonUtils.js'", "SkeletonUtils.js"]]));
  }}
  const THREE = await import(urls.three);
  const {{ GLTFLoader }} = await import(urls["GLTFLoader.js"]);
  const {{ OrbitControls }} = await import(urls["OrbitControls.js"]);
  const bytes = Uint8Array.from(atob(text("glb").trim()), (c) => c.charCodeAt(0));
  const gltf = await new GLTFLoader().parseAsync(bytes.buffer, "");
  const scene = new THREE.Scene();
  scene.background = new THREE.Color("{background}");
  gltf.scene.traverse((node) => {{
    if (!node.isMesh) return;
    const unlit = (m) => new THREE.MeshBasicMaterial({{ map: m.map, color: m.color, transparent: m.transparent,
      opacity: m.opacity, alphaTest: m.alphaTest, side: m.side, vertexColors: m.vertexColors }});
    node.material = Array.isArray(node.material) ? node.material.map(unlit) : unlit(node.material);
  }});
  scene.add(gltf.scene);
  const renderer = new THREE.WebGLRenderer({{ antialias: true, preserveDrawingBuffer: true }});
  renderer.setPixelRatio(window.devicePixelRatio);
  renderer.setSize(window.innerWidth, window.innerHeight);
  document.body.appendChild(renderer.domElement);
  const sphere = new THREE.Box3().setFromObject(gltf.scene).getBoundingSphere(new THREE.Sphere());
  const radius = sphere.radius > 0 ? sphere.radius : 1;
  const aspect = window.innerWidth / window.innerHeight;
  const camera = new THREE.PerspectiveCamera(VIEW.fov_deg, aspect, radius / 100, radius * 100);
  const distance = 1.15 * radius / Math.sin(THREE.MathUtils.degToRad(VIEW.fov_deg) / 2);  // the sphere fits the height
  const az = THREE.MathUtils.degToRad(VIEW.azimuth_deg), el = THREE.MathUtils.degToRad(VIEW.elevation_deg);
  camera.position.set(Math.sin(az) * Math.cos(el), Math.sin(el), Math.cos(az) * Math.cos(el))
    .multiplyScalar(distance).add(sphere.center);
  const controls = new OrbitControls(camera, renderer.domElement);
  controls.target.copy(sphere.center);
  controls.minDistance = radius * 0.2;
  controls.maxDistance = radius * 50;
  function render() {{
    renderer.render(scene, camera);
    state.azimuth_deg = THREE.MathUtils.radToDeg(controls.getAzimuthalAngle());
    state.elevation_deg = 90 - THREE.MathUtils.radToDeg(controls.getPolarAngle());
    state.distance = controls.getDistance();
  }}
  controls.addEventListener("change", render);
  controls.update();
  window.addEventListener("resize", () => {{
    renderer.setSize(window.innerWidth, window.innerHeight);
    camera.aspect = window.innerWidth / window.innerHeight;
    camera.updateProjectionMatrix();
    render();
  }});
  render();
  state.ready = true;
}} catch (error) {{
  state.error = String(error);
  document.getElementById("hud").textContent = `The model could not be shown: ${{error}}`;
}}
</script>
</body>
</html>
"""


def read_glb(glb_path: str | Path) -> bytes:
    """The bytes of a binary glTF 2.0 file, checked: a ``.glb`` whose 12-byte header says
    ``glTF``, version 2 and the file's own length, followed by a JSON chunk (the glTF 2.0
    specification, section 4.4 "GLB File Format Specification")."""
    path = Path(glb_path)
    if not path.is_file():
        raise ConfigError(f"model {str(path)!r} does not exist")
    if path.suffix.lower() != ".glb":
        raise ConfigError(
            f"model {str(path)!r} must be a binary glTF (.glb); convert a .gltf, .obj or .ply to .glb first"
        )
    data = path.read_bytes()
    if len(data) < 20 or data[:4] != GLB_MAGIC:
        raise ConfigError(f"model {str(path)!r} is not a binary glTF file (no 'glTF' header)")
    version, length = struct.unpack_from("<II", data, 4)
    chunk_type = data[16:20]
    if version != 2 or length != len(data) or chunk_type != b"JSON":
        raise ConfigError(
            f"model {str(path)!r} is not a valid glTF 2.0 binary (version {version}, "
            f"length {length} of {len(data)} bytes, first chunk {chunk_type!r})"
        )
    return data


def _script(name: str) -> str:
    """The vendored file ``name`` as an inert ``text/plain`` script the page links at load
    time; its imports must be those the page resolves (``three`` and the add-ons before it)."""
    source = vendored_text(name)
    if "</script" in source.lower():
        raise ConfigError(f"the vendored {name} contains '</script' and cannot be inlined")
    if name in ADDONS:
        known = {"three", *(f"../utils/{addon}" for addon in ADDONS[: ADDONS.index(name)])}
        unknown = set(re.findall(r"^(?:import|\}) .*from '([^']+)';", source, flags=re.M)) - known
        if unknown:
            raise ConfigError(
                f"the vendored {name} imports {sorted(unknown)}, which the page does not link; update {__name__}"
            )
    return f'<script type="text/plain" id="{name}">{source}</script>'


def mesh_viewer_html(
    glb_path: str | Path, *, azimuth_deg: float = 30.0, elevation_deg: float = 20.0, fov_deg: float = 45.0,
    title: str | None = None,
) -> str:
    """The HTML page (one string, no external references) showing the model ``glb_path``
    from ``azimuth_deg``/``elevation_deg`` with a vertical ``fov_deg`` (module conventions)."""
    if not 10 <= fov_deg <= 120:
        raise ConfigError(f"fov_deg must be in 10..120, got {fov_deg}")
    if not -89 <= elevation_deg <= 89:
        raise ConfigError(f"elevation_deg must be in -89..89, got {elevation_deg}")
    glb = base64.b64encode(read_glb(glb_path)).decode("ascii")
    module = vendored_text(THREE_MODULE)
    if f'"./{THREE_CORE}"' not in module:
        raise ConfigError(f"the vendored {THREE_MODULE} no longer imports ./{THREE_CORE}; update {__name__}")
    scripts = "\n".join(_script(name) for name in (THREE_CORE, THREE_MODULE, *ADDONS))
    return PAGE.format(
        title=html.escape(title if title is not None else Path(glb_path).name),
        background=BACKGROUND,
        scripts=scripts,
        glb=glb,
        core_name=THREE_CORE,
        addons=json.dumps(list(ADDONS)),
        azimuth_deg=float(azimuth_deg),
        elevation_deg=float(elevation_deg),
        fov_deg=float(fov_deg),
    )


def write_mesh_viewer(glb_path: str | Path, html_path: str | Path, *, overwrite: bool = False, **view: float) -> Path:
    """Write the self-contained viewer page of the model ``glb_path`` to ``html_path``
    (atomically). An existing page is replaced only with ``overwrite`` (else ConfigError);
    ``view`` takes :func:`mesh_viewer_html`'s ``azimuth_deg``, ``elevation_deg``, ``fov_deg``."""
    html_path = Path(html_path)
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"html_path {str(html_path)!r} must end in .html or .htm")
    if not html_path.parent.is_dir():
        raise ConfigError(f"output folder {str(html_path.parent)!r} does not exist")
    if html_path.exists() and not overwrite:
        raise ConfigError(f"html_path {str(html_path)!r} exists; pass overwrite=True to replace it")
    page = mesh_viewer_html(glb_path, **view)
    try:
        write_text_atomic(page, html_path, overwrite=overwrite)
    except FileExistsError:
        raise ConfigError(f"html_path {str(html_path)!r} exists; pass overwrite=True to replace it") from None
    return html_path
