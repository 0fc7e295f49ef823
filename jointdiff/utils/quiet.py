"""Library chatter kept off stdout, which a run keeps for the paths it writes.

Libraries print while they load (torch.hub's ``Downloading: ...``, lpips' ``Setting up
[LPIPS] ...``, a checkpoint converter's progress). :func:`stdout_folded` catches what they
print to stdout during a block and says it on one line (logger ``jointdiff.libraries``, a
``jointdiff: note:`` in the CLI), so ``jointdiff generate ... | xargs`` sees only paths.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

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
