"""Engine behaviour: determinism, scheduler isolation, callbacks, bad input, NaN abort."""

from __future__ import annotations

import pytest
import torch
from conftest import make_job

from jointdiff import JointDiffusion
from jointdiff.core.registry import create
from jointdiff.models.loading import make_scheduler
from jointdiff.utils.errors import ConfigError, NonFiniteLatentsError

SMALL_STRIP = dict(length_px=640, stride_latent=16)  # 80 latent cells: 2 windows


def test_same_seed_same_result_different_seed_different_result(tiny_pipeline):
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    first = job(2, seed=7, progress=False, output_type="latent").latents
    again = job(2, seed=7, progress=False, output_type="latent").latents
    other = job(2, seed=8, progress=False, output_type="latent").latents
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc"])
def test_multistep_scheduler_state_does_not_leak_between_windows(fresh_tiny_pipeline, scheduler):
    """Each window batch owns its solver history: one window per batch must give the same
    canvas as all windows in one batch. A shared history would mix windows' model outputs."""
    pipeline = fresh_tiny_pipeline
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    options = dict(length_px=768, stride_latent=16)  # 3 windows
    one_by_one = make_job(pipeline, "strip", options, view_batch_size=1)(4, progress=False, output_type="latent")
    together = make_job(pipeline, "strip", options, view_batch_size=3)(4, progress=False, output_type="latent")
    torch.testing.assert_close(one_by_one.latents, together.latents, rtol=1e-4, atol=1e-4)


def test_initial_latents_are_used_and_checked(tiny_pipeline):
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    noise = torch.randn(1, 4, 64, 80, generator=torch.Generator().manual_seed(3))
    from_noise = job(2, seed=0, latents=noise, progress=False, output_type="latent").latents
    from_seed = job(2, seed=3, progress=False, output_type="latent").latents
    torch.testing.assert_close(from_noise, from_seed)  # the seed draws exactly this noise
    with pytest.raises(ConfigError, match=r"latents must have shape \(1, 4, 64, 80\)"):
        job(2, latents=torch.zeros(1, 4, 64, 64), progress=False)


def test_callback_sees_every_step(tiny_pipeline):
    seen = []
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    result = job(3, progress=False, output_type="latent", callback=lambda i, t, canvas: seen.append((i, t, canvas.clone())))
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == tiny_pipeline.scheduler.timesteps.tolist()
    torch.testing.assert_close(seen[-1][2], result.latents)


def test_nan_in_latents_aborts_naming_the_step(fresh_tiny_pipeline):
    pipeline = fresh_tiny_pipeline
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] > 1:  # the second UNet call (step 1) returns NaN
            return (output[0] * float("nan"),) if isinstance(output, tuple) else output * float("nan")

    pipeline.unet.register_forward_hook(poison)
    job = make_job(pipeline, "strip", dict(length_px=512))
    with pytest.raises(NonFiniteLatentsError, match="at step 1"):
        job(3, progress=False, output_type="latent")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
        (dict(output_type="np"), "output_type must be 'pil' or 'latent'"),
    ],
)
def test_bad_call_arguments(tiny_pipeline, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_job(tiny_pipeline, "strip", SMALL_STRIP)(**{"progress": False, **kwargs})


def test_bad_construction(tiny_pipeline):
    geometry = create("geometry", "strip", **SMALL_STRIP)
    text = create("conditioner", "text", prompt="x")
    with pytest.raises(ConfigError, match="view_batch_size must be a positive integer, got 0"):
        JointDiffusion(tiny_pipeline, geometry, [text], view_batch_size=0)
    with pytest.raises(ConfigError, match="exactly one prompt conditioner"):
        JointDiffusion(tiny_pipeline, geometry, [])(1, progress=False)
    with pytest.raises(ConfigError, match="geometry must be a Geometry"):
        JointDiffusion(tiny_pipeline, "strip", [text])


def test_stochastic_scheduler_noise_does_not_depend_on_batching_order(fresh_tiny_pipeline):
    """Each window batch draws its scheduler noise from its own seeded generator."""
    pipeline = fresh_tiny_pipeline
    pipeline.scheduler = make_scheduler("euler_a", pipeline.scheduler.config)
    job = make_job(pipeline, "strip", dict(length_px=768, stride_latent=16), view_batch_size=1)
    in_order = job(3, seed=1, progress=False, output_type="latent").latents
    batches = job._window_batches
    job._window_batches = lambda *args: list(reversed(batches(*args)))  # as if run elsewhere
    reversed_order = job(3, seed=1, progress=False, output_type="latent").latents
    torch.testing.assert_close(reversed_order, in_order)


# -- step-end callback, StopJob -------------------------------------------------------------

STRIP3 = dict(length_px=768, stride_latent=16)  # 3 windows


def test_stop_job_ends_with_the_canvas_so_far(tiny_pipeline):
    from jointdiff.engine.loop import StopJob

    seen = {}

    def stop_at_1(i, t, latents):
        seen[i] = latents.clone()
        if i == 1:
            raise StopJob()

    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    result = job(3, seed=2, progress=False, callback_on_step_end=stop_at_1)
    assert sorted(seen) == [0, 1] and result.metadata["stopped_at_step"] == 1
    torch.testing.assert_close(result.latents, seen[1])
    assert len(result.images) == 1 and result.pixels is not None  # decoded as usual
    finished = job(3, seed=2, progress=False, output_type="latent", callback_on_step_end=lambda i, t, x: None)
    assert "stopped_at_step" not in finished.metadata


def test_callback_on_step_end_replaces_the_canvas(tiny_pipeline):
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    plain = job(2, seed=1, progress=False, output_type="latent").latents
    same = job(2, seed=1, progress=False, output_type="latent", callback_on_step_end=lambda i, t, x: x.clone()).latents
    assert torch.equal(same, plain)
    zeroed = job(2, seed=1, progress=False, output_type="latent",
                 callback_on_step_end=lambda i, t, x: torch.zeros_like(x) if i == 1 else None).latents
    assert torch.equal(zeroed, torch.zeros_like(plain))
    changed = job(2, seed=1, progress=False, output_type="latent",
                  callback_on_step_end=lambda i, t, x: x * 0.5 if i == 0 else None).latents
    assert not torch.allclose(changed, plain)


def test_callback_on_step_end_errors_name_the_problem(tiny_pipeline):
    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    with pytest.raises(ConfigError, match=r"callback_on_step_end of step 0 must return None or canvas latents of shape \(1, 4, 64, 80\), got \(1, 4\)"):
        job(2, progress=False, output_type="latent", callback_on_step_end=lambda i, t, x: x[:, :, 0, 0])
    fused = make_job(tiny_pipeline, "strip", SMALL_STRIP, fusion="x0")
    with pytest.raises(ConfigError, match="fusion = 'x0' keeps every window's own noisy latents"):
        fused(2, progress=False, output_type="latent", callback_on_step_end=lambda i, t, x: x + 1)
    with pytest.raises(ConfigError, match="callback_on_step_end must be callable, got 3"):
        job(2, progress=False, callback_on_step_end=3)
    with pytest.raises(ConfigError, match="seed must be an integer, got 1.5"):
        job(2, seed=1.5, progress=False)


# -- the step API for plugins ---------------------------------------------------------------


def test_step_state_methods_for_plugins(tiny_pipeline):
    """What a synchronizer reaches through the documented StepState methods."""
    from jointdiff.core.synchronizer import Synchronizer

    class Probe(Synchronizer):
        name = "probe"

        def begin_step(self, state):
            latents = state.window_latents([0, 2])
            output = state.model_output(latents, [0, 2])
            x0 = state.predicted_x0(latents, output)
            self.shapes = (tuple(latents.shape), tuple(output.shape), tuple(x0.shape), tuple(state.decode(x0[:1]).shape))
            a = torch.randn(3, generator=state.generator_for("probe", state.step_index, 0))
            b = torch.randn(3, generator=state.generator_for("probe", state.step_index, 0))
            c = torch.randn(3, generator=state.generator_for("probe", state.step_index, 1))
            self.keyed = torch.equal(a, b) and not torch.equal(a, c)
            self.noise = state.initial_noise.shape
            self.distributed = state.distributed

    probe = Probe()
    job = make_job(tiny_pipeline, "strip", STRIP3)
    job.synchronizer = probe
    job(1, progress=False, output_type="latent")
    assert probe.shapes == ((2, 4, 64, 64),) * 3 + ((1, 3, 512, 512),)
    assert probe.keyed and probe.noise == (1, 4, 64, 96) and probe.distributed is None


# -- checkpoints ----------------------------------------------------------------------------


def _stopped(job, path, steps=3, stop=0, **kwargs):
    """Run ``job`` with a checkpoint every step, stopped after step ``stop``."""
    from jointdiff.engine.distributed import Checkpoint
    from jointdiff.engine.loop import StopJob

    def halt(i, t, latents):
        if i == stop:
            raise StopJob()

    return job(steps, seed=4, progress=False, output_type="latent", checkpoint=Checkpoint(path, every=1, **kwargs),
               callback_on_step_end=halt)


def test_checkpoint_holds_plain_tensors_and_is_removed_when_the_job_finishes(tiny_pipeline, tmp_path):
    from jointdiff.engine.distributed import Checkpoint

    path = tmp_path / "job.ckpt"
    _stopped(make_job(tiny_pipeline, "strip", STRIP3, view_batch_size=2), path)
    payload = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert payload["next_step"] == 1 and sorted(payload["windows"]) == ["-:0", "-:1", "-:2"]
    assert payload["fingerprint"]["model"].startswith("sd:") and "a photo of a city" in payload["fingerprint"]["conditioners"][0]
    seen = []
    make_job(tiny_pipeline, "strip", STRIP3, view_batch_size=3)(
        3, seed=4, progress=False, output_type="latent", checkpoint=Checkpoint(path, resume=True),
        callback=lambda i, t, c: seen.append(i))
    assert seen == [1, 2] and not path.exists()


@pytest.mark.parametrize(
    "edit, named",
    [
        (dict(prompt="a photo of a town"), "'prompt': 'a photo of a city', 'negative_prompt': None, …, now [\"text({'prompt': 'a photo of a town'"),
        (dict(eta=0.5), "eta changed (saved 0.0, now 0.5)"),
        (dict(geometry_options=dict(length_px=640, stride_latent=16)), "geometry changed"),
    ],
)
def test_a_checkpoint_of_another_job_is_refused_naming_what_differs(tiny_pipeline, tmp_path, edit, named):
    from jointdiff.engine.distributed import Checkpoint

    path = tmp_path / "job.ckpt"
    _stopped(make_job(tiny_pipeline, "strip", STRIP3), path)
    options = edit.pop("geometry_options", STRIP3)
    edited = make_job(tiny_pipeline, "strip", options, **edit)
    with pytest.raises(ConfigError) as error:
        edited(3, seed=4, progress=False, output_type="latent", checkpoint=Checkpoint(path, resume=True))
    message = str(error.value)
    assert "belongs to another job" in message and named in message and "\n" not in message
    assert "set overwrite=True to start over" in message and path.exists()  # nothing lost
    seen = []
    with pytest.warns(UserWarning, match="starting over"):
        edited(3, seed=4, progress=False, output_type="latent", checkpoint=Checkpoint(path, resume=True, overwrite=True),
               callback=lambda i, t, c: seen.append(i))
    assert seen == [0, 1, 2] and not path.exists()


def test_an_existing_checkpoint_is_not_overwritten_without_resume(tiny_pipeline, tmp_path):
    from jointdiff.engine.distributed import Checkpoint

    path = tmp_path / "job.ckpt"
    _stopped(make_job(tiny_pipeline, "strip", SMALL_STRIP), path)
    with pytest.raises(ConfigError, match="exists .* resume is off: set resume=True to continue it; delete it"):
        make_job(tiny_pipeline, "strip", SMALL_STRIP)(3, seed=4, progress=False, checkpoint=Checkpoint(path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read as a checkpoint"):
        make_job(tiny_pipeline, "strip", SMALL_STRIP)(3, seed=4, progress=False, checkpoint=Checkpoint(path, resume=True))


def test_plugin_state_is_saved_and_restored(tiny_pipeline, tmp_path):
    """A synchronizer with state across steps resumes exactly through state_dict()."""
    from jointdiff.core.synchronizer import Synchronizer
    from jointdiff.engine.distributed import Checkpoint

    class Drift(Synchronizer):
        name = "drift"

        def setup(self, context):
            self.total = torch.zeros(())

        def begin_step(self, state):
            self.total = self.total + 0.01 * (state.step_index + 1)

        def update(self, latents, batch, state):
            return latents + self.total

        def state_dict(self):
            return {"total": self.total}

        def load_state_dict(self, state):
            self.total = state["total"]

    def job():
        engine = make_job(tiny_pipeline, "strip", SMALL_STRIP)
        engine.synchronizer = Drift()
        return engine

    expected = job()(3, seed=4, progress=False, output_type="latent").latents
    path = tmp_path / "drift.ckpt"
    _stopped(job(), path, stop=1)
    resumed = job()(3, seed=4, progress=False, output_type="latent", checkpoint=Checkpoint(path, resume=True)).latents
    torch.testing.assert_close(resumed, expected, rtol=0, atol=0)

    class Unsaveable(Drift):
        def state_dict(self):
            return {"total": object()}

    bad = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    bad.synchronizer = Unsaveable()
    with pytest.raises(ConfigError, match="the synchronizer: state_dict\\(\\) must return a dict of tensors and plain containers"):
        _stopped(bad, tmp_path / "bad.ckpt")


def test_a_conditioner_allowed_once_per_job_is_refused_twice(tiny_pipeline):
    from jointdiff.core.conditioner import Conditioner

    class Once(Conditioner):
        name = "once"
        one_per_job = True

    job = make_job(tiny_pipeline, "strip", SMALL_STRIP)
    job.conditioners += [Once(), Once()]
    with pytest.raises(ConfigError, match="a job takes one 'once' conditioner, got several"):
        job(1, progress=False, output_type="latent")
