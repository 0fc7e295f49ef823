"""jointdiff's built-in plugins, registered through the ``jointdiff`` entry-point group."""
