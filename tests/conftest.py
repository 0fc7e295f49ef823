"""Shared fixtures: everything offline, tiny models built in code with fixed seeds."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# One thread per test process: pytest-xdist runs one process per core, and OpenMP threads
# spinning against each other on a busy machine cost far more than they gain.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The built-in tiny SD pipeline on the CPU (shared; tests must not mutate it)."""
    from jointdiff.models.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="float32")


@pytest.fixture
def fresh_tiny_pipeline():
    """A private tiny pipeline a test may modify (e.g. swap the scheduler)."""
    from jointdiff.models.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="float32")


def make_job(pipeline, geometry="strip", geometry_options=None, prompt="a photo of a city", **engine_kwargs):
    """A JointDiffusion of built-in plugins created by name."""
    from jointdiff import JointDiffusion
    from jointdiff.core.registry import create

    geometry_obj = create("geometry", geometry, **(geometry_options or {}))
    text = create("conditioner", "text", prompt=prompt, guidance_scale=7.5)
    return JointDiffusion(pipeline, geometry_obj, [text], **engine_kwargs)


def assert_close_to_stock(ours, stock, rtol: float = 1e-4) -> None:
    """Largest difference from a stock pipeline's result within ``rtol`` of its largest value."""
    diff = (ours - stock).abs().max().item()
    scale = stock.abs().max().item()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} vs max |stock| {scale:.3g}"
