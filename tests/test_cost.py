"""Cost accounting (jointdiff.cost.profiling): the estimate's model evaluations equal the rows that
run (forward pre-hooks on the denoiser, the VAE decoder and LPIPS), its FLOPs are within a
stated factor of a FlopCounterMode count of the whole job, and the time per phase adds up to
the wall time. Tiny model, a 3-window strip of 16-cell windows, 2–4 steps."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from jointdiff import JointDiffusion
from jointdiff.cli import main
from jointdiff.core.registry import create
from jointdiff.cost.profiling import EvaluationCounter, PhaseTimer, count_evaluations, format_flops

STRIP = {"length_px": 256, "window_latent": 16, "stride_latent": 8}  # 3 windows
FLOP_FACTOR = 1.5
"""The FLOP estimate is within this factor of FlopCounterMode's count of the whole job."""


@pytest.fixture(scope="module")
def tiny_model():
    from jointdiff.models.loading import load_model

    return load_model("tiny", device="cpu", dtype="float32")


def _job(model, conditioner=None, synchronizer=None, view_batch_size=2):
    conditioner = conditioner or create("conditioner", "text", prompt="a city", guidance_scale=7.5)
    return JointDiffusion(model, create("geometry", "strip", **STRIP), [conditioner], synchronizer,
                          view_batch_size=view_batch_size)


def _run_counted(job, steps, extra=None, flops=False):
    """Run ``job``; the rows through each network, and FlopCounterMode's count (or None)."""
    with EvaluationCounter.for_model(job.model, **(extra or {})) as counter:
        if not flops:
            job(steps, progress=False)
            return counter.sorted_counts(), None
        with FlopCounterMode(display=False) as flop_counter:
            job(steps, progress=False)
    return counter.sorted_counts(), flop_counter.get_total_flops()


def _assert_close_flops(estimated: float, measured: float) -> None:
    ratio = estimated / measured
    assert 1 / FLOP_FACTOR <= ratio <= FLOP_FACTOR, f"estimate {format_flops(estimated)} vs counted {format_flops(measured)}"


def test_multidiffusion_with_guidance_counts_flops_and_time(tiny_model):
    job = _job(tiny_model)
    estimate = job.estimate(2)
    expected = estimate.evaluations.total()
    assert expected == {"denoiser.forward": 2 * 3 * 2, "decoder.forward": 1}  # steps × windows × CFG rows
    measured, flops = _run_counted(job, 2, flops=True)
    assert measured == expected
    _assert_close_flops(estimate.flops.total, flops)
    assert "model evaluations" in estimate.summary() and "FLOPs:" in estimate.summary()
    # Where the time went adds up to the wall time the caller sees.
    start = time.perf_counter()
    profile = job(2, progress=False).metadata["profile"]
    wall = time.perf_counter() - start
    assert set(profile["seconds"]) == {"setup", "model", "synchronization", "fusion", "decode", "other"}
    assert profile["seconds"]["model"] > 0 and profile["seconds"]["decode"] > 0
    assert abs(sum(profile["seconds"].values()) - wall) <= 0.1 * wall


def test_region_branches_multiply_the_windows(tiny_model):
    regions = create("conditioner", "regions", prompt="a lake", guidance_scale=7.5,
                     regions=[{"prompt": "a boat", "rect": [0, 0, 128, 128]}], bootstrap_steps=0)
    job = _job(tiny_model, regions, view_batch_size=3)
    estimate = job.estimate(2)
    assert estimate.branches == 2
    assert estimate.evaluations.total() == {"denoiser.forward": 2 * 3 * 2 * 2, "decoder.forward": 1}
    measured, _ = _run_counted(job, 2)
    assert measured == estimate.evaluations.total()


def _sync(**options):
    from jointdiff_plugins.lpips_loader import load_lpips

    lpips = load_lpips("alex", random_backbone=True)
    return create("synchronizer", "syncdiffusion", lpips_module=lpips, **options), lpips


@pytest.mark.parametrize("options, synchronized", [({"every": 2, "until_step": 3}, 1), ({"every": 1, "w": 0.0}, 0)])
def test_syncdiffusion_counts_every_until_step_and_zero_weight(tiny_model, options, synchronized):
    """Steps 0..3: every = 2 and until_step = 3 synchronize step 1 only; w = 0 none. LPIPS rows are
    counted at its scaling layer (AnchorDistance calls the backbone's forward directly)."""
    synchronizer, lpips = _sync(**options)
    job = _job(tiny_model, synchronizer=synchronizer)
    estimate = job.estimate(4)
    assert estimate.synchronized_steps == synchronized
    measured, flops = _run_counted(job, 4, {"perceptual": lpips.scaling_layer}, flops=bool(synchronized))
    assert measured == estimate.evaluations.total()
    if synchronized:
        assert measured["denoiser.backward"] == 2 * 2 and measured["perceptual.backward"] == 2  # N − 1 windows
        assert estimate.flops.synchronize > estimate.flops.denoise / 4
        _assert_close_flops(estimate.flops.total, flops)
    else:
        assert "denoiser.backward" not in measured


@pytest.mark.parametrize("shared", [True, False])
def test_regions_with_syncdiffusion_move_each_window_once_or_per_branch(tiny_model, shared):
    """Every branch batch sees the non-anchor windows: SyncDiffusion moves each once for all
    branches (``reuse_region_moves``), or, without that, once per branch."""
    synchronizer, lpips = _sync(every=1)
    synchronizer.reuse_region_moves = shared
    regions = create("conditioner", "regions", prompt="a lake", guidance_scale=7.5,
                     regions=[{"prompt": "a boat", "rect": [0, 0, 128, 128]}], bootstrap_steps=0)
    job = _job(tiny_model, regions, synchronizer, view_batch_size=3)
    estimate = job.estimate(1)
    assert estimate.evaluations.synchronize["denoiser.backward"] == (3 - 1) * (1 if shared else 2) * 2
    measured, _ = _run_counted(job, 1, {"perceptual": lpips.scaling_layer})
    assert measured == estimate.evaluations.total()


def test_shifted_windows_and_img2img_run_fewer_rows(tiny_model):
    """Shifted non-overlapping windows (each step's own layout, from the seed) and an init
    image of strength 0.5 (the last half of the steps): the estimate follows both."""
    from jointdiff.image.init_image import InitImage

    text = create("conditioner", "text", prompt="a city", guidance_scale=7.5)
    long_strip = create("geometry", "strip", **{**STRIP, "length_px": 512})  # 7 overlapping windows, 4 or 5 shifted
    shifted = JointDiffusion(tiny_model, long_strip, [text], windows="shifted")
    estimate = shifted.estimate(3, seed=7)
    with EvaluationCounter.for_model(tiny_model) as counter:
        shifted(3, seed=7, progress=False, output_type="latent")
    assert counter.counts["denoiser.forward"] == estimate.evaluations.denoise["denoiser.forward"] <= 3 * 5 * 2
    init = InitImage(torch.zeros(3, 128, 256), strength=0.5)
    img2img = JointDiffusion(tiny_model, create("geometry", "strip", **STRIP), [text], init=init)
    estimate = img2img.estimate(4)
    measured, _ = _run_counted(img2img, 4)
    assert measured == estimate.evaluations.total() and measured["denoiser.forward"] == 2 * 3 * 2


def test_evaluations_of_a_synchronizer_without_a_cost_model_are_noted():
    class Custom:
        name = "custom"

    counted = count_evaluations(3, 1, 2, 4, Custom(), 2, 1)
    assert counted.synchronize == {} and "not counted" in counted.notes[0]


def test_phase_timer_charges_phases_and_leaves_the_rest_to_other():
    timer = PhaseTimer("cpu", synchronize=True)
    assert not timer.synchronized  # nothing to wait for on the CPU
    with timer.phase("model"):
        time.sleep(0.02)
    time.sleep(0.01)
    report = timer.report()
    assert report["seconds"]["model"] >= 0.02 and report["seconds"]["other"] >= 0.01
    assert abs(sum(report["seconds"].values()) - report["wall_s"]) < 1e-3


CLI = ["generate", "a city", "--model", "tiny", "--device", "cpu", "-g", "length_px=256", "-g", "window_latent=16",
       "-g", "stride_latent=8", "--steps", "2", "-q"]


def test_cli_profile_prints_the_estimate_and_the_breakdown(tmp_path, capsys):
    output = tmp_path / "out.png"
    assert main([*CLI, "--profile", "-o", str(output)]) == 0
    err = capsys.readouterr().err
    assert "estimate:" in err and "FLOPs:" in err and "model evaluations (rows" in err
    assert "profile:" in err and "time:" in err and "model " in err and "decode " in err
    assert "denoiser forward 12 → 12" in err and output.exists()


def test_cli_estimate_prints_and_exits_without_writing(tmp_path, capsys):
    output = tmp_path / "out.png"
    assert main([*CLI, "--estimate", "-o", str(output)]) == 0
    out = capsys.readouterr().out
    assert "windows: 3 of 16×16 cells" in out and "FLOPs:" in out
    assert not output.exists()
