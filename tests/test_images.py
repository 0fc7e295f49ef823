"""The one image loader (jointdiff.utils.images) and every place an image comes in through it:
EXIF orientation, 16-bit and float images by their real range, palette and alpha, one log line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from jointdiff.utils import images
from jointdiff.utils.errors import ConfigError

ORIENTATION = 0x0112


def _pattern(h: int = 12, w: int = 20) -> np.ndarray:
    """An asymmetric uint8 RGB pattern (every rotation and flip of it differs)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _with_orientation(array: np.ndarray, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(array).save(path, exif=exif)


# EXIF orientation → the array transform that displays the stored pixels upright (EXIF 2.3, tag 274).
UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.transpose(a, (1, 0, 2)),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.transpose(a[::-1, ::-1], (1, 0, 2)),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = _pattern()
    path = tmp_path / "phone.png"
    _with_orientation(stored, path, orientation)
    upright = images.load_array(path)
    np.testing.assert_array_equal(upright, UPRIGHT[orientation](stored).astype(np.float32) / 255.0)


def test_exif_orientation_of_a_jpeg_portrait(tmp_path):
    """A portrait phone photo: stored landscape with orientation 6, read portrait."""
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :16] = (0, 255, 0)  # green on the stored left: the top once upright
    path = tmp_path / "portrait.jpg"
    _with_orientation(stored, path, 6)
    upright = images.load_array(path)
    assert upright.shape == (64, 40, 3)
    assert upright[:12, :, 1].mean() > 0.9 and upright[-12:, :, 1].mean() < 0.1


def test_16_bit_png_and_tiff_keep_their_range(tmp_path):
    depth = (np.arange(48 * 32, dtype=np.int64).reshape(48, 32) * 41 % 65536).astype(np.uint16)
    for suffix in ("png", "tif"):
        path = tmp_path / f"depth.{suffix}"
        Image.fromarray(depth).save(path)
        np.testing.assert_allclose(images.load_array(path, "L"), depth / 65535.0, rtol=0, atol=1e-7)
        rgb = images.load_array(path, "RGB")
        np.testing.assert_allclose(rgb[..., 2], depth / 65535.0, rtol=0, atol=1e-7)
    # Pillow's own convert clips: the reason this loader exists.
    assert (np.asarray(Image.open(tmp_path / "depth.png").convert("L")) == 255).mean() > 0.9


def test_float_tiff_kept_in_unit_range_and_stretched_outside(tmp_path, caplog):
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(images.load_array(tmp_path / "unit.tif", "L"), unit)
    metres = unit * 40.0 + 2.0
    Image.fromarray(metres).save(tmp_path / "metres.tif")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jointdiff.images"):
        stretched = images.load_array(tmp_path / "metres.tif", "L")
    np.testing.assert_allclose(stretched, unit, atol=1e-6)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "stretched from [2, 42]" in caplog.records[0].getMessage()


def test_non_finite_float_image_is_refused(tmp_path):
    data = np.zeros((4, 4), np.float32)
    data[1, 2] = np.nan
    Image.fromarray(data).save(tmp_path / "nan.tif")
    with pytest.raises(ConfigError, match=r"mask '.*nan\.tif' has NaN"):
        images.load_array(tmp_path / "nan.tif", "L", "mask")


def test_palette_with_transparency_and_alpha(tmp_path, caplog):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba, "RGBA").convert("P").save(tmp_path / "p.png", transparency=0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    kept = images.load_array(tmp_path / "a.png", "RGBA")
    np.testing.assert_array_equal(kept, rgba.astype(np.float32) / 255.0)
    with caplog.at_level(logging.INFO, logger="jointdiff.images"):
        images.load_array(tmp_path / "a.png", "RGB")
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "alpha dropped (50.0% of the pixels" in caplog.records[0].getMessage()
    palette = images.load_array(tmp_path / "p.png", "RGBA")
    assert palette.shape == (6, 8, 4) and set(np.unique(palette[..., 3])) <= {0.0, 1.0}


def test_one_log_line_naming_everything_done(tmp_path, caplog):
    stored = (np.arange(30 * 20).reshape(30, 20) * 97 % 65536).astype(np.uint16)
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[ORIENTATION] = 8
    image.save(tmp_path / "both.png", exif=exif)
    with caplog.at_level(logging.INFO, logger="jointdiff.images"):
        array = images.load_array(tmp_path / "both.png", "L")
    np.testing.assert_allclose(array, np.rot90(stored, 1) / 65535.0, atol=1e-7)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "both.png" in record.getMessage() and "EXIF orientation 8" in record.getMessage()
    assert "16-bit values scaled by 1/65535" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jointdiff.images"):
        images.load_array(Image.fromarray(_pattern()))
    assert caplog.records == []  # a plain 8-bit RGB image needs nothing said


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "does not exist"),
    (lambda p: p.mkdir() or p, "is a folder"),
    (lambda p: p.write_text("not an image") and p, "is not an image Pillow can read"),
])
def test_unreadable_sources_name_the_file(tmp_path, make, message):
    path = make(tmp_path / "x.png")
    with pytest.raises(ConfigError, match=f"init.image '.*x.png' {message}"):
        images.load_array(path, "RGB", "init.image")


def test_unit_array_scales_by_dtype():
    deep = np.array([[0, 65535, 32768]], np.uint16)
    np.testing.assert_allclose(images.unit_array(deep), deep / 65535.0)
    np.testing.assert_allclose(images.unit_array(np.array([[255]], np.uint8)), [[1.0]])


# -- every place an image comes in ---------------------------------------------------------


def test_controlnet_reads_a_16_bit_depth_map_by_its_range(tmp_path):
    from jointdiff_plugins.controlnet import ControlSpec, _as_tensor

    depth = (np.linspace(0, 65535, 16 * 16).reshape(16, 16)).astype(np.uint16)
    Image.fromarray(depth).save(tmp_path / "depth.png")
    spec = ControlSpec(model="tiny", image=str(tmp_path / "depth.png"))
    tensor = _as_tensor(spec.image, spec, "controlnet")
    assert tensor.shape == (1, 16, 16)
    torch.testing.assert_close(tensor[0], torch.from_numpy(depth / 65535.0).float(), rtol=0, atol=1e-6)
    from_array = _as_tensor(depth, spec, "controlnet")
    torch.testing.assert_close(from_array, tensor, rtol=0, atol=1e-6)


def test_region_and_keep_masks_read_16_bit(tmp_path):
    from jointdiff.core.masks import image_mask

    mask = np.zeros((8, 16), np.uint16)
    mask[:, 8:] = 65535
    mask[:, 4:8] = 32768
    Image.fromarray(mask).save(tmp_path / "mask.png")
    read = image_mask(tmp_path / "mask.png", (8, 16))
    torch.testing.assert_close(read, torch.from_numpy(mask / 65535.0).float(), rtol=0, atol=1e-6)


def test_init_image_and_sky_photo_are_upright(tmp_path):
    from jointdiff.image import placement
    from jointdiff.image.init_image import InitImage

    stored = _pattern(16, 24)
    _with_orientation(stored, tmp_path / "photo.png", 6)
    photo = placement.load_image(tmp_path / "photo.png", "photo")
    assert (photo.height, photo.width) == (24, 16)
    expected = torch.from_numpy(np.rot90(stored, -1).copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(placement.as_image(tmp_path / "photo.png"), expected)
    init = InitImage.from_files(tmp_path / "photo.png")
    torch.testing.assert_close(init.image[0], expected)


def test_inpaint_model_reads_16_bit_masks(tmp_path):
    from jointdiff_plugins.inpaint import _as_tensor

    mask = np.full((8, 8), 16384, np.uint16)
    Image.fromarray(mask).save(tmp_path / "m.png")
    tensor = _as_tensor(tmp_path / "m.png", "mask", 1)
    torch.testing.assert_close(tensor, torch.full((1, 8, 8), 16384 / 65535.0), rtol=0, atol=1e-6)


def test_viewer_turns_a_rotated_panorama_upright(tmp_path):
    import base64
    import io

    from jointdiff.surfaces.viewer import pano_data_url

    stored = _pattern(32, 16)
    _with_orientation(stored, tmp_path / "pano.png", 6)
    url = pano_data_url(tmp_path / "pano.png")
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as shown:
        np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), np.rot90(stored, -1))


def test_cli_says_what_the_loader_did_on_stderr(tmp_path, capsys):
    """`jointdiff sky` with a portrait phone photo: one note that it was turned upright."""
    from jointdiff.cli import main

    _with_orientation(_pattern(16, 24), tmp_path / "phone.png", 6)
    code = main(["sky", str(tmp_path / "phone.png"), "--width-px", "64", "--steps", "1", "--fov", "60",
                 "-g", "window_latent=8",
                 "--model", "tiny", "--device", "cpu", "-q", "-o", str(tmp_path / "sky.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(tmp_path / "sky.png")
    notes = [line for line in err.splitlines() if "EXIF orientation 6" in line]
    assert len(notes) == 1 and notes[0].startswith("jointdiff: note: ") and "phone.png" in notes[0]


def test_an_image_above_pillows_limit_is_one_line(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb above 2× the limit
    with pytest.raises(ConfigError, match=r"panorama '.*big.png' is larger than Pillow reads by default .*MAX_IMAGE_PIXELS"):
        images.load_array(tmp_path / "big.png", "L", "panorama")
