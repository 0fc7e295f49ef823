"""Exports of 360° panoramas: equirectangular PNG/JPEG with GPano XMP metadata, and cube maps
in the layouts game engines and three.js take.

Conventions
-----------
An equirectangular image ``(h, w)`` with ``w = 2 h`` covers longitude −180°…180° left to
right and latitude 90°…−90° top to bottom; its centre column (yaw 0) looks *forward*.
Directions use the cube-map frame of OpenGL (4.6 spec, Table 8.19), Direct3D, KTX/DDS and
Unity: +X right, +Y up, +Z forward (the equirect centre). Cube faces follow
:mod:`jointdiff.surfaces.cube`, jointdiff's one cube-face convention: named ``px nx py ny pz nz``
(:data:`jointdiff.surfaces.cube.FACE_NAMES`, +X −X +Y −Y +Z −Z), in that order wherever faces form a
sequence (the ``cube_texture`` and ``cubemap`` geometries' images included), stored top row
first, seen from inside the cube, oriented as that table says.

py360convert names its faces F R B L U D in the same frame and orientation. This module is
the one place that converts (:data:`PY360_FACE`, :data:`PY360_ORDER`): a renaming and
reordering without any flip or rotation, used for its resampling (``e2c``, ``c2e``) and its
``horizon`` layout:

======  ==========  ===========  =====================================================
file    py360conv.  direction    where it goes
======  ==========  ===========  =====================================================
px      R           +X (right)   three.js ``CubeTextureLoader`` slot 0; Unity "Left [+X]"
nx      L           −X (left)    three.js slot 1; Unity 6-sided skybox "Right [−X]"
py      U           +Y (up)      three.js slot 2; Unity "Up [+Y]"
ny      D           −Y (down)    three.js slot 3; Unity "Down [−Y]"
pz      F           +Z (front)   three.js slot 4; Unity "Front [+Z]"
nz      B           −Z (back)    three.js slot 5; Unity "Back [−Z]"
======  ==========  ===========  =====================================================

three.js mirrors x when it samples a ``CubeTexture`` (its world is right-handed), so with
the files loaded in the order ``[px, nx, py, ny, pz, nz]`` the scene is not mirrored and
the front (``pz``) lies toward world +Z, i.e. behind three.js's default camera, which looks
down −Z. Unreal Engine is Z-up: import the equirectangular file (long-lat) there rather
than loose faces.

Layouts (:data:`CUBE_LAYOUTS`): ``faces`` (six files), ``dice`` (the horizontal cross,
3 × 4 faces, that Unity detects: ``py`` above ``pz``, row ``nx pz px nz``, ``ny`` below;
py360convert's ``dice`` too), ``horizon`` (py360convert's 6 × 1 strip in the order
F R B L U D) and ``strip`` (a 6 × 1 row in the order px nx py ny pz nz).
:func:`save_faces` writes faces in any layout; :func:`save_cubemap` converts an
equirectangular image first.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Literal, Mapping, Sequence, Union

import numpy as np
import py360convert
from PIL import Image

from jointdiff.surfaces.cube import FACE_NAMES
from jointdiff.utils import images
from jointdiff.utils.errors import ConfigError
from jointdiff.utils.files import save_image_atomic

GPANO_NS = "http://ns.google.com/photos/1.0/panorama/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
XMP_PNG_KEY = "XML:com.adobe.xmp"
FACE_KEYS = FACE_NAMES
"""The faces' names in :mod:`jointdiff.surfaces.cube` order: ``px nx py ny pz nz``."""
PY360_FACE = dict(zip(FACE_KEYS, ("R", "L", "U", "D", "F", "B")))
"""py360convert's name of each face: the boundary between the two conventions."""
PY360_ORDER = tuple(sorted(FACE_KEYS, key=lambda key: "FRBLUD".index(PY360_FACE[key])))
"""Our face names in py360convert's order F R B L U D (its ``list`` and ``horizon`` formats)."""
DICE_CELLS = {"py": (0, 1), "nx": (1, 0), "pz": (1, 1), "px": (1, 2), "nz": (1, 3), "ny": (2, 1)}
"""``(row, column)`` of each face in the 3 × 4 horizontal cross (``dice``)."""
Faces = Union[Mapping[str, Image.Image], Sequence[Image.Image]]
"""Six faces: ``{px: …, …, nz: …}``, or a sequence in :mod:`jointdiff.surfaces.cube` order."""
CubeLayout = Literal["faces", "dice", "horizon", "strip"]
CUBE_LAYOUTS = ("faces", "dice", "horizon", "strip")
EQUIRECT_SUFFIXES = (".png", ".jpg", ".jpeg")
Interpolation = Literal["nearest", "bilinear", "bicubic"]


def gpano_fields(
    image_size_px: tuple[int, int],
    full_size_px: tuple[int, int] | None = None,
    crop_offset_px: tuple[int, int] = (0, 0),
) -> dict[str, str]:
    """The GPano (Google Photo Sphere XMP) properties of an equirectangular image.

    :param image_size_px: ``(h, w)`` of the stored image, the cropped area.
    :param full_size_px: ``(h, w)`` of the whole sphere (``w = 2 h``); defaults to the image
        size, which must then be 2:1.
    :param crop_offset_px: ``(top, left)`` of the image inside the full panorama.
    """
    h, w = image_size_px
    full_h, full_w = full_size_px if full_size_px is not None else (h, w)
    top, left = crop_offset_px
    if full_w != 2 * full_h:
        what = "full_size_px" if full_size_px is not None else "image size (h, w)"
        raise ConfigError(f"{what} must be 2:1 (width = 2 × height) for an equirectangular panorama, got {(full_h, full_w)}")
    if min(top, left) < 0 or top + h > full_h or left + w > full_w:
        raise ConfigError(
            f"crop_offset_px={crop_offset_px} with image size {(h, w)} does not fit in the full panorama {(full_h, full_w)}"
        )
    return {
        "ProjectionType": "equirectangular",
        "UsePanoramaViewer": "True",
        "FullPanoWidthPixels": str(full_w),
        "FullPanoHeightPixels": str(full_h),
        "CroppedAreaImageWidthPixels": str(w),
        "CroppedAreaImageHeightPixels": str(h),
        "CroppedAreaLeftPixels": str(left),
        "CroppedAreaTopPixels": str(top),
    }


def gpano_xmp(fields: Mapping[str, str]) -> bytes:
    """An XMP packet (UTF-8) holding ``fields`` as ``GPano:`` elements of one
    ``rdf:Description``, the form photo sites and 360 viewers read."""
    lines = [f"      <GPano:{key}>{value}</GPano:{key}>" for key, value in fields.items()]
    packet = "\n".join(
        [
            '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>',
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">',
            f'  <rdf:RDF xmlns:rdf="{RDF_NS}">',
            f'    <rdf:Description rdf:about="" xmlns:GPano="{GPANO_NS}">',
            *lines,
            "    </rdf:Description>",
            "  </rdf:RDF>",
            "</x:xmpmeta>",
            '<?xpacket end="w"?>',
        ]
    )
    return packet.encode("utf-8")


def _image_path(path: str | Path) -> Path:
    """``path`` as a Path; ConfigError unless it ends in .png, .jpg or .jpeg."""
    path = Path(path)
    if path.suffix.lower() not in EQUIRECT_SUFFIXES:
        raise ConfigError(f"path {str(path)!r} must end in .png, .jpg or .jpeg")
    return path


def save_equirect(
    image: Image.Image,
    path: str | Path,
    *,
    full_size_px: tuple[int, int] | None = None,
    crop_offset_px: tuple[int, int] = (0, 0),
    quality: int = 95,
) -> Path:
    """Save an equirectangular ``image`` as PNG or JPEG (by ``path``'s suffix) with GPano XMP,
    atomically. PNG: an uncompressed ``iTXt`` chunk with keyword ``XML:com.adobe.xmp``;
    JPEG: an APP1 segment headed ``http://ns.adobe.com/xap/1.0/\\0`` (both per the XMP
    specification, part 3). See :func:`gpano_fields` for the size arguments."""
    path = _image_path(path)
    suffix = path.suffix.lower()
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be in 1..100, got {quality}")
    xmp = gpano_xmp(gpano_fields((image.height, image.width), full_size_px, crop_offset_px))
    if suffix == ".png":
        return save_image_atomic(image, path, {XMP_PNG_KEY: xmp.decode("utf-8")})
    rgb = image.convert("RGB")
    # Pillow reads writer options from ``encoderinfo`` as well as from save()'s keywords.
    rgb.encoderinfo = {"xmp": xmp, "quality": quality}
    return save_image_atomic(rgb, path)


def read_gpano(path: str | Path) -> dict[str, str]:
    """The GPano properties in the XMP of a PNG or JPEG (elements or attributes of any
    ``rdf:Description``); an empty dict when the file carries none."""
    try:
        with Image.open(path) as image:
            xmp = image.info.get("xmp")
    except FileNotFoundError:
        raise ConfigError(f"image {str(path)!r} does not exist") from None
    if not xmp:
        return {}
    text = xmp.decode("utf-8") if isinstance(xmp, bytes) else xmp
    root = ElementTree.fromstring(text.strip("\x00 \ufeff"))
    prefix = "{" + GPANO_NS + "}"
    fields: dict[str, str] = {}
    for description in root.iter("{" + RDF_NS + "}Description"):
        fields.update({k[len(prefix):]: v for k, v in description.attrib.items() if k.startswith(prefix)})
        fields.update({c.tag[len(prefix):]: (c.text or "").strip() for c in description if c.tag.startswith(prefix)})
    return fields


def _check_layout(layout: str) -> None:
    if layout not in CUBE_LAYOUTS:
        hint = " ('dice' is the horizontal cross)" if layout == "cross" else ""
        raise ConfigError(f"layout must be one of {', '.join(CUBE_LAYOUTS)}; got {layout!r}{hint}")


def face_dict(faces: Faces) -> dict[str, Image.Image]:
    """Six faces as ``{px: …, …, nz: …}``, from that mapping or from a sequence in
    :mod:`jointdiff.surfaces.cube` order (e.g. the images of a ``cubemap`` or ``cube_texture`` job);
    checked to be six squares of one size."""
    if isinstance(faces, Mapping):
        missing = [key for key in FACE_KEYS if key not in faces]
        if missing:
            raise ConfigError(f"faces lacks {', '.join(missing)}; give all of {', '.join(FACE_KEYS)}")
        faces = {key: faces[key] for key in FACE_KEYS}
    else:
        if len(faces) != 6:
            raise ConfigError(f"a cube needs 6 faces ({' '.join(FACE_KEYS)}), got {len(faces)}")
        faces = dict(zip(FACE_KEYS, faces))
    sizes = {face.size for face in faces.values()}
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise ConfigError(f"faces must be squares of one size, got sizes {sorted(sizes)}")
    return faces


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def equirect_to_faces(
    image: Image.Image, face_size_px: int | None = None, mode: Interpolation = "bilinear"
) -> dict[str, Image.Image]:
    """The six cube faces ``{px: …, …, nz: …}`` of an equirectangular ``image`` (module
    conventions), each ``face_size_px`` square (default: a quarter of the width) — resampled
    with ``py360convert.e2c``."""
    if image.width != 2 * image.height:
        raise ConfigError(f"image size (h, w) must be 2:1 for an equirectangular panorama, got {(image.height, image.width)}")
    face = face_size_px if face_size_px is not None else image.width // 4
    if face < 1:
        raise ConfigError(f"face_size_px must be at least 1, got {face}")
    faces = py360convert.e2c(_to_array(image), face_w=face, mode=mode, cube_format="dict")
    return {key: _to_image(faces[PY360_FACE[key]]) for key in FACE_KEYS}


def faces_to_equirect(
    faces: Faces, size_px: tuple[int, int], mode: Interpolation = "bilinear"
) -> Image.Image:
    """The equirectangular image of size ``(h, w)`` (``w`` a multiple of 4) seen from
    ``faces`` (:data:`Faces`) — resampled with ``py360convert.c2e``."""
    faces = face_dict(faces)
    h, w = size_px
    if w % 4 or h < 1:
        raise ConfigError(f"size_px (h, w) needs w a multiple of 4 and h ≥ 1, got {size_px}")
    cube = {PY360_FACE[key]: _to_array(faces[key]) for key in FACE_KEYS}
    return _to_image(py360convert.c2e(cube, h, w, mode=mode, cube_format="dict"))


def _layout_cells(layout: CubeLayout) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """``(row, column)`` of each face in a one-image ``layout``, and its ``(rows, columns)``."""
    if layout == "dice":
        return DICE_CELLS, (3, 4)
    order = FACE_KEYS if layout == "strip" else PY360_ORDER
    return {key: (0, column) for column, key in enumerate(order)}, (1, 6)


def faces_to_layout(faces: Faces, layout: CubeLayout) -> Image.Image:
    """One RGB image holding the six ``faces`` (:data:`Faces`) in ``layout`` (``dice``,
    ``horizon`` or ``strip``); the empty cells of ``dice`` are black."""
    _check_layout(layout)
    if layout == "faces":
        raise ConfigError("layout 'faces' is six images; faces_to_layout takes dice, horizon or strip")
    faces = face_dict(faces)
    size = faces["px"].width
    cells, (rows, columns) = _layout_cells(layout)
    image = Image.new("RGB", (columns * size, rows * size))
    for key, (row, column) in cells.items():
        image.paste(faces[key].convert("RGB"), (column * size, row * size))
    return image


def layout_to_faces(image: Image.Image, layout: CubeLayout) -> dict[str, Image.Image]:
    """The six faces ``{px: …, …, nz: …}`` of one image in ``layout`` (inverse of
    :func:`faces_to_layout`)."""
    _check_layout(layout)
    if layout in ("horizon", "strip") and image.width != 6 * image.height:
        raise ConfigError(f"a {layout} image must be 6:1 (w = 6 h), got size (h, w) {(image.height, image.width)}")
    if layout == "dice" and (image.height % 3 or image.width * 3 != image.height * 4):
        raise ConfigError(f"a dice image must be 4:3 faces (w = 4 h / 3), got size (h, w) {(image.height, image.width)}")
    if layout == "faces":
        raise ConfigError("layout 'faces' is six images; load them with load_cubemap")
    cells, (rows, _) = _layout_cells(layout)
    size, rgb = image.height // rows, image.convert("RGB")
    boxes = {key: (column * size, row * size, (column + 1) * size, (row + 1) * size) for key, (row, column) in cells.items()}
    return {key: rgb.crop(boxes[key]) for key in FACE_KEYS}


def cubemap_paths(path: str | Path, layout: CubeLayout = "faces") -> list[Path]:
    """Where :func:`save_faces` and :func:`save_cubemap` write: ``sky.png`` → ``sky_px.png``
    … ``sky_nz.png`` for ``faces`` (in the order px nx py ny pz nz), else ``sky.png`` itself."""
    _check_layout(layout)
    path = Path(path)
    if layout != "faces":
        return [path]
    return [path.with_name(f"{path.stem}_{key}{path.suffix}") for key in FACE_KEYS]


def save_faces(faces: Faces, path: str | Path, layout: CubeLayout = "faces") -> list[Path]:
    """Save six cube ``faces`` (:data:`Faces`: e.g. a ``cubemap`` or ``cube_texture`` job's
    images) atomically in ``layout``: six files or one image (:func:`faces_to_layout`).
    Returns the paths written (see :func:`cubemap_paths`). The one cube-map writer."""
    _check_layout(layout)
    _image_path(path)
    faces = face_dict(faces)
    paths = cubemap_paths(path, layout)
    if layout == "faces":
        return [save_image_atomic(faces[key], p) for key, p in zip(FACE_KEYS, paths)]
    return [save_image_atomic(faces_to_layout(faces, layout), paths[0])]


def save_cubemap(
    equirect: Image.Image,
    path: str | Path,
    layout: CubeLayout = "faces",
    face_size_px: int | None = None,
    mode: Interpolation = "bilinear",
) -> list[Path]:
    """Convert an equirectangular image to a cube map (:func:`equirect_to_faces`) and save
    it with :func:`save_faces`; returns the paths written (see :func:`cubemap_paths`)."""
    _check_layout(layout)
    _image_path(path)
    return save_faces(equirect_to_faces(equirect, face_size_px, mode), path, layout)


def load_cubemap(path: str | Path | Sequence[str | Path], layout: CubeLayout = "faces") -> dict[str, Image.Image]:
    """The faces ``{px: …, …, nz: …}`` of a saved cube map: for ``faces``, ``path`` is the
    name given to :func:`save_cubemap` (or a list of six files in the order px … nz)."""
    _check_layout(layout)
    if layout != "faces":
        return layout_to_faces(images.load_image(path, "RGB", "cube map"), layout)  # type: ignore[arg-type]
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else cubemap_paths(path)
    if len(paths) != 6:
        raise ConfigError(f"a cube map needs six face files (px nx py ny pz nz), got {len(paths)}")
    faces = {}
    for key, face_path in zip(FACE_KEYS, paths):
        if not face_path.is_file():
            raise ConfigError(f"cube face {key} file {str(face_path)!r} does not exist")
        faces[key] = images.load_image(face_path, "RGB", f"cube face {key}")
    return faces
