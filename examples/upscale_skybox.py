"""Upscaling a 360° skybox: an equirectangular panorama upsampled and re-denoised on a larger
``equirect`` canvas, then exported as cube faces for a game engine.

:func:`jointdiff.image.placement.upscale` upsamples the panorama bicubically by ``--factor`` and
the job re-denoises it from ``--strength`` (SDEdit, Meng et al. 2022: 0.4 runs the last 40 %
of the steps, adding detail while keeping the layout; higher departs more). The perspective
views of the ``equirect`` geometry see every part of the sphere, poles included, and the
canvas wraps at yaw ±180°. Writes into ``--out``: ``sky_upscaled.png`` (GPano metadata) and
``cubemap/sky_px.png`` … ``sky_nz.png`` (three.js / Unity order, docs/vr.md).

Without ``--pano`` the input is ``examples/assets/equirect_demo_1024x512.png`` shrunk to
256 × 128. Runs offline on the built-in ``tiny`` model by default: its weights are random,
so **the result is noise** (it checks the machinery). For a real skybox::

    python examples/upscale_skybox.py --pano sky_1024.png --factor 2 --strength 0.4 \\
        --prompt "a clear sky at golden hour above a calm sea" \\
        --model stabilityai/stable-diffusion-2-base --steps 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.registry import create
from jointdiff.image import placement
from jointdiff.surfaces.export360 import save_cubemap, save_equirect
from jointdiff.utils.errors import JointDiffError

DEMO = Path(__file__).parent / "assets" / "equirect_demo_1024x512.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pano", help="an equirectangular panorama (2:1); default: the demo at 256 × 128")
    parser.add_argument("--factor", type=int, default=2, help="upscaling factor")
    parser.add_argument("--strength", type=float, default=0.4, help="0..1: how much is re-denoised")
    parser.add_argument("--prompt", default="a 360 degree panorama, high detail, photo")
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder")
    parser.add_argument("--window-latent", type=int, default=None, help="view side in latent cells (default: 8 on tiny, 64)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps in all (default: 5 on tiny, 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="skybox", help="output folder")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, pipeline) -> list[Path]:
    """Upscale the panorama on the equirect geometry and export it; returns the paths."""
    tiny = args.model == "tiny"
    pano = Image.open(args.pano) if args.pano else Image.open(DEMO).resize((256, 128), Image.BICUBIC)
    init = placement.upscale(pano, args.factor, args.strength)
    width = init.image.shape[-1]  # the equirect canvas takes the upscaled size
    geometry = create("geometry", "equirect", width_px=width, window_latent=args.window_latent or (8 if tiny else 64))
    text = create("conditioner", "text", prompt=args.prompt)
    result = JointDiffusion(pipeline, geometry, [text], init=init)(num_inference_steps=args.steps or (5 if tiny else 30), seed=args.seed)
    out = Path(args.out)
    (out / "cubemap").mkdir(parents=True, exist_ok=True)
    sky = save_equirect(result.images[0], out / "sky_upscaled.png")
    return [sky, *save_cubemap(result.images[0], out / "cubemap" / "sky.png", layout="faces")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model == "tiny":
        print("note: the tiny model has random weights; the result is noise", file=sys.stderr)
    try:
        for path in run(args, load_pipeline(args.model, device=args.device)):
            print(path)
    except (JointDiffError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
