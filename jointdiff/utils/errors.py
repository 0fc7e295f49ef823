"""Errors a user can cause, kept distinct so the CLI can print them as one line."""

from __future__ import annotations


class JointDiffError(Exception):
    """Base class of the errors jointdiff raises for bad input or an unusable environment."""


class ConfigError(JointDiffError, ValueError):
    """A job, plugin name or option is invalid. The message names the argument and its value."""


class PluginError(JointDiffError):
    """A plugin failed to load or registered something invalid."""


class ModelLoadError(JointDiffError):
    """The model could not be loaded (missing path, unreachable hub, unreadable checkpoint)."""


class NonFiniteLatentsError(JointDiffError, FloatingPointError):
    """NaN or inf appeared in the canvas latents during denoising."""
