"""A 360° sky from a FLUX model, optionally with LoRAs: generate, export, view.

Loads the model with :func:`jointdiff.load_model` (any family works; FLUX.1 by default) and
the LoRAs given with ``--lora PATH[:SCALE]``, generates an equirectangular panorama with the
``equirect`` geometry (perspective views all over the sphere, poles included) and the
``text`` conditioner, then writes into ``--out`` the same exports as ``examples/sky360.py``:
``sky.png`` / ``sky.jpg`` with GPano XMP metadata, six cube faces and Unity's horizontal
cross in ``cubemap/``, and ``sky.html``, a self-contained offline 360° viewer.

FLUX.1 [dev] is guidance-distilled: the guidance scale is an input of the transformer and
there is no negative prompt (``--guidance`` unset: the family's default, 3.5).

Runs offline on the built-in ``tiny-flux`` model by default, without a LoRA: its weights
are random, so the "sky" is noise, but every file is produced. With a real model::

    python examples/flux_sky360_lora.py --model black-forest-labs/FLUX.1-dev \\
        --lora path/to/sky_style.safetensors:0.8 --steps 28 --out flux_sky
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from jointdiff import JointDiffusion, create, load_model
from jointdiff.surfaces.export360 import save_cubemap, save_equirect
from jointdiff.surfaces.viewer import write_viewer
from jointdiff.utils.errors import JointDiffError

DEFAULT_PROMPT = "a 360 degree equirectangular panorama of a clear sky at golden hour above a calm sea, clouds"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-flux", help="'tiny-flux', a hub id or a local diffusers folder")
    parser.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="a LoRA file, folder or hub id, with an optional strength (repeat for several)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model family's")
    parser.add_argument("--width-px", type=int, default=None, help="equirect width (default: 512 on tiny, 4096 otherwise)")
    parser.add_argument("--window-latent", type=int, default=None, help="view side in latent cells (default: 16 on tiny, the model's native)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 3 on tiny, 28 otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="flux_sky360", help="output folder")
    return parser.parse_args(argv)


def lora_spec(text: str) -> dict:
    """``PATH`` or ``PATH:SCALE`` → a LoRA entry of :func:`jointdiff.load_model`."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass
    return {"path": text, "scale": 1.0}


def build_job(args: argparse.Namespace, model) -> JointDiffusion:
    """The equirect geometry (small on the tiny model) and the text conditioner."""
    tiny = args.model.startswith("tiny")
    window = args.window_latent or (16 if tiny else None)  # None: the model's native window
    geometry = create("geometry", "equirect", width_px=args.width_px or (512 if tiny else 4096), window_latent=window)
    text = create("conditioner", "text", prompt=args.prompt, guidance_scale=args.guidance)
    return JointDiffusion(model, geometry, [text])


def export(pano: Image.Image, out: Path) -> list[Path]:
    """Equirect PNG + JPEG with GPano XMP, six cube faces and the horizontal cross, the viewer."""
    (out / "cubemap").mkdir(parents=True, exist_ok=True)
    paths = [save_equirect(pano, out / "sky.png"), save_equirect(pano, out / "sky.jpg", quality=92)]
    paths += save_cubemap(pano, out / "cubemap" / "sky.png", layout="faces")
    paths += save_cubemap(pano, out / "cubemap" / "sky_cross.png", layout="dice")
    paths.append(write_viewer(paths[0], out / "sky.html"))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tiny = args.model.startswith("tiny")
    steps = args.steps if args.steps is not None else (3 if tiny else 28)
    if tiny:
        print(f"note: {args.model} has random weights; its panorama is noise, not a sky", file=sys.stderr)
    try:
        model = load_model(args.model, device=args.device, loras=[lora_spec(text) for text in args.lora])
        result = build_job(args, model)(num_inference_steps=steps, seed=args.seed)
        for path in export(result.images[0], Path(args.out)):
            print(path)
    except JointDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
