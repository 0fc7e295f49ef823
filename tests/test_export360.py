"""Exports of 360° panoramas: GPano XMP read back by independent chunk/segment parsers, cube
faces checked against the OpenGL cube-map table, layouts and cube ↔ equirect round trips."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import py360convert
import pytest
from PIL import Image

from jointdiff.surfaces import cube, export360
from jointdiff.utils.errors import ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "equirect_demo_1024x512.png"
GPANO = "{http://ns.google.com/photos/1.0/panorama/}"


@pytest.fixture(scope="module")
def demo() -> Image.Image:
    with Image.open(FIXTURE) as image:
        return image.convert("RGB")


def jpeg_xmp_segments(data: bytes) -> list[bytes]:
    """Payloads of the APP1 XMP segments of a JPEG, walking its markers (JPEG spec B.1.1)."""
    assert data[:2] == b"\xff\xd8"
    found, pos = [], 2
    while pos < len(data) and data[pos + 1] not in (0xDA, 0xD9):  # until start of scan
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        payload = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and payload.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
            found.append(payload[len(b"http://ns.adobe.com/xap/1.0/\x00") :])
        pos += 2 + length
    return found


def png_itxt_chunks(data: bytes) -> dict[str, tuple[int, bytes]]:
    """``keyword -> (compression flag, text)`` of a PNG's iTXt chunks (PNG spec 11.3.4.5)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"iTXt":
            keyword, rest = body.split(b"\x00", 1)
            flag, _method, rest = rest[0], rest[1], rest[2:]
            _language, _translated, text = rest.split(b"\x00", 2)
            chunks[keyword.decode("latin-1")] = (flag, text)
        pos += 12 + length
    return chunks


def gpano_elements(xmp: bytes) -> dict[str, str]:
    root = ElementTree.fromstring(xmp.decode("utf-8").strip("\x00 \ufeff"))
    return {e.tag[len(GPANO) :]: e.text for e in root.iter() if e.tag.startswith(GPANO)}


def expected_fields(full_hw, image_hw, top_left=(0, 0)) -> dict[str, str]:
    return {
        "ProjectionType": "equirectangular",
        "UsePanoramaViewer": "True",
        "FullPanoWidthPixels": str(full_hw[1]),
        "FullPanoHeightPixels": str(full_hw[0]),
        "CroppedAreaImageWidthPixels": str(image_hw[1]),
        "CroppedAreaImageHeightPixels": str(image_hw[0]),
        "CroppedAreaLeftPixels": str(top_left[1]),
        "CroppedAreaTopPixels": str(top_left[0]),
    }


# ---- GPano XMP ---------------------------------------------------------------------------


def test_jpeg_carries_gpano_in_app1_segment(demo, tmp_path):
    path = export360.save_equirect(demo, tmp_path / "pano.jpg", quality=90)
    segments = jpeg_xmp_segments(path.read_bytes())
    assert len(segments) == 1
    assert gpano_elements(segments[0]) == expected_fields((512, 1024), (512, 1024))
    assert export360.read_gpano(path) == expected_fields((512, 1024), (512, 1024))
    with Image.open(path) as image:
        assert image.size == demo.size
        assert np.abs(np.asarray(image, np.float32) - np.asarray(demo, np.float32)).mean() < 4


def test_png_carries_gpano_in_itxt_chunk_for_a_cropped_pano(demo, tmp_path):
    band = demo.crop((0, 128, 1024, 384))  # latitudes 45°..−45° of the full sphere
    path = export360.save_equirect(band, tmp_path / "band.png", full_size_px=(512, 1024), crop_offset_px=(128, 0))
    flag, text = png_itxt_chunks(path.read_bytes())["XML:com.adobe.xmp"]
    assert flag == 0  # XMP in PNG is stored uncompressed so that scanners find it
    assert gpano_elements(text) == expected_fields((512, 1024), (256, 1024), (128, 0))
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(band))
    assert [p.name for p in tmp_path.iterdir()] == ["band.png"]  # no temporary file left


def test_read_gpano_of_a_plain_image_is_empty(demo, tmp_path):
    demo.save(tmp_path / "plain.png")
    assert export360.read_gpano(tmp_path / "plain.png") == {}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "2:1"),  # a 1024 × 256 image is not a full sphere: full_size_px is required
        ({"full_size_px": (512, 1000)}, "full_size_px"),
        ({"full_size_px": (512, 1024), "crop_offset_px": (300, 0)}, "crop_offset_px"),
    ],
)
def test_save_equirect_rejects_sizes_that_are_not_a_sphere(demo, tmp_path, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        export360.save_equirect(demo.crop((0, 0, 1024, 256)), tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()


def test_save_equirect_rejects_other_formats(demo, tmp_path):
    with pytest.raises(ConfigError, match="x.webp"):
        export360.save_equirect(demo, tmp_path / "x.webp")


# ---- cube faces --------------------------------------------------------------------------


def direction_image(h: int) -> Image.Image:
    """An equirect whose colour is its direction, ``(d + 1) · 127.5``, in the module's frame
    (centre +Z, right +X, up +Y); continuous over the whole sphere."""
    rows, cols = np.meshgrid(np.arange(h) + 0.5, np.arange(2 * h) + 0.5, indexing="ij")
    lon, lat = (cols / (2 * h) - 0.5) * 2 * np.pi, (0.5 - rows / h) * np.pi
    d = np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)], -1)
    return Image.fromarray(np.rint((d + 1) * 127.5).astype(np.uint8))


# OpenGL 4.6 Table 8.19: face -> direction (x, y, z) as a function of sc, tc in [-1, 1].
GL_FACES = {
    "px": lambda sc, tc: (np.ones_like(sc), -tc, -sc),
    "nx": lambda sc, tc: (-np.ones_like(sc), -tc, sc),
    "py": lambda sc, tc: (sc, np.ones_like(sc), tc),
    "ny": lambda sc, tc: (sc, -np.ones_like(sc), -tc),
    "pz": lambda sc, tc: (sc, -tc, np.ones_like(sc)),
    "nz": lambda sc, tc: (-sc, -tc, -np.ones_like(sc)),
}


def test_faces_follow_the_opengl_cube_map_table():
    n = 32
    faces = export360.equirect_to_faces(direction_image(256), face_size_px=n)
    t, s = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
    for key, direction in GL_FACES.items():
        d = np.stack(direction(2 * s - 1, 2 * t - 1), -1)
        expected = (d / np.linalg.norm(d, axis=-1, keepdims=True) + 1) * 127.5
        error = np.abs(np.asarray(faces[key], np.float32) - expected)
        # py360convert samples face edges rather than cell centres (off by < 1/n of a face);
        # a mirrored or misnamed face is off by ~33 on average.
        assert error.mean() < 2 and error.max() < 6, key


def test_faces_round_trip_to_the_equirect(demo, tmp_path):
    paths = export360.save_cubemap(demo, tmp_path / "sky.png", face_size_px=256)
    assert [p.name for p in paths] == [f"sky_{k}.png" for k in ("px", "nx", "py", "ny", "pz", "nz")]
    back = export360.faces_to_equirect(export360.load_cubemap(tmp_path / "sky.png"), (512, 1024))
    error = np.abs(np.asarray(back, np.float32) - np.asarray(demo, np.float32))
    assert error.mean() < 2.5  # two bilinear resamplings of sharp-edged labels
    swapped = export360.load_cubemap(paths[1:2] + paths[0:1] + paths[2:])  # px <-> nx
    wrong = np.abs(np.asarray(export360.faces_to_equirect(swapped, (512, 1024)), np.float32) - np.asarray(demo))
    assert wrong.mean() > 4 * error.mean()


@pytest.mark.parametrize("layout", ["dice", "horizon", "strip"])
def test_layouts_hold_the_same_faces(demo, tmp_path, layout):
    faces = export360.equirect_to_faces(demo, face_size_px=64)
    (path,) = export360.save_cubemap(demo, tmp_path / f"{layout}.png", layout=layout, face_size_px=64)
    loaded = export360.load_cubemap(path, layout=layout)
    for key in export360.FACE_KEYS:
        assert np.array_equal(np.asarray(loaded[key]), np.asarray(faces[key])), key


def test_layout_cells_are_where_engines_expect_them(demo):
    n = 64
    faces = {k: np.asarray(v) for k, v in export360.equirect_to_faces(demo, face_size_px=n).items()}
    dice = np.asarray(export360.faces_to_layout({k: Image.fromarray(v) for k, v in faces.items()}, "dice"))
    # The horizontal cross: +Y above +Z, then the row −X +Z +X −Z, and −Y below +Z.
    cells = {"py": (0, 1), "nx": (1, 0), "pz": (1, 1), "px": (1, 2), "nz": (1, 3), "ny": (2, 1)}
    for key, (row, col) in cells.items():
        assert np.array_equal(dice[row * n : (row + 1) * n, col * n : (col + 1) * n], faces[key]), key
    strips = {
        "strip": ("px", "nx", "py", "ny", "pz", "nz"),
        "horizon": ("pz", "px", "nz", "nx", "py", "ny"),  # py360convert's F R B L U D
    }
    for layout, order in strips.items():
        image = np.asarray(export360.faces_to_layout({k: Image.fromarray(v) for k, v in faces.items()}, layout))
        assert np.array_equal(image, np.concatenate([faces[k] for k in order], axis=1)), layout


def test_dice_is_py360convert_dice_and_faces_may_be_a_sequence_in_cube_order(demo, tmp_path):
    faces = export360.equirect_to_faces(demo, face_size_px=32)
    as_list = [faces[key] for key in cube.FACE_NAMES]  # e.g. a cubemap or cube_texture job's images
    dice = np.asarray(export360.faces_to_layout(as_list, "dice"))
    horizon = np.concatenate([np.asarray(faces[key]) for key in export360.PY360_ORDER], axis=1)
    assert np.array_equal(dice, py360convert.utils.cube_h2dice(horizon))
    assert export360.PY360_ORDER == ("pz", "px", "nz", "nx", "py", "ny")  # F R B L U D
    paths = export360.save_faces(as_list, tmp_path / "job.png")
    assert [p.name for p in paths] == [f"job_{key}.png" for key in cube.FACE_NAMES]
    loaded = export360.load_cubemap(tmp_path / "job.png")
    assert all(np.array_equal(np.asarray(loaded[key]), np.asarray(faces[key])) for key in cube.FACE_NAMES)


def test_cube_errors_name_the_argument(demo, tmp_path):
    with pytest.raises(ConfigError, match="'cross'"):
        export360.save_cubemap(demo, tmp_path / "x.png", layout="cross")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="2:1"):
        export360.equirect_to_faces(demo.crop((0, 0, 512, 512)))
    with pytest.raises(ConfigError, match="6:1"):
        export360.layout_to_faces(demo, "strip")
    with pytest.raises(ConfigError, match="sky_px.png"):
        export360.load_cubemap(tmp_path / "sky.png")
    faces = export360.equirect_to_faces(demo, face_size_px=16)
    with pytest.raises(ConfigError, match="nz"):
        export360.faces_to_equirect({k: v for k, v in faces.items() if k != "nz"}, (64, 128))
