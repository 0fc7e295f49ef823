"""The ``jointdiff`` argument parser: every command, its options and their defaults
(``jointdiff COMMAND --help``)."""

from __future__ import annotations

import argparse
from typing import Any

from jointdiff.cli.commands import (
    EXIT_USAGE,
    cmd_batch,
    cmd_generate,
    cmd_plugins,
    cmd_run,
    cmd_sky,
    cmd_texture,
    cmd_ui,
    cmd_view,
)
from jointdiff.utils.version import VERSION as __version__


def _view_batch_size(text: str) -> int | str:
    """``--view-batch-size``: a whole number of windows, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error: ``jointdiff: error: ...``, status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"jointdiff: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where there is a default to show (not for unset options,
    whose help says what unset means, nor for flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _TopHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """Keeps the line breaks of the examples."""


DESCRIPTION = """\
Images of any size from fixed-size diffusion models, by joint diffusion over
overlapping windows. Errors are one line (exit status 2), reported before a
model loads wherever the job tells."""


EXAMPLES = """examples:
  jointdiff generate "a city skyline at night" -g length_px=3072 --steps 50 -o city.png
  jointdiff run job.toml          # a whole job in a TOML file (paths relative to its folder)
  jointdiff run city.png          # reproduce an image from its embedded job: writes city-1.png
  jointdiff sky photo.jpg --fov 75 --prompt "a mountain lake" -o sky.png   # photo → 360° sky
  jointdiff batch prompts.csv --base sky.toml   # one image per row, the model loaded once
  jointdiff plugins               # plugins, their options, defaults and allowed values
"""


def _subparser(sub: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_HelpFormatter)


def _add_output_options(parser: argparse.ArgumentParser, output_help: str, default: str | None) -> None:
    parser.add_argument("--output", "-o", default=default, metavar="PATH", help=output_help)
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing output; without it an existing file is kept and the image goes to "
        "the next free name (NAME-1.png, NAME-2.png, ...)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    exclusive = parser.add_mutually_exclusive_group()
    exclusive.add_argument("--profile", action="store_true",
                        help="print the job's estimate (model evaluations, FLOPs, memory) before it runs and where "
                        "the time went after (setup, model, synchronization, fusion, decode), on stderr")
    exclusive.add_argument("--estimate", action="store_true",
                        help="print the job's estimate and exit: loads the model (FLOPs are counted on its "
                        "networks), denoises and writes nothing")


def _add_geometry_options(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """``-g KEY=VALUE`` (repeatable): geometry options, values read as TOML."""
    parser.add_argument("-g", "--geometry-option", action="append", default=[], metavar="KEY=VALUE",
                        help=f"{what}, value read as TOML (repeat: {example})")


def _add_run(sub: Any) -> None:
    run = _subparser(
        sub, "run", "run a job file (.toml, .json, or a PNG made by jointdiff)",
        "Run a job: a TOML or JSON job file (relative paths in it are relative to its folder), or a "
        "PNG made by jointdiff (its embedded job and seed; the new image is written next to it).",
    )
    run.add_argument("job", metavar="JOB", help="job.toml, job.json, or IMAGE.png made by jointdiff")
    _add_output_options(
        run, "image to write (relative to the working folder); unset: the job's output, or for a PNG "
        "the PNG's own name, kept (the image goes to NAME-1.png)", None,
    )
    run.add_argument("--seed", type=int, help=f"replace the job's seed (0..{2**63 - 1}); unset: the job's")
    run.add_argument("--steps", type=int, help="replace the job's number of denoising steps; unset: the job's")
    run.add_argument("--device", help="replace the job's device: auto, cpu, cuda, cuda:N or mps; unset: the job's")
    run.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                     help="under torchrun: timeout of every collective; unset: 600")
    run.set_defaults(func=cmd_run)


def _add_generate(sub: Any) -> None:
    gen = _subparser(sub, "generate", "generate from a prompt",
                     "Generate an image from a prompt: the same job as a TOML file, built from flags.")
    gen.add_argument("prompt", help="what every window shows (the 'text' conditioner's prompt)")
    gen.add_argument("--geometry", default="strip", help="geometry plugin: strip, grid, equirect, cubemap, torus, atlas, cube_texture, ... (see 'jointdiff plugins')")
    _add_geometry_options(gen, "a geometry option", "-g length_px=3072 -g wrap=true")
    gen.add_argument("--init-image", metavar="IMAGE", help="start from this image (docs/from-an-image.md); "
                     "without --place it must have the canvas's size")
    gen.add_argument("--place", choices=["sphere", "canvas", "loop", "tileable", "upscale"],
                     help="how --init-image goes on the canvas (the [init.placement] kind); unset: as is")
    gen.add_argument("-p", "--place-option", action="append", default=[], metavar="KEY=VALUE",
                     help="a placement option, value read as TOML (repeat: -p yaw_deg=90 -p fov_deg=75)")
    _add_init_options(gen)
    _add_job_options(gen, "jointdiff.png")
    gen.set_defaults(func=cmd_generate)


def _add_init_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strength", type=float, help="how far from the init image to start, 0..1 (1: from noise, "
                        "the kept part held); unset: 1, 0.4 for --place upscale, 0.8 for a plain img2img")
    parser.add_argument("--mask", metavar="MASK", help="keep mask of the init image, its size (white = keep, black = generate)")
    parser.add_argument("--feather-px", type=int, help="soften the keep mask this many pixels inside its edge; unset: 16")


def _add_job_options(gen: argparse.ArgumentParser, output_default: str) -> None:
    """The options ``generate`` and ``sky`` share: prompt guidance, synchronizer, model, run, output."""
    gen.add_argument("--negative-prompt", help="what to steer away from; classifier-free guidance families only (SD, SDXL, SD3, Qwen-Image)")
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale; unset: the model family's (7.5 for SD)")
    gen.add_argument("--sync", default="none", help="synchronizer plugin: none (MultiDiffusion) or syncdiffusion")
    gen.add_argument("-s", "--sync-option", action="append", default=[], metavar="KEY=VALUE",
                     help="a synchronizer option, value read as TOML (repeat)")
    gen.add_argument("--model", default="tiny", help="hub id, local diffusers folder, single-file checkpoint, or a built-in tiny model (tiny, tiny-sdxl, tiny-flux, ...)")
    gen.add_argument("--family", help="model family: sd, sdxl, sd3, flux, flux2, qwenimage; unset: detected")
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="a LoRA file, folder or hub id with its strength (repeat for several)")
    gen.add_argument("--scheduler", help="ddim, ddpm, pndm, euler, euler_a, dpm++, unipc, lcm; flow_euler for flow-matching families; unset: the model's")
    gen.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps")
    gen.add_argument("--dtype", default="auto", help="auto (float16/bfloat16 on CUDA, float32 elsewhere), float32, float16 or bfloat16")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps")
    gen.add_argument("--seed", type=int, default=0, help=f"random seed (0..{2**63 - 1})")
    gen.add_argument("--view-batch-size", type=_view_batch_size, default=4, metavar="N|auto",
                     help="windows per model call; auto: as many as fit the free CUDA memory (4 elsewhere)")
    gen.add_argument("--fusion", choices=["latent", "x0", "x0_renoise"],
                     help="latent (MultiDiffusion), x0 (SyncTweedies) or x0_renoise (few-step models); unset: the geometry's preferred")
    gen.add_argument("--windows", choices=["overlap", "shifted"],
                     help="overlap (MultiDiffusion) or shifted (SpotDiffusion: non-overlapping, moved every step); unset: overlap")
    _add_output_options(gen, "image to write (.png carries the job; .jpg, .webp)", output_default)
    gen.add_argument("--save-job", metavar="JOB.toml", help="also write the job as TOML")


def _add_sky(sub: Any) -> None:
    sky = _subparser(
        sub, "sky", "a 360° environment around a photo (equirect)",
        "Photo → 360° environment: PHOTO (a perspective photo of horizontal field of view --fov, "
        "looking at --yaw, --pitch) is placed on an equirectangular canvas and kept; the rest of the "
        "sphere is generated around it. Shorthand for: generate PROMPT --geometry equirect "
        "-g width_px=W --init-image PHOTO --place sphere -p yaw_deg=... (docs/from-an-image.md).",
    )
    sky.add_argument("photo", metavar="PHOTO", help="the photo (PNG, JPEG, WebP, ...)")
    sky.add_argument("--prompt", default="a photo", help="what the views show: describe the photo's scene")
    sky.add_argument("--yaw", type=float, default=0.0, metavar="DEG", help="where the photo looks, degrees; positive: right (east)")
    sky.add_argument("--pitch", type=float, default=0.0, metavar="DEG", help="degrees; positive: up")
    sky.add_argument("--roll", type=float, default=0.0, metavar="DEG", help="degrees, as py360convert's in_rot_deg")
    sky.add_argument("--fov", type=float, default=90.0, metavar="DEG", help="the photo's horizontal field of view, in (0, 180)")
    sky.add_argument("--width-px", type=int, default=2048, help="panorama width (height = width / 2)")
    _add_geometry_options(sky, "another equirect option", "-g window_latent=64")
    _add_init_options(sky)
    _add_job_options(sky, "sky.png")
    sky.set_defaults(func=cmd_sky)


def _add_texture(sub: Any) -> None:
    texture = _subparser(
        sub, "texture", "texture a 3D mesh (OBJ, glTF/GLB, PLY): texture PNGs, GLB, OBJ + MTL, turntable",
        "Mesh → texture: the mesh's UV texture is the canvas, rendered views of the mesh are the windows "
        "(SyncMVD's ten views by default). Writes one texture PNG per material (carrying the job), "
        "a textured GLB, OBJ + MTL and a turntable preview next to it. Shorthand for: generate PROMPT "
        "--geometry mesh -g path=MESH (docs/textures.md).",
    )
    texture.add_argument("mesh", metavar="MESH", help="the mesh file; meshes without UVs are unwrapped with xatlas")
    texture.add_argument("prompt", help="what the object looks like")
    texture.add_argument("--texture-px", type=int, default=1024, help="side of every output texture")
    texture.add_argument("--keep-frame", action="store_true", help="keep the mesh's own frame (default: centred, unit sphere)")
    _add_geometry_options(texture, "another mesh option", "-g window_latent=64")
    _add_job_options(texture, "texture.png")
    texture.set_defaults(func=cmd_texture)


def _add_batch(sub: Any) -> None:
    batch = _subparser(
        sub, "batch", "run many jobs: job files, folders of them, or a manifest of overrides on a base job",
        "Run many jobs with each model loaded once (docs/batch.md). SOURCE is a job file (.toml, .json, "
        "a jointdiff PNG), a folder of job files, or a manifest (.csv, .jsonl: one row per output, its "
        "columns override the --base job). Every job is checked before anything runs; outputs already made "
        "by the same job are skipped; interrupted jobs resume from their checkpoints; a failing job is "
        "retried, then recorded, and the rest go on. A summary (CSV and JSONL) is written beside the outputs.",
    )
    batch.add_argument("sources", nargs="*", metavar="SOURCE", help="job files, folders of them, manifests (.csv, .jsonl)")
    batch.add_argument("--base", metavar="JOB", help="the job a manifest's rows change (.toml, .json, jointdiff PNG)")
    batch.add_argument("--retries", type=int, default=2, help="retries of a job that fails (not for errors in the job itself)")
    batch.add_argument("--max-models", type=int, default=1, help="loaded models kept per process (or per Ray worker)")
    batch.add_argument("--checkpoint-every", type=int, default=10, metavar="STEPS",
                       help="checkpoint each job every STEPS steps, so an interrupted batch resumes; 0: never")
    batch.add_argument("--overwrite", action="store_true",
                       help="replace outputs made by another job; without it such outputs stop the batch before it runs")
    batch.add_argument("--summary", metavar="STEM", help="write the summary to STEM.csv and STEM.jsonl; unset: "
                       "batch-summary beside the outputs")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    batch.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run on a Ray cluster (pip install 'jointdiff[ray]'): one worker per GPU, or per CPU "
                       "without GPUs; ADDRESS: 'auto', ray://HOST:10001; unset: the RAY_ADDRESS cluster or a local one")
    batch.add_argument("--workers", type=int, help="with --ray: number of workers; unset: one per GPU (or CPU)")
    batch.set_defaults(func=cmd_batch)


def _add_view(sub: Any) -> None:
    view = _subparser(sub, "view", "show a 360° panorama or a textured mesh (.glb) in a self-contained HTML viewer")
    view.add_argument("pano", metavar="PANO|MODEL.glb", help="equirectangular image (PNG, JPEG or WebP) or binary glTF model")
    view.add_argument("--output", "-o", metavar="PAGE.html", help="page to write; unset: the input with .html")
    view.add_argument("--overwrite", action="store_true", help="replace an existing page (else: the next free name)")
    view.add_argument("--serve", action="store_true", help="serve the panorama's page on http://127.0.0.1:PORT/")
    view.add_argument("--port", type=int, default=8360, help="port of --serve")
    view.set_defaults(func=cmd_view)


def _add_ui(sub: Any) -> None:
    ui = _subparser(sub, "ui", "a web UI: compose, preview, queue and browse jobs in the browser (needs jointdiff[ui])",
                    "A web UI (Gradio): compose a job from the plugins' forms, estimate it, watch it form, cancel "
                    "and resume it, and browse the history; jobs run one at a time per device.")
    ui.add_argument("--folder", default="jointdiff-ui", metavar="DIR",
                    help="where the job database, outputs, checkpoints and uploads are kept")
    ui.add_argument("--port", type=int, default=7860, help="port to listen on")
    ui.add_argument("--listen", action="store_true",
                    help="listen on every network interface (default: 127.0.0.1 only); prints a warning")
    ui.add_argument("--root", action="append", default=[], metavar="DIR",
                    help="a folder whose files (models, LoRAs, images) jobs may name (repeat); the app's folder always is")
    ui.add_argument("--max-upload-mb", type=float, default=20, help="largest upload accepted")
    ui.add_argument("--preview-every", type=int, default=1, metavar="N", help="a preview every N steps")
    ui.set_defaults(func=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jointdiff", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=_TopHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jointdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="'jointdiff COMMAND --help' for its options")
    _add_run(sub)
    _add_generate(sub)
    _add_sky(sub)
    _add_texture(sub)
    _add_batch(sub)
    plugins = _subparser(sub, "plugins", "list discovered plugins and their options (types, defaults, allowed values)")
    plugins.set_defaults(func=cmd_plugins)
    _add_view(sub)
    _add_ui(sub)
    return parser
