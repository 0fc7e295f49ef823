"""A 360° panorama that follows an equirectangular edge map (ControlNet on the sphere).

The condition is drawn on the canvas, which for the ``equirect`` geometry is an
equirectangular image: here the Canny edges of ``examples/assets/equirect_demo_1024x512.png``
(``preprocess = "canny"``). The geometry resamples the condition for every perspective view
exactly as it resamples the latents, so each view's ControlNet sees the edges as a camera
looking that way would. The ``equirect`` geometry comes from the built-in ``sphere`` plugin;
its recommended SyncTweedies x̂0 fusion is used.

Runs offline on the built-in ``tiny`` model and a tiny random ControlNet by default (a
512×256 panorama of 16-cell views, 3 steps; random weights, so the image is noise). With real
weights::

    python examples/controlnet_360.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --controlnet lllyasviel/sd-controlnet-canny --width-px 2048 --steps 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.registry import create
from jointdiff.utils.errors import JointDiffError

PHOTO = Path(__file__).resolve().parent / "assets" / "equirect_demo_1024x512.png"
PROMPT = "a 360 degree panorama of a modern museum hall, equirectangular"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder (SD 1.x)")
    parser.add_argument("--controlnet", default="tiny", help="'tiny' (random), a hub id or a ControlNetModel folder")
    parser.add_argument("--photo", default=str(PHOTO), help="an equirectangular photo (2:1) to take edges from")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--width-px", type=int, default=None, help="panorama width (default: 512 on tiny, 2048)")
    parser.add_argument("--window-latent", type=int, default=None, help="view side in latent cells (16 on tiny, 64)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 3 on tiny, 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="out/controlnet_360.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tiny = args.model == "tiny"
    width = args.width_px or (512 if tiny else 2048)
    steps = args.steps or (3 if tiny else 50)
    try:
        with Image.open(args.photo) as photo:
            condition = photo.convert("RGB").resize((width, width // 2), Image.Resampling.BICUBIC)
        pipeline = load_pipeline(args.model, device=args.device, scheduler="ddim")
        geometry = create("geometry", "equirect", width_px=width, window_latent=args.window_latent or (16 if tiny else 64))
        text = create("conditioner", "text", prompt=args.prompt, guidance_scale=7.5)
        control = create("conditioner", "controlnet", model=args.controlnet, image=condition, preprocess="canny")
        job = JointDiffusion(pipeline, geometry, [text, control])  # x̂0 fusion: the geometry's preferred one
        result = job(num_inference_steps=steps, seed=args.seed)
    except JointDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    result.save(args.output)  # the PNG carries the job and seed
    print(f"{args.output}: {result.images[0].width}×{result.images[0].height} px, {geometry.num_windows} views, {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
