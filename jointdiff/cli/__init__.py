"""The ``jointdiff`` command line: ``run``, ``generate``, ``sky``, ``texture``, ``batch``, ``plugins``, ``view`` and ``ui``.

Errors a user can cause are printed as one line (``jointdiff: error: ...``, exit status 2),
never as a traceback; outputs are written atomically, so a failed run leaves no file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from jointdiff.cli.commands import EXIT_USAGE, job_from_generate_args, parse_assignment, running_job
from jointdiff.cli.parser import build_parser
from jointdiff.jobs.spec import Job
from jointdiff.utils.errors import JointDiffError
from jointdiff.utils.quiet import command_output

__all__ = ["build_parser", "job_from_generate_args", "main", "parse_assignment"]


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
        print(f"jointdiff: interrupted; {_after_interrupt(running_job.get('job'))}", file=sys.stderr)
        return 130


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
