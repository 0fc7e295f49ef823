"""The ``jointdiff`` command line: ``run``, ``generate``, ``plugins`` and ``view``.

Errors a user can cause are printed as one line (``jointdiff: error: ...``, exit status 2),
never as a traceback; outputs are written atomically, so a failed run leaves no file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .errors import ConfigError, JointDiffError
from .job import Job, tomllib

EXIT_USAGE = 2


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
            "output": args.output,
        }
    )


def _lora_table(text: str) -> dict[str, Any]:
    """``PATH`` or ``PATH:SCALE`` → a ``[model] loras`` entry."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass
    return {"path": text}


def _execute(job: Job, quiet: bool, timeout_s: float | None = None) -> int:
    """Run ``job`` and save it. Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks share the
    job's windows (see :mod:`jointdiff.distributed`); rank 0 alone shows progress and writes."""
    from .distributed import init_from_env, local_device, shutdown
    from .job import run_job
    from .output import save_result

    comm = init_from_env(timeout_s)
    main_rank = comm is None or comm.rank == 0
    try:
        _check_output(job, comm)
        if comm is not None and job.model.device == "auto":
            job = Job.from_dict({**job.to_dict(), "model": {**job.model.model_dump(), "device": local_device()}})
        result = run_job(job, progress=not quiet and main_rank)
        if main_rank:
            for path in save_result(result, job.output):
                print(path)
    finally:
        if comm is not None:
            shutdown()
    return 0


def _check_output(job: Job, comm: Any) -> None:
    """Rank 0 checks the output path; under torchrun every rank stops if it is unusable."""
    from .output import check_writable

    if comm is None:
        check_writable(job.output)
        return
    failure = None
    if comm.rank == 0:
        try:
            check_writable(job.output)
        except ConfigError as error:
            failure = error
    comm.check(failure, "the output check")


def cmd_run(args: argparse.Namespace) -> int:
    job = Job.from_file(args.job)
    overrides = {k: v for k, v in (("output", args.output), ("seed", args.seed), ("steps", args.steps)) if v is not None}
    if args.device:
        overrides["model"] = {**job.model.model_dump(), "device": args.device}
    if overrides:
        job = Job.from_dict({**job.to_dict(), **overrides})
    return _execute(job, args.quiet, args.dist_timeout)


def cmd_generate(args: argparse.Namespace) -> int:
    job = job_from_generate_args(args)
    if args.save_job:
        from .job_toml import dump_job_toml

        with open(args.save_job, "w", encoding="utf-8") as handle:
            handle.write(dump_job_toml(job))
    return _execute(job, args.quiet)


def cmd_plugins(args: argparse.Namespace) -> int:
    from .options import describe_options
    from .plugins import get_registry

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


def cmd_view(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .viewer import serve_viewer, write_viewer

    if args.output or not args.serve:
        print(write_viewer(args.pano, args.output or Path(args.pano).with_suffix(".html")))
    if args.serve:
        try:
            serve_viewer(args.pano, args.port)
        except KeyboardInterrupt:
            pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jointdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job file (.toml, .json, or a PNG made by jointdiff)")
    run.add_argument("job")
    run.add_argument("--output", "-o")
    run.add_argument("--seed", type=int)
    run.add_argument("--steps", type=int)
    run.add_argument("--device")
    run.add_argument("--quiet", "-q", action="store_true")
    run.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                     help="under torchrun: timeout of every collective (default 600)")
    run.set_defaults(func=cmd_run)

    gen = sub.add_parser("generate", help="generate from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--negative-prompt", help="classifier-free guidance families only (SD, SDXL, SD3, Qwen-Image)")
    gen.add_argument("--guidance-scale", type=float, help="default: the model family's")
    gen.add_argument("--geometry", default="strip")
    gen.add_argument("-g", "--geometry-option", action="append", default=[], metavar="KEY=VALUE")
    gen.add_argument("--sync", default="none", help="synchronizer name")
    gen.add_argument("-s", "--sync-option", action="append", default=[], metavar="KEY=VALUE")
    gen.add_argument("--model", default="tiny", help="hub id, local folder, single file, or a tiny model (tiny, tiny-sdxl, tiny-flux, ...)")
    gen.add_argument("--family", help="model family (sd, sdxl, sd3, flux, flux2, qwenimage); default: detected")
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="a LoRA (repeat for several)")
    gen.add_argument("--scheduler")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--view-batch-size", type=int, default=4)
    gen.add_argument("--fusion", choices=["latent", "x0"], help="default: the geometry's preferred fusion")
    gen.add_argument("--output", "-o", default="jointdiff.png")
    gen.add_argument("--save-job", metavar="JOB.toml", help="also write the job as TOML")
    gen.add_argument("--quiet", "-q", action="store_true")
    gen.set_defaults(func=cmd_generate)

    plugins = sub.add_parser("plugins", help="list discovered plugins and their options")
    plugins.set_defaults(func=cmd_plugins)

    view = sub.add_parser("view", help="show a 360° panorama in a self-contained HTML viewer")
    view.add_argument("pano", help="equirectangular image (PNG, JPEG or WebP)")
    view.add_argument("--output", "-o", metavar="PAGE.html", help="page to write (default: PANO with .html)")
    view.add_argument("--serve", action="store_true", help="serve the page on http://127.0.0.1:PORT/")
    view.add_argument("--port", type=int, default=8360)
    view.set_defaults(func=cmd_view)
    return parser


def _quiet_libraries() -> None:
    """Library warnings (hub retries, deprecations) would bury the one line a user needs."""
    import logging

    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.debug or os.environ.get("JOINTDIFF_DEBUG")):
        _quiet_libraries()
    try:
        return args.func(args)
    except (JointDiffError, ValueError, TypeError, OSError) as error:
        if args.debug or os.environ.get("JOINTDIFF_DEBUG"):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not isinstance(error, JointDiffError):
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"jointdiff: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jointdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
