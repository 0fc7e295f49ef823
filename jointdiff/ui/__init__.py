"""``jointdiff ui``: a web app (Gradio) to compose, estimate, queue, watch, cancel, resume and
browse jobs in the browser. It needs the ``ui`` extra (``pip install jointdiff[ui]``).

The app listens on 127.0.0.1 unless told otherwise; everything it writes (the job database,
outputs, checkpoints, uploads) is under its folder, and paths typed into it are confined to
that folder and the ``roots`` it is given (:mod:`jointdiff.ui.safety`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from jointdiff.jobs.queue import JobQueue
from jointdiff.ui.app import Settings, build_app
from jointdiff.ui.preview import Previewer
from jointdiff.utils.errors import ConfigError

LOCALHOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20


__all__ = ["start", "build_app", "Settings"]


def start(folder: str | Path, *, host: str = LOCALHOST, port: int = DEFAULT_PORT, roots: Sequence[str | Path] = (),
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, preview_every: int = 1, block: bool = True) -> tuple[Any, Any]:
    """Start the app on ``host:port`` with its jobs in ``folder``; returns ``(app, queue)``
    (with ``block`` False, once the server runs in the background: close both to stop)."""
    folder = Path(folder).absolute()
    uploads = folder / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {max_upload_mb!r}")
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # uploads stay under the app's folder
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for root in roots:
        if not Path(root).is_dir():
            raise ConfigError(f"--root {str(root)!r} is not a folder")
    queue = JobQueue(folder, preview=Previewer(), preview_every=preview_every)
    settings = Settings(folder, [Path(r).resolve() for r in roots] + [folder.resolve()])
    app = build_app(queue, settings)
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, allowed_paths=[str(folder)],
               max_file_size=f"{int(max_upload_mb * 1024)}kb", quiet=True, show_error=False)
    return app, queue
