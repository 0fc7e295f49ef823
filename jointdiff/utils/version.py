"""jointdiff's version (the one place it is written; ``pyproject.toml`` reads the same)."""

VERSION = "0.1.0"
