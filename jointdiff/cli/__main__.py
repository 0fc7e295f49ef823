"""``python -m jointdiff.cli`` (e.g. under ``torchrun``): the ``jointdiff`` command."""

import sys

from jointdiff.cli import main

sys.exit(main())
