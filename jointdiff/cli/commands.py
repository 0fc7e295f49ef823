"""The commands of the ``jointdiff`` command line: each ``cmd_*`` takes the parsed arguments
and returns the exit status; errors a user can cause are raised for :func:`jointdiff.cli.main`
to print as one line."""

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
from jointdiff.utils.errors import ConfigError
from jointdiff.utils.files import check_writable, free_output

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
    running_job["job"] = job
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


running_job: dict[str, Any] = {}


"""The job being run (for the message after Ctrl-C)."""
