"""Library chatter kept off stdout, which a run keeps for the paths it writes, and the
command line's stderr conventions (:func:`command_output`).

Libraries print while they load (torch.hub's ``Downloading: ...``, lpips' ``Setting up
[LPIPS] ...``, a checkpoint converter's progress). :func:`stdout_folded` catches what they
print to stdout during a block and says it on one line (logger ``jointdiff.libraries``, a
``jointdiff: note:`` in the CLI), so ``jointdiff generate ... | xargs`` sees only paths.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("jointdiff.libraries")
MAX_NOTE_CHARS = 300


@contextlib.contextmanager
def stdout_folded(what: str) -> Iterator[None]:
    """Run the block with stdout caught; what was printed is logged as one line naming
    ``what`` (the lines joined by `` | ``, cut at :data:`MAX_NOTE_CHARS`)."""
    caught = io.StringIO()
    try:
        with contextlib.redirect_stdout(caught):
            yield
    finally:
        lines = [line.strip() for line in caught.getvalue().replace("\r", "\n").splitlines() if line.strip()]
        if lines:
            text = " | ".join(dict.fromkeys(lines))
            cut = text if len(text) <= MAX_NOTE_CHARS else text[: MAX_NOTE_CHARS - 1] + "…"
            logger.info("%s printed: %s", what, cut)


def quiet_libraries() -> None:
    """Library warnings (hub retries, deprecations, tokenizer lengths) would bury the one line
    a user needs. Set through the environment and logging, so nothing heavy is imported."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def show_notes() -> None:
    """jointdiff's own log records (what the image loader had to do, the LoRAs loaded) as
    ``jointdiff: note:`` lines on stderr; stdout is kept for the paths written."""

    class Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            print(f"jointdiff: note: {record.getMessage()}", file=sys.stderr)  # the stderr of now

    logger = logging.getLogger("jointdiff")
    if not any(type(handler).__name__ == "Notes" for handler in logger.handlers):
        logger.addHandler(Notes())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def warnings_as_lines() -> None:
    """Python warnings (ours: a prompt cut at 77 tokens; a library's: a deprecation) as one
    ``jointdiff: warning:`` line each on stderr, said once, without the source line; with
    ``--debug`` Python shows them as it does."""

    said: set[str] = set()

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = (str(message).strip().splitlines() or [category.__name__])[0]
        if text not in said:
            said.add(text)
            print(f"jointdiff: warning: {text}", file=sys.stderr)

    warnings.showwarning = show


@contextlib.contextmanager
def command_output(debug: bool) -> Iterator[None]:
    """The CLI's stderr conventions (notes, one-line warnings, quiet libraries) for one
    command; the process's logging and warning settings are put back after it, so calling
    the CLI's ``main`` from Python (or a test) leaves them as they were."""
    logger = logging.getLogger("jointdiff")
    saved = (logger.level, logger.propagate, list(logger.handlers), warnings.showwarning)
    try:
        if not debug:
            quiet_libraries()
            warnings_as_lines()
        show_notes()
        yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
        warnings.showwarning = saved[3]
