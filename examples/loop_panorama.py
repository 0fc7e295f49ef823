"""A panorama made to loop: its two ends joined by regenerating a band across the seam.

The panorama is scaled to the height of a ``strip`` (one window across) and put on that strip
with ``wrap = true``, whose last column is the first one's neighbour; the ``--seam-px`` band
across the wrap (half at each end) is regenerated, the rest kept
(:func:`jointdiff.image.placement.loop_panorama`). The windows that cross the wrap denoise the
band as one piece, and the output stays registered with the input. Writes into ``--out``:
``looped.png`` and ``looped_twice.png`` (two copies side by side: the join is in the middle).

Without ``--pano`` a stand-in is cut from ``examples/assets/equirect_demo_1024x512.png``:
half of its longitudes, so its ends do not meet. Runs offline on the built-in ``tiny`` model
by default: its weights are random, so **the regenerated band is noise** (and so is the
whole decoded image: the tiny VAE does not keep images). For real images::

    python examples/loop_panorama.py --pano city.jpg --prompt "a city skyline at dusk, photo" \\
        --model stabilityai/stable-diffusion-2-base --seam-px 256 --steps 30

As a job file (``jointdiff run``), the same is a ``strip`` with ``wrap = true`` and
``length_px`` = the panorama's width, and::

    [init]
    image = "city.png"        # already the strip's height (512 px for SD 2-base)
    [init.placement]
    kind = "loop"
    seam_px = 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.registry import create
from jointdiff.image import placement
from jointdiff.utils.errors import JointDiffError

DEMO = Path(__file__).parent / "assets" / "equirect_demo_1024x512.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pano", help="a panorama wider than tall; default: half of the demo panorama")
    parser.add_argument("--prompt", default="a wide panorama photo")
    parser.add_argument("--seam-px", type=int, default=None, help="band regenerated across the seam (default: half the strip's height)")
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder")
    parser.add_argument("--window-latent", type=int, default=None, help="strip height in latent cells (default: 8 on tiny, 64)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 3 on tiny, 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="looped", help="output folder")
    return parser.parse_args(argv)


def on_strip(pano: Image.Image, height_px: int, scale: int = 8) -> Image.Image:
    """The panorama scaled to the strip's height, its width rounded to whole latent cells."""
    width = max(scale, round(pano.width * height_px / pano.height / scale) * scale)
    return pano.convert("RGB").resize((width, height_px), Image.BICUBIC)


def run(args: argparse.Namespace, pipeline) -> list[Path]:
    """Loop the panorama on a wrapped strip and write the files; returns their paths."""
    tiny = args.model == "tiny"
    window = args.window_latent or (8 if tiny else 64)
    source = Image.open(args.pano) if args.pano else Image.open(DEMO).crop((0, 192, 512, 320))
    pano = on_strip(source, window * 8)
    seam_px = args.seam_px or window * 8 // 2  # half the strip's height by default
    init = placement.loop_panorama(pano, seam_px)
    geometry = create("geometry", "strip", length_px=pano.width, window_latent=window, wrap=True)
    text = create("conditioner", "text", prompt=args.prompt)
    result = JointDiffusion(pipeline, geometry, [text], init=init)(num_inference_steps=args.steps or (3 if tiny else 30), seed=args.seed)
    looped = result.images[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    twice = Image.new("RGB", (2 * looped.width, looped.height))
    twice.paste(looped, (0, 0))
    twice.paste(looped, (looped.width, 0))
    twice.save(out / "looped_twice.png")
    return [*result.save(out / "looped.png"), out / "looped_twice.png"]  # the PNG carries its job


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model == "tiny":
        print("note: the tiny model has random weights; its images are noise", file=sys.stderr)
    try:
        for path in run(args, load_pipeline(args.model, device=args.device)):
            print(path)
    except (JointDiffError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
