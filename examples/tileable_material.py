"""A photo made tileable: its middle kept, its borders regenerated on the torus.

On the ``torus`` geometry the canvas wraps both ways, so the right edge meets the left and
the bottom the top; :func:`jointdiff.image.placement.make_tileable` keeps the photo's middle and
regenerates a ``--border-px`` band along every edge, so each seam lies in the middle of a
band the windows denoise as one piece. Writes into ``--out``: ``tile.png`` and
``tile_preview.png`` (3 × 3 repeats: a seam shows as a grid), and prints the tile's seam
ratios (:func:`jointdiff.surfaces.textures.seam_report`; ≈ 1: the seam looks like any other boundary).

Without ``--photo`` a stand-in is cut from ``examples/assets/equirect_demo_1024x512.png``.
Runs offline on the built-in ``tiny`` model by default: its weights are random, so **the
tile is noise** (the tiny VAE does not even keep the photo's middle recognisable). For a
real material::

    python examples/tileable_material.py --photo bark.jpg --prompt "oak tree bark texture, photo" \\
        --model stabilityai/stable-diffusion-2-base --size-px 512 --border-px 96 --steps 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.registry import create
from jointdiff.image import placement
from jointdiff.surfaces.textures import repeat_preview, seam_report
from jointdiff.utils.errors import JointDiffError

DEMO = Path(__file__).parent / "assets" / "equirect_demo_1024x512.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo", help="a texture photo; default: a crop of the demo panorama")
    parser.add_argument("--prompt", default="seamless tileable texture, top-down view, flat even lighting, photo")
    parser.add_argument("--size-px", type=int, default=None, help="tile side, multiple of 8 (default: 128 on tiny, 512)")
    parser.add_argument("--border-px", type=int, default=None, help="band regenerated along every edge (default: size / 8)")
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder")
    parser.add_argument("--window-latent", type=int, default=None, help="window side in latent cells (default: 8 on tiny, 64)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 2 on tiny, 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="material", help="output folder")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, pipeline) -> list[Path]:
    """Make the photo tileable, write the tile and its preview; returns their paths."""
    tiny = args.model == "tiny"
    size = args.size_px or (128 if tiny else 512)
    source = Image.open(args.photo) if args.photo else Image.open(DEMO).crop((384, 128, 640, 384))
    photo = source.convert("RGB").resize((size, size), Image.BICUBIC)
    init = placement.make_tileable(photo, args.border_px or size // 8)
    window = args.window_latent or (8 if tiny else 64)
    geometry = create("geometry", "torus", height_px=size, width_px=size, window_latent=window, stride_latent=max(1, window // 2))
    text = create("conditioner", "text", prompt=args.prompt)
    result = JointDiffusion(pipeline, geometry, [text], init=init)(num_inference_steps=args.steps or (2 if tiny else 30), seed=args.seed)
    tile = result.images[0]
    ratios = seam_report(tile, period=8)
    print(f"tile seam ratio: x {ratios['x']:.2f}, y {ratios['y']:.2f}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeat_preview(tile, 3).save(out / "tile_preview.png")
    return [*result.save(out / "tile.png"), out / "tile_preview.png"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model == "tiny":
        print("note: the tiny model has random weights; the tile is noise", file=sys.stderr)
    try:
        for path in run(args, load_pipeline(args.model, device=args.device)):
            print(path)
    except (JointDiffError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
