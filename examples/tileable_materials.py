"""A tileable material set for a game: one seamless texture per prompt, packed into an atlas.

Runs offline on the built-in ``tiny`` model by default (random weights: the textures are
noise, but every file is produced and the seams are measured). With a real Stable Diffusion
1.x/2.x model::

    python examples/tileable_materials.py --model stabilityai/stable-diffusion-2-base \\
        --steps 30 --stride 16 --sync --out materials

Writes into ``--out``: ``NN_name.png`` (each tile), ``NN_name_preview.png`` (3×3 repeats:
a seam shows as a grid), ``atlas.png`` and ``atlas.json`` (pixel and UV rectangles, see
docs/textures.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from jointdiff import JointDiffusion, load_pipeline
from jointdiff.core.registry import create
from jointdiff.surfaces.textures import export_textures, seam_report
from jointdiff.utils.errors import JointDiffError

DEFAULT_PROMPTS = ["lush green grass", "grey cobblestone", "dry cracked dirt", "oak tree bark"]
DEFAULT_STYLE = "seamless tileable texture, top-down view, flat even lighting, photorealistic"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local diffusers folder")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS, help="one prompt per tile")
    parser.add_argument("--style", default=DEFAULT_STYLE, help="appended to every prompt")
    parser.add_argument("--negative", default="text, watermark, border, frame, perspective, shadow")
    parser.add_argument("--tile-px", type=int, default=512, help="tile side in pixels (multiple of 8)")
    parser.add_argument("--stride", type=int, default=32, help="window stride in latent cells (16 or 8 for quality)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 3 on tiny, 30 otherwise)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--gutter", type=int, default=8, help="wrapped border around each tile in the atlas (px)")
    parser.add_argument("--sync", action="store_true", help="share one style across tiles (SyncDiffusion)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="tileable_materials", help="output folder")
    return parser.parse_args(argv)


def build_job(args: argparse.Namespace, pipeline) -> JointDiffusion:
    """An ``atlas`` geometry with one tile per prompt, ``tile_text`` and, with ``--sync``,
    the SyncDiffusion synchronizer (its anchor window pulls every tile toward one style)."""
    geometry = create(
        "geometry",
        "atlas",
        tiles=len(args.prompts),
        tile_height_px=args.tile_px,
        tile_width_px=args.tile_px,
        stride_latent=args.stride,
        gutter_px=args.gutter,
    )
    conditioner = create(
        "conditioner",
        "tile_text",
        prompts=args.prompts,
        style_prompt=args.style,
        negative_prompt=args.negative,
        guidance_scale=args.guidance,
    )
    synchronizer = create("synchronizer", "syncdiffusion") if args.sync else None
    return JointDiffusion(pipeline, geometry, [conditioner], synchronizer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = args.steps if args.steps is not None else (3 if args.model == "tiny" else 30)
    try:
        pipeline = load_pipeline(args.model, device=args.device)
        job = build_job(args, pipeline)
        result = job(num_inference_steps=steps, seed=args.seed)
        manifest = export_textures(result.images, args.out, prompts=args.prompts, layout=job.geometry.layout())
    except JointDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seams = {tile["name"]: seam_report(image) for tile, image in zip(manifest["tiles"], result.images)}
    print(json.dumps({"files": manifest["files"], "seam_ratio": seams}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
