"""Photo → 360° environment: a perspective photo placed on the sphere, the rest generated.

The photo (horizontal field of view ``--fov``, looking at ``--yaw``, ``--pitch``, rolled by
``--roll``; angles in degrees, positive yaw turns right, positive pitch looks up) is
projected onto an equirectangular canvas (:func:`jointdiff.image.placement.place_on_sphere`, the
inverse of ``py360convert.e2p``); its footprint is kept at every step and the ``equirect``
geometry's perspective views generate the rest of the sphere around it. Writes into
``--out``: ``placed.png`` (the photo on the canvas: what is kept), ``sky.png`` (the panorama,
GPano metadata for 360° viewers) and ``sky.html`` (an offline viewer).

Without ``--photo`` a stand-in photo is cut from ``examples/assets/equirect_demo_1024x512.png``
(py360convert's demo panorama). Runs offline on the built-in ``tiny`` model by default: its
weights are random, so **the generated part is noise** (it checks the machinery, not the
art). For real images, e.g. with Stable Diffusion 2 (``stabilityai/stable-diffusion-2-base``)
or SDXL (``stabilityai/stable-diffusion-xl-base-1.0``)::

    python examples/photo_to_sky360.py --photo beach.jpg --fov 75 \\
        --prompt "a sandy beach under a blue sky, photo" \\
        --model stabilityai/stable-diffusion-2-base --width-px 2048 --steps 30

The same from the command line: ``jointdiff sky beach.jpg --fov 75 --prompt "..." -o sky.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.geometry import tensor_to_pil
from jointdiff.core.registry import create
from jointdiff.image import placement
from jointdiff.surfaces.export360 import save_equirect
from jointdiff.surfaces.viewer import write_viewer
from jointdiff.utils.errors import JointDiffError

DEMO = Path(__file__).parent / "assets" / "equirect_demo_1024x512.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo", help="the photo; default: a stand-in cut from the demo panorama")
    parser.add_argument("--prompt", default="a photo of a wide landscape under the open sky")
    parser.add_argument("--yaw", type=float, default=0.0, help="degrees; positive: right")
    parser.add_argument("--pitch", type=float, default=0.0, help="degrees; positive: up")
    parser.add_argument("--roll", type=float, default=0.0, help="degrees, as py360convert's in_rot_deg")
    parser.add_argument("--fov", type=float, default=90.0, help="the photo's horizontal field of view (degrees)")
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder")
    parser.add_argument("--width-px", type=int, default=None, help="panorama width (default: 256 on tiny, 2048)")
    parser.add_argument("--window-latent", type=int, default=None, help="view side in latent cells (default: 8 on tiny, 64)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 2 on tiny, 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="sky_from_photo", help="output folder")
    return parser.parse_args(argv)


def stand_in_photo(fov_deg: float, size: tuple[int, int] = (384, 512)) -> Image.Image:
    """A perspective view of the demo panorama (its +Z face and surroundings) as a photo."""
    import math

    import numpy as np
    import py360convert

    demo = np.asarray(Image.open(DEMO).convert("RGB"))
    vertical = math.degrees(2 * math.atan(math.tan(math.radians(fov_deg) / 2) * size[0] / size[1]))
    return Image.fromarray(py360convert.e2p(demo, (fov_deg, vertical), 20, 0, size).astype(np.uint8))


def run(args: argparse.Namespace, pipeline) -> list[Path]:
    """Place the photo, generate the sphere around it, write the files; returns their paths."""
    tiny = args.model == "tiny"
    width = args.width_px or (256 if tiny else 2048)
    photo = args.photo or stand_in_photo(args.fov)  # a path is read by place_on_sphere (one-line errors)
    init = placement.place_on_sphere(photo, args.yaw, args.pitch, args.roll, args.fov, width_px=width)
    geometry = create("geometry", "equirect", width_px=width, window_latent=args.window_latent or (8 if tiny else 64))
    text = create("conditioner", "text", prompt=args.prompt, negative_prompt="text, watermark, frame, blurry")
    result = JointDiffusion(pipeline, geometry, [text], init=init)(
        num_inference_steps=args.steps or (2 if tiny else 30), seed=args.seed
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    placed = tensor_to_pil(init.image * init.keep)[0]  # the kept photo on mid-grey
    placed.save(out / "placed.png")
    sky = save_equirect(result.images[0], out / "sky.png")
    return [out / "placed.png", sky, write_viewer(sky, out / "sky.html")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model == "tiny":
        print("note: the tiny model has random weights; the generated part is noise", file=sys.stderr)
    try:
        for path in run(args, load_pipeline(args.model, device=args.device)):
            print(path)
    except JointDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
