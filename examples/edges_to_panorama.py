"""Edge map → panorama: a ControlNet of any size (ControlSync).

Generates a panorama that follows the city edge map in ``examples/assets`` (3072×512 px,
cropped to ``--length-px``), with the ``controlnet`` conditioner over a horizontal ``strip``;
``--sync`` adds SyncDiffusion's synchronization with ControlSync's settings (the
``syncdiffusion`` synchronizer, preset ``controlsync``). ``--photo`` takes any photo instead
and turns it into Canny edges first (``preprocess = "canny"``).

Runs offline on the built-in ``tiny`` model and a tiny random ControlNet by default (a small
canvas and a few steps; the weights are random, so the image is noise: it checks the
machinery). With real weights, e.g. Stable Diffusion 1.5 and its Canny ControlNet::

    python examples/edges_to_panorama.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --controlnet lllyasviel/sd-controlnet-canny --length-px 3072 --steps 50 --sync
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.registry import create
from jointdiff.utils.errors import JointDiffError

EDGES = Path(__file__).resolve().parent / "assets" / "canny_city_512x3072.png"
PROMPT = "a beautiful city on a sunny day in oil painting"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder (SD 1.x)")
    parser.add_argument("--controlnet", default="tiny", help="'tiny' (random), a hub id or a ControlNetModel folder")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--photo", help="a photo to turn into Canny edges instead of the city edge map")
    parser.add_argument("--length-px", type=int, default=None, help="panorama length (default: 768 on tiny, 3072)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 3 on tiny, 50)")
    parser.add_argument("--stride-latent", type=int, default=16)
    parser.add_argument("--scale", type=float, default=1.0, help="ControlNet conditioning scale")
    parser.add_argument("--sync", action="store_true", help="ControlSync: synchronize the windows (needs LPIPS weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="out/edges_panorama.png")
    return parser.parse_args(argv)


def condition(args: argparse.Namespace, length_px: int) -> tuple[Image.Image, str]:
    """The condition image of the canvas's size (512 px high) and its preprocessing."""
    source = Path(args.photo) if args.photo else EDGES
    with Image.open(source) as image:
        image = image.convert("RGB")
    if args.photo:
        return image.resize((length_px, 512), Image.Resampling.BICUBIC), "canny"
    if length_px > image.width:
        raise JointDiffError(f"--length-px {length_px} is longer than the edge map ({image.width} px)")
    return image.crop((0, 0, length_px, 512)), "none"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tiny = args.model == "tiny"
    length = args.length_px or (768 if tiny else 3072)
    steps = args.steps or (3 if tiny else 50)
    try:
        pipeline = load_pipeline(args.model, device=args.device, scheduler="ddim")
        image, preprocess = condition(args, length)
        geometry = create("geometry", "strip", length_px=length, window_latent=64, stride_latent=args.stride_latent)
        text = create("conditioner", "text", prompt=args.prompt, guidance_scale=7.5)
        control = create("conditioner", "controlnet", model=args.controlnet, image=image, preprocess=preprocess,
                         conditioning_scale=args.scale)
        sync = create("synchronizer", "syncdiffusion", preset="controlsync") if args.sync else None
        job = JointDiffusion(pipeline, geometry, [text, control], sync, view_batch_size=4)
        result = job(num_inference_steps=steps, seed=args.seed)
    except JointDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    result.save(args.output)  # the PNG carries the job and seed
    print(f"{args.output}: {result.images[0].width}×{result.images[0].height} px, {geometry.num_windows} windows, {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
