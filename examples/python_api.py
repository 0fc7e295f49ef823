"""Compose a job in Python: plugin objects by name, a pipeline, the result's latents.

Runs offline on the built-in tiny model (its image is noise); pass --model with a Stable
Diffusion 1.x/2.x hub id or folder for a real panorama.
"""

from __future__ import annotations

import argparse

from jointdiff import JointDiffusion, create, load_pipeline
from jointdiff.image.output import save_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompt", default="a photo of a mountain range at dawn")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="loop.png")
    args = parser.parse_args()

    pipeline = load_pipeline(args.model, scheduler="ddim")
    job = JointDiffusion(
        pipeline,
        geometry=create("geometry", "strip", length_px=1536, stride_latent=16, wrap=True),
        conditioners=[create("conditioner", "text", prompt=args.prompt)],
        synchronizer=create("synchronizer", "none"),
        view_batch_size=6,
    )
    result = job(num_inference_steps=args.steps, seed=0, callback=lambda i, t, canvas: None)
    print("canvas latents:", tuple(result.latents.shape))
    for path in save_result(result, args.output):
        print(path)


if __name__ == "__main__":
    main()
