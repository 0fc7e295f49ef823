"""The ``none`` synchronizer: windows are not synchronized (plain MultiDiffusion)."""

from __future__ import annotations

from jointdiff.plugin import Synchronizer, hookimpl


class NoSynchronizer(Synchronizer):
    """Leaves every window's latent as it is (the base class's behaviour, named)."""

    name = "none"

    @classmethod
    def example_options(cls) -> dict:
        return {}

    @classmethod
    def zero_strength_options(cls) -> dict:
        """Options of an instance that leaves latents unchanged: every instance does."""
        return {}


@hookimpl
def register_synchronizers(register):
    register(NoSynchronizer)
