"""The ``jointdiff`` command line: ``run``, ``generate``, ``sky``, ``texture``, ``batch``, ``plugins``, ``view`` and ``ui``.

Errors a user can cause are printed as one line (``jointdiff: error: ...``, exit status 2),
never as a traceback; outputs are written atomically, so a failed run leaves no file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from jointdiff.core.options import describe_options
from jointdiff.core.registry import get_registry
from jointdiff.image.output import changed_inputs, save_result
from jointdiff.jobs.batch import run_batch
from jointdiff.jobs.manifest import BadJobsError
from jointdiff.jobs.ray_batch import require_ray, run_ray_batch
from jointdiff.jobs.spec import Job, check_before_loading, read_job_file, resolve_paths, run_job, tomllib
from jointdiff.jobs.toml_writer import dump_job_toml
from jointdiff.surfaces.mesh_viewer import write_mesh_viewer
from jointdiff.surfaces.viewer import equirect_shape_note, serve_viewer, write_viewer
from jointdiff.utils.errors import ConfigError, JointDiffError
from jointdiff.utils.files import check_writable, free_output
from jointdiff.utils.quiet import command_output
from jointdiff.utils.version import VERSION as __version__

EXIT_USAGE = 2
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl")
"""``view`` shows these as meshes (only ``.glb`` is read; the others are told to convert)."""


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a TOML value (``8``, ``true``, ``"x"``, ``[1, 2]``);
    anything that is not valid TOML is taken as a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"option must look like key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _view_batch_size(text: str) -> int | str:
    """``--view-batch-size``: a whole number of windows, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None


def _plugin_table(name: str, assignments: Sequence[str]) -> dict[str, Any]:
    return {"name": name, **dict(parse_assignment(a) for a in assignments)}


def job_from_generate_args(args: argparse.Namespace) -> Job:
    text = {"name": "text", "prompt": args.prompt}
    if args.negative_prompt is not None:
        text["negative_prompt"] = args.negative_prompt
    if args.guidance_scale is not None:
        text["guidance_scale"] = args.guidance_scale
    model = {"id": args.model, "device": args.device, "dtype": args.dtype}
    for key in ("scheduler", "family"):
        if getattr(args, key):
            model[key] = getattr(args, key)
    if args.lora:
        model["loras"] = [_lora_table(text) for text in args.lora]
    return Job.from_dict(
        {
            "model": model,
            "geometry": _plugin_table(args.geometry, args.geometry_option),
            "conditioners": [text],
            "synchronizer": _plugin_table(args.sync, args.sync_option),
            "steps": args.steps,
            "seed": args.seed,
            "view_batch_size": args.view_batch_size,
            "fusion": args.fusion,
            **({"windows": args.windows} if args.windows else {}),
            "output": args.output,
            **_init_table(args),
        }
    )


def _init_table(args: argparse.Namespace) -> dict[str, Any]:
    """``{"init": ...}``: the ``[init]`` table of ``--init-image``, ``--strength``, ``--mask``,
    ``--feather-px`` and ``--place`` / ``--place-option`` (``sky``: a sphere placement);
    ``{}`` without ``--init-image`` (the others then refused, naming the flag)."""
    if args.init_image is None:
        for flag, value in (("--strength", args.strength), ("--mask", args.mask), ("--place", args.place)):
            if value is not None:
                raise ConfigError(f"{flag} {value!r} needs --init-image (the image to start from)")
        return {}
    # Absolute, so that the PNG's job (jointdiff run IMAGE.png) finds them from any folder.
    init: dict[str, Any] = {"image": os.path.abspath(args.init_image)}
    if args.mask is not None:
        init["mask"] = os.path.abspath(args.mask)
    for key in ("strength", "feather_px"):
        if getattr(args, key) is not None:
            init[key] = getattr(args, key)
    if args.place is not None:
        init["placement"] = {"kind": args.place, **dict(parse_assignment(a) for a in args.place_option)}
    elif args.place_option:
        raise ConfigError(f"--place-option {args.place_option[0]!r} needs --place KIND (sphere, canvas, loop, tileable, upscale)")
    return {"init": init}


def _lora_table(text: str) -> dict[str, Any]:
    """``PATH`` or ``PATH:SCALE`` → a ``[model] loras`` entry. A ``:`` followed by something
    that is not a number is refused (unless the whole text is an existing path, such as a
    Windows drive path), before the model loads."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            if not Path(text).expanduser().exists():
                raise ConfigError(
                    f"--lora {text!r}: the strength after ':' must be a number, got {scale!r} "
                    "(PATH or PATH:SCALE, e.g. style.safetensors:0.8)"
                ) from None
    return {"path": text}


def _prepare(job: Job, overwrite: bool, comm: Any = None) -> Path:
    """Everything that can fail before a model loads: the device, a local model, the output
    (writable; an existing file is kept unless ``overwrite``: the image goes to the next free
    name, said on stderr). Returns where the image will be written."""
    check_before_loading(job)
    return _check_output(job, overwrite, comm)


def _plan_output(path: str | Path, overwrite: bool) -> Path:
    target = check_writable(path)
    if not overwrite:
        target = free_output(target)
        if target != Path(path):
            _note(f"{str(path)!r} exists; writing {str(target)!r} instead (--overwrite replaces it)")
    return target


def _note(message: str) -> None:
    print(f"jointdiff: note: {message}", file=sys.stderr)


def _check_output(job: Job, overwrite: bool, comm: Any) -> Path:
    """Rank 0 checks the output path; under torchrun every rank stops if it is unusable."""
    if comm is None:
        return _plan_output(job.output, overwrite)
    failure, target = None, Path(job.output)
    if comm.rank == 0:
        try:
            target = _plan_output(job.output, overwrite)
        except ConfigError as error:
            failure = error
    comm.check(failure, "the output check")
    return target


def _execute(job: Job, quiet: bool, overwrite: bool, timeout_s: float | None = None, target: Path | None = None) -> int:
    """Run ``job`` and save it. Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks share the
    job's windows (see :mod:`jointdiff.engine.distributed`); rank 0 alone shows progress and writes."""
    # lazy: loads torch; jointdiff.cli must import without it
    from jointdiff.engine.distributed import init_from_env, local_device, shutdown
    comm = init_from_env(timeout_s)
    main_rank = comm is None or comm.rank == 0
    _running["job"] = job
    try:
        if comm is not None and job.model.device == "auto":
            job = Job.from_dict({**job.to_dict(), "model": {**job.model.model_dump(), "device": local_device()}})
        if target is None:
            target = _prepare(job, overwrite, comm)
        result = run_job(job, progress=not quiet and main_rank)
        if main_rank:
            result.metadata["job"]["output"] = str(target)
            for path in save_result(result, target, overwrite=overwrite):
                print(path)
    finally:
        if comm is not None:
            shutdown()
    return 0


def run_job_data(args: argparse.Namespace) -> dict[str, Any]:
    """The raw job of ``run``: the file's (paths relative to its folder) with the command
    line's overrides (paths relative to the working folder). Reproducing a PNG writes next
    to it under its own name (kept: see :func:`_plan_output`), never to the output path
    stored in it."""
    data, base = read_job_file(args.job)
    if base is not None:
        data = resolve_paths(data, base)
    else:
        if "id" not in (data.get("model") or {}):
            raise ConfigError(
                f"image {args.job!r} was made from a Python pipeline object without a name: its job names no "
                "model; save it as TOML, set [model] id, and run that"
            )
        data = {**data, "output": args.job}

        for where in changed_inputs(args.job):
            _note(f"{where} is not the file {args.job!r} was made from (its sha256 differs); the result will differ")
    for key in ("output", "seed", "steps"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.device:
        data["model"] = {**(data.get("model") or {}), "device": args.device}
    return data


class _EstimateShown(Exception):
    """Ends an ``--estimate`` run once the estimate is printed (before prompts are encoded)."""


def _estimate_only(job: Job) -> int:
    """``--estimate``: load the model (the FLOPs are counted on its networks), print the job's
    estimate (:meth:`JointDiffusion.estimate`) and whether the limits refuse it; nothing is
    denoised or written."""
    # lazy: loads torch; jointdiff.cli must import without it
    from jointdiff.cost import budget, profiling
    def show(estimate: Any, engine: Any) -> None:
        print(estimate.summary())
        try:
            budget.check(estimate, engine.max_megapixels, engine.memory_limit_gb, engine.geometry.name)
        except ConfigError as refused:
            _note(f"this job would be refused: {refused}")
        raise _EstimateShown

    check_before_loading(job)
    try:
        with profiling.session(on_estimate=show, count=False):
            run_job(job, progress=False)
    except _EstimateShown:
        return 0
    raise AssertionError("the engine ran without announcing its estimate")


def _profiled(profile: bool, execute: Any) -> int:
    """``--profile``: the estimate (on stderr) before the job, where the time went after."""
    if not profile:
        return execute()
    # lazy: loads torch; jointdiff.cli must import without it
    from jointdiff.cost import profiling

    def show(estimate: Any, engine: Any) -> None:
        print(f"jointdiff: estimate:\n{estimate.summary()}", file=sys.stderr)

    with profiling.session(on_estimate=show) as current:
        code = execute()
    for profile_ in current.profiles:
        print(f"jointdiff: profile:\n{profiling.format_profile(profile_)}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    job = Job.from_dict(run_job_data(args))
    if args.estimate:
        return _estimate_only(job)
    return _profiled(args.profile, lambda: _execute(job, args.quiet, args.overwrite, args.dist_timeout))


def cmd_generate(args: argparse.Namespace) -> int:
    job = job_from_generate_args(args)
    if args.estimate:
        return _estimate_only(job)
    target = _prepare(job, args.overwrite)
    if args.save_job:
        _save_job(job, args.save_job, args.overwrite)
    return _profiled(args.profile, lambda: _execute(job, args.quiet, args.overwrite, target=target))


def cmd_sky(args: argparse.Namespace) -> int:
    """``sky``: ``generate`` on the equirect geometry with the photo placed on the sphere."""
    angles = {"yaw_deg": args.yaw, "pitch_deg": args.pitch, "roll_deg": args.roll, "fov_deg": args.fov}
    args.geometry = "equirect"
    args.geometry_option = [f"width_px={args.width_px}", *args.geometry_option]
    args.init_image, args.place = args.photo, "sphere"
    args.place_option = [f"{key}={value!r}" for key, value in angles.items()]
    return cmd_generate(args)


def cmd_texture(args: argparse.Namespace) -> int:
    """``texture``: ``generate`` on the mesh geometry (the mesh's path made absolute, so that
    ``jointdiff run TEXTURE.png`` finds it from any folder; its sha256 is recorded)."""
    args.geometry = "mesh"
    options = [f"path={os.path.abspath(args.mesh)!r}", f"texture_px={args.texture_px}", *args.geometry_option]
    if args.keep_frame:
        options.append("normalize=false")
    args.geometry_option = options
    args.init_image = args.strength = args.mask = args.place = args.feather_px = None
    args.place_option = []
    return cmd_generate(args)


def _save_job(job: Job, path: str, overwrite: bool) -> None:
    """Write the job as TOML; an existing file is kept unless ``overwrite`` (next free name)."""
    target = Path(path) if overwrite else free_output(path, 1)
    if target != Path(path):
        _note(f"{path!r} exists; writing the job to {str(target)!r} instead (--overwrite replaces it)")
    try:
        target.write_text(dump_job_toml(job), encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"--save-job {path!r}: cannot write it ({error.strerror or error})") from None


def cmd_batch(args: argparse.Namespace) -> int:
    """``batch``: many jobs with models loaded once, here or on a Ray cluster (docs/batch.md).
    Exit status 0 when every job is done or skipped, 1 when some failed, 2 for bad jobs."""
    sources, address = list(args.sources), args.ray
    if address and Path(address).exists():  # `--ray jobs/`: the folder is a SOURCE
        sources, address = [address, *sources], ""
    if address is not None:
        require_ray()
    if not sources:
        raise ConfigError("batch: no SOURCE given; name job files, folders of them, or a manifest (.csv, .jsonl)")
    options = {
        "base": args.base, "retries": args.retries, "max_models": args.max_models, "overwrite": args.overwrite,
        "checkpoint_every": None if args.checkpoint_every == 0 else args.checkpoint_every,
        "summary": args.summary, "progress": not args.quiet,
    }
    try:
        if address is None:
            summary = run_batch(sources, **options)
        else:
            summary = run_ray_batch(sources, address=address or None, workers=args.workers, **options)
    except BadJobsError as error:
        for problem in error.problems[:50]:
            print(f"jointdiff: error: {problem}", file=sys.stderr)
        if len(error.problems) > 50:
            print(f"jointdiff: error: ... and {len(error.problems) - 50} more", file=sys.stderr)
        print(f"jointdiff: error: {len(error.problems)} bad job(s); nothing was run", file=sys.stderr)
        return EXIT_USAGE
    print(summary.text())
    return 0 if summary.ok else 1


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = get_registry()
    for info in registry.all():
        print(f"{info.kind} {info.name!r}  (plugin {info.plugin!r} from {info.distribution})")
        for line in describe_options(info.cls.Options):
            print(f"    {line}")
    for message in registry.conflicts.values():
        print(f"conflict: {message}")
    for plugin, why in registry.failures.items():
        print(f"failed: plugin {plugin!r}: {why}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """``ui``: the web app (jointdiff.ui) on 127.0.0.1, or on every interface with ``--listen``."""
    try:
        # lazy: loads gradio (the ui extra) and torch; jointdiff.cli must import without them
        import jointdiff.ui as ui
    except ImportError as error:
        raise ConfigError(f"jointdiff ui needs gradio ({error}); install it with: pip install 'jointdiff[ui]'") from None
    host = "0.0.0.0" if args.listen else ui.LOCALHOST
    if args.listen:
        _note(f"--listen: the UI is reachable from other machines on port {args.port}; anyone who reaches it can run "
              "jobs on this machine and read files under its --root folders")
    print(f"jointdiff ui: http://{'127.0.0.1' if not args.listen else host}:{args.port}/ (jobs in {args.folder})", file=sys.stderr)
    ui.start(args.folder, host=host, port=args.port, roots=args.root, max_upload_mb=args.max_upload_mb,
             preview_every=args.preview_every)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    """``view``: a panorama that is not 2:1 is said before its page is written (kept unless
    ``--overwrite``: the next free name, said)."""
    if Path(args.pano).suffix.lower() in MESH_SUFFIXES:
        return _view_mesh(args)
    note = equirect_shape_note(args.pano) if Path(args.pano).is_file() else None
    if note:
        _note(note)
    if args.output or not args.serve:
        print(write_viewer(args.pano, _plan_page(args.output or Path(args.pano).with_suffix(".html"), args.overwrite)))
    if args.serve:
        try:
            serve_viewer(args.pano, args.port)
        except KeyboardInterrupt:
            pass
    return 0


# -- the parser ----------------------------------------------------------------------------


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
    gen.add_argument("-g", "--geometry-option", action="append", default=[], metavar="KEY=VALUE",
                     help="a geometry option, value read as TOML (repeat: -g length_px=3072 -g wrap=true)")
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
    sky.add_argument("-g", "--geometry-option", action="append", default=[], metavar="KEY=VALUE",
                     help="another equirect option, value read as TOML (repeat: -g window_latent=64)")
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
    texture.add_argument("-g", "--geometry-option", action="append", default=[], metavar="KEY=VALUE",
                         help="another mesh option, value read as TOML (repeat: -g window_latent=64)")
    _add_job_options(texture, "texture.png")
    texture.set_defaults(func=cmd_texture)


def _view_mesh(args: argparse.Namespace) -> int:
    """``view MODEL.glb``: the textured mesh's orbit viewer page next to the model (or ``--output``)."""
    if args.serve:
        raise ConfigError(f"view: --serve shows panoramas only; open the page written for {args.pano!r} in a browser")
    target = _plan_page(args.output or Path(args.pano).with_suffix(".html"), args.overwrite)
    print(write_mesh_viewer(args.pano, target, overwrite=args.overwrite))
    return 0


def _plan_page(path: str | Path, overwrite: bool) -> Path:
    """Where a viewer page goes: ``path``, or unless ``overwrite`` the next free name when a
    file is there (said on stderr), as for images."""
    target = Path(path) if overwrite else free_output(path, 1)
    if target != Path(path):
        _note(f"{str(path)!r} exists; writing {str(target)!r} instead (--overwrite replaces it)")
    return target


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(args.debug or os.environ.get("JOINTDIFF_DEBUG"))
    with command_output(debug):
        return _dispatch(args, debug)


def _dispatch(args: argparse.Namespace, debug: bool) -> int:
    try:
        return args.func(args)
    except (JointDiffError, ValueError, TypeError, OSError, OverflowError) as error:
        if debug:
            raise
        print(f"jointdiff: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"jointdiff: interrupted; {_after_interrupt(_running.get('job'))}", file=sys.stderr)
        return 130


_running: dict[str, Any] = {}
"""The job being run (for the message after Ctrl-C)."""


def _after_interrupt(job: Job | None) -> str:
    """What a Ctrl-C left: the checkpoint that keeps the steps done and how to resume, or
    that nothing was written and how to make a long job resumable."""
    if job is None or job.checkpoint is None:
        return ("nothing was written; to resume a long job after an interruption, give it a checkpoint "
                "([checkpoint] path = \"job.ckpt\" in a job file, docs/job-spec.md)")
    where = job.checkpoint.path
    if not Path(where).exists():
        return f"no step had finished, so checkpoint {where!r} was not written yet; run the same command to start again"
    if job.checkpoint.resume:
        return f"the steps done are kept in checkpoint {where!r}: run the same command again to resume from it"
    return f"the steps done are kept in checkpoint {where!r}; set [checkpoint] resume = true and run the job again to resume"


def _one_line(error: BaseException) -> str:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if not isinstance(error, JointDiffError):
        message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
