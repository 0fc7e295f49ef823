"""A 360° sky for VR, a game engine and the web: generate, export, view.

Generates an equirectangular panorama with the ``equirect`` geometry (perspective views all
over the sphere, poles included; or ``--geometry cubemap``, six faces), then writes into
``--out``:

- ``sky.png`` and ``sky.jpg``: the equirectangular image with GPano XMP metadata, which 360
  photo sites and viewers read to show it as a sphere (Unreal imports it as a long-lat cube);
- ``cubemap/sky_px.png`` … ``sky_nz.png``: six faces for three.js's ``CubeTextureLoader``
  (order px nx py ny pz nz) or a Unity 6-sided skybox; ``cubemap/sky_cross.png``: the
  horizontal cross Unity imports as a cubemap (see docs/vr.md, "Exports");
- ``sky.html``: a self-contained, offline 360° viewer (drag to look around).

The geometries come from the built-in ``sphere`` plugin (``jointdiff plugins`` lists them).
Runs offline on the built-in ``tiny`` model by default: its weights are random, so the "sky"
is noise, but every file is produced. For a real sky::

    python examples/sky360.py --model stabilityai/stable-diffusion-2-base --steps 30 \\
        --width-px 2048 --out sky360
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.registry import create
from jointdiff.surfaces.export360 import faces_to_equirect, save_cubemap, save_equirect
from jointdiff.surfaces.viewer import write_viewer
from jointdiff.utils.errors import JointDiffError

DEFAULT_PROMPT = "a 360 degree equirectangular panorama of a clear sky at golden hour above a calm sea, clouds"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--negative", default="text, watermark, frame, blurry")
    parser.add_argument("--geometry", default="equirect", choices=["equirect", "cubemap"])
    parser.add_argument("--width-px", type=int, default=None, help="equirect width (default: 512 on tiny, 2048 otherwise)")
    parser.add_argument("--window-latent", type=int, default=None, help="view side in latent cells (default: 16 on tiny, 64)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 3 on tiny, 30 otherwise)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--sync", action="store_true", help="SyncDiffusion: one style across all views")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="sky360", help="output folder")
    return parser.parse_args(argv)


def build_job(args: argparse.Namespace, pipeline) -> JointDiffusion:
    """The sphere geometry (sizes scaled down on the tiny model), the text conditioner and,
    with ``--sync``, the SyncDiffusion synchronizer."""
    tiny = args.model == "tiny"
    width = args.width_px or (512 if tiny else 2048)
    options = {"window_latent": args.window_latent or (16 if tiny else 64)}
    if args.geometry == "equirect":
        options["width_px"] = width
    else:
        options["face_px"] = width // 4  # the same pixels per degree on the horizon
    geometry = create("geometry", args.geometry, **options)
    text = create("conditioner", "text", prompt=args.prompt, negative_prompt=args.negative, guidance_scale=args.guidance)
    synchronizer = create("synchronizer", "syncdiffusion") if args.sync else None
    return JointDiffusion(pipeline, geometry, [text], synchronizer)


def as_equirect(images: list[Image.Image], geometry: str) -> Image.Image:
    """The panorama as one equirectangular image (the cubemap geometry gives six faces in
    jointdiff.surfaces.cube's order px nx py ny pz nz, which faces_to_equirect takes as a list)."""
    if geometry == "equirect":
        return images[0]
    face = images[0].width
    return faces_to_equirect(images, (2 * face, 4 * face))


def export(pano: Image.Image, out: Path) -> list[Path]:
    """Every export of the panorama: equirect PNG + JPEG with GPano XMP, six cube faces and
    the horizontal cross, and the viewer page."""
    (out / "cubemap").mkdir(parents=True, exist_ok=True)
    paths = [save_equirect(pano, out / "sky.png"), save_equirect(pano, out / "sky.jpg", quality=92)]
    paths += save_cubemap(pano, out / "cubemap" / "sky.png", layout="faces")
    paths += save_cubemap(pano, out / "cubemap" / "sky_cross.png", layout="dice")
    paths.append(write_viewer(paths[0], out / "sky.html"))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = args.steps if args.steps is not None else (3 if args.model == "tiny" else 30)
    if args.model == "tiny":
        print("note: the tiny model has random weights; its panorama is noise, not a sky", file=sys.stderr)
    try:
        pipeline = load_pipeline(args.model, device=args.device)
        job = build_job(args, pipeline)
        result = job(num_inference_steps=steps, seed=args.seed)
        pano = as_equirect(result.images, args.geometry)
        for path in export(pano, Path(args.out)):
            print(path)
    except JointDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
