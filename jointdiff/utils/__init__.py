"""Helpers every layer may use, and that import nothing else from jointdiff: the errors a
user can cause, safe file writes, stable fingerprints, the version, and the map of module
paths that moved (old imports keep working for one release)."""
