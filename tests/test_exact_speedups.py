"""Exact speed-ups: each gives the result of the path it replaces (to float rounding).

- no SyncDiffusion pass on a step of weight ``w · decay^i = 0`` or a step not synchronized;
- the anchor's model output of the synchronization pass reused by its own denoising step
  (also with ControlNet, region prompts and the window-parallel anchor owner);
- the finite check read back from the device every few steps, still naming the first bad step;
- prompts and conditions encoded once per job;
- ``compile``, channels-last / SDPA and ``view_batch_size = "auto"``.

Tiny model, windows of 16 latent cells, 1–3 steps (the oracle case runs in float64).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from PIL import Image
from sync_oracle import sync_diffusion_oracle

from jointdiff import JointDiffusion
from jointdiff.core.registry import create
from jointdiff.engine import denoiser as denoiser_module
from jointdiff.engine.denoiser import Denoiser, accelerated, auto_view_batch_size
from jointdiff.models.loading import as_model
from jointdiff.utils.errors import ConfigError, NonFiniteLatentsError
from jointdiff_plugins.lpips_loader import load_lpips
from jointdiff_plugins.syncdiffusion import SyncDiffusion

PROMPT = "a photo of a city"
STRIP = {"length_px": 256, "window_latent": 16, "stride_latent": 8}  # 3 windows, anchor 1


@pytest.fixture(scope="module")
def alex():
    return load_lpips("alex", random_backbone=True)


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64: a batch of one and a batch of three differ by float
    rounding, which float64 keeps far below the tolerance of an exactness check."""
    from jointdiff.models.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def alex64(alex):
    return copy.deepcopy(alex).double()


def text():
    return create("conditioner", "text", prompt=PROMPT, guidance_scale=7.5)


def job(pipeline, sync=None, conditioners=None, geometry=STRIP, **engine):
    engine.setdefault("view_batch_size", 3)
    shape = create("geometry", "strip", **geometry)
    return JointDiffusion(pipeline, shape, conditioners or [text()], sync, **engine)


def latents(engine, steps=2, **call):
    return engine(steps, seed=0, progress=False, output_type="latent", **call).latents


class Counter:
    """Counts the UNet's forward calls, with and without autograd."""

    def __init__(self, module):
        self.calls = {"grad": 0, "no_grad": 0}
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1


@pytest.fixture
def reuse_off(monkeypatch):
    """The replaced path: the anchor's denoising step runs its own forward."""
    monkeypatch.setattr(SyncDiffusion, "reuse_anchor_output", False)


# -- 1. no pass on steps of weight zero -----------------------------------------------------


def test_zero_weight_steps_run_no_pass(tiny_pipeline, alex):
    pipeline = tiny_pipeline
    counter = Counter(pipeline.unet)
    try:
        check_zero_weight_steps(pipeline, alex, counter)
    finally:
        counter.handle.remove()


def check_zero_weight_steps(pipeline, alex, counter):
    # decay 0: step 0 weighs w, step 1 weighs 0 — the same job as synchronizing step 0 only.
    got = latents(job(pipeline, create("synchronizer", "syncdiffusion", lpips_module=alex, decay=0.0)))
    # step 0: the anchor (no grad), a gradient pass per other window (one window per pass on a
    # CPU), the two other windows' denoising; step 1: one call.
    assert counter.calls == {"grad": 2, "no_grad": 3}
    expected = latents(job(pipeline, create("synchronizer", "syncdiffusion", lpips_module=alex, until_step=1)))
    assert torch.equal(got, expected)
    counter.calls.update(grad=0, no_grad=0)
    zero = latents(job(pipeline, create("synchronizer", "syncdiffusion", lpips_module=alex, w=0.0)))
    assert counter.calls == {"grad": 0, "no_grad": 2}  # plain MultiDiffusion: one call per step
    assert torch.equal(zero, latents(job(pipeline)))
    sync = SyncDiffusion(w=20.0, decay=0.0, every=2)
    assert [i for i in range(4) if sync.synchronizes(i)] == []  # step 1 is scheduled but weighs 0
    assert [i for i in range(6) if SyncDiffusion(every=2, until_step=4).synchronizes(i)] == [1, 3]


# -- 2. the anchor's output reused ------------------------------------------------------------


def test_anchor_reuse_equals_the_oracle(tiny64, alex64):
    """One window per batch: the anchor's batch makes no model call at all."""
    common = {"w": 200.0, "decay": 0.9}
    engine = job(tiny64, create("synchronizer", "syncdiffusion", lpips_module=alex64, **common), view_batch_size=1)
    counter = Counter(tiny64.unet)
    got = latents(engine)
    counter.handle.remove()
    assert counter.calls["no_grad"] == 2 * (1 + 2)  # per step: the anchor, then the two others' steps
    expected = sync_diffusion_oracle(tiny64, create("geometry", "strip", **STRIP), prompt=PROMPT, guidance_scale=7.5,
                                     num_inference_steps=2, seed=0, lpips_module=alex64, **common)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert alex64.net.slice1[0].weight.is_contiguous()  # a given LPIPS module is left as it is


def reused_and_latents(pipeline, make_sync, conditioners, steps=1, **engine):
    """Latents of a job and how many rows its denoiser took from the cache."""
    seen = {}
    original = Denoiser.step_output

    def spy(self, *args, **kwargs):
        seen["denoiser"] = self
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Denoiser, "step_output", spy)
        out = latents(job(pipeline, make_sync(), conditioners(), **engine), steps=steps)
    return seen["denoiser"].reused_rows, out


def compare_reuse(pipeline, make_sync, conditioners, expected_reused, **engine):
    reused, got = reused_and_latents(pipeline, make_sync, conditioners, **engine)
    assert reused == expected_reused
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SyncDiffusion, "reuse_anchor_output", False)
        patch.setattr(SyncDiffusion, "reuse_region_moves", False)
        none, replaced = reused_and_latents(pipeline, make_sync, conditioners, **engine)
    assert none == 0
    torch.testing.assert_close(got, replaced, rtol=1e-10, atol=1e-10)


def test_anchor_reuse_with_controlnet(tiny64, alex64):
    pixels = torch.randint(0, 256, (128, 256, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    compare_reuse(tiny64, lambda: create("synchronizer", "syncdiffusion", lpips_module=alex64, until_step=1),
                  lambda: [text(), create("conditioner", "controlnet", model="tiny", image=image)], expected_reused=1)


def test_anchor_reuse_with_regions(tiny64, alex64, monkeypatch):
    """The anchor is evaluated with the window's own prompt (the background, branch 0): only
    that branch reuses it; the region branch (bootstrapped at step 0) computes its own. Each
    window is moved once for both branches (same latents, same loss)."""
    regions = dict(prompt="a lake", regions=[{"prompt": "a red boat", "rect": [40, 0, 200, 100]}], bootstrap_steps=1)
    passes = []
    original = SyncDiffusion.gradient
    monkeypatch.setattr(SyncDiffusion, "gradient", lambda self, x, ids, *a: (passes.append(list(ids)), original(self, x, ids, *a))[1])
    compare_reuse(tiny64, lambda: create("synchronizer", "syncdiffusion", lpips_module=alex64),
                  lambda: [create("conditioner", "regions", **regions)], expected_reused=1, view_batch_size=2)
    assert passes == [[0], [2]] + [[0], [2], [0], [2]]  # then the replaced path: once per branch


class OneRankComm:
    """A window-parallel group of one rank, which owns the anchor: SyncDiffusion's owner path
    (anchor prepared in ``begin_step`` and broadcast) without a process group."""

    rank = 0

    def owner_of(self, window_id):
        return 0

    def check(self, failure, where, stop=False):
        if failure is not None:
            raise failure
        return stop

    def broadcast(self, tensor, src, device):
        return tensor.to(device)


class OwnerSync(SyncDiffusion):
    name = "syncdiffusion_owner_test"

    def setup(self, context):
        super().setup(context)
        self._comm = OneRankComm()


def test_anchor_reuse_by_the_anchors_owner(tiny64, alex64):
    compare_reuse(tiny64, lambda: OwnerSync(lpips_module=alex64), lambda: [text()], expected_reused=1,
                  view_batch_size=1)


def test_no_reuse_under_autocast_or_moved_latents(tiny_pipeline, alex):
    engine = job(tiny_pipeline, create("synchronizer", "syncdiffusion", lpips_module=alex, autocast="bfloat16", until_step=1))
    reused, _ = reused_and_latents(tiny_pipeline, lambda: engine.synchronizer, lambda: [text()])
    assert reused == 0  # an autocast output is not the denoising step's
    d = Denoiser.__new__(Denoiser)  # by hand: an entry at other latents or of another step is not used
    d._outputs, d.reused_rows, d.prompt = {}, 0, type("P", (), {"indices": lambda self, ids: [0] * len(ids)})()
    d.model_output = lambda x, *a, **k: torch.zeros_like(x)
    x = torch.randn(2, 4, 8, 8)
    d.remember(0, [5], x[:1] + 1.0, torch.ones(1, 4, 8, 8))
    assert torch.equal(d.step_output(x, torch.tensor(1), [5, 6], None, None, 0), torch.zeros_like(x))
    d.remember(0, [5], x[:1], torch.ones(1, 4, 8, 8))
    assert torch.equal(d.step_output(x, torch.tensor(1), [5, 6], None, None, 1), torch.zeros_like(x))  # other step
    out = d.step_output(x, torch.tensor(1), [5, 6], None, None, 0)
    assert torch.equal(out[0], torch.ones(4, 8, 8)) and torch.equal(out[1], torch.zeros(4, 8, 8)) and d.reused_rows == 1


def test_one_window_per_gradient_pass_on_a_cpu(tiny64, alex64, monkeypatch):
    passes = []
    original = SyncDiffusion.gradient
    monkeypatch.setattr(SyncDiffusion, "gradient", lambda self, x, ids, *a: (passes.append(list(ids)), original(self, x, ids, *a))[1])
    got = latents(job(tiny64, create("synchronizer", "syncdiffusion", lpips_module=alex64)), steps=1)
    monkeypatch.setattr(SyncDiffusion, "cpu_micro_batch", None)  # the replaced path: one pass per batch
    batched = latents(job(tiny64, create("synchronizer", "syncdiffusion", lpips_module=alex64)), steps=1)
    assert passes == [[0], [2], [0, 2]]
    torch.testing.assert_close(got, batched, rtol=1e-10, atol=1e-10)


def test_lpips_in_channels_last_gives_the_same_gradient(alex, monkeypatch):
    """The plugin's own LPIPS runs channels-last; a given module is left as it is."""
    from jointdiff_plugins.lpips_loader import AnchorDistance

    sync = SyncDiffusion(net="alex", lpips_random_backbone=True)
    nchw = copy.deepcopy(alex).double()
    channels_last = sync._channels_last(copy.deepcopy(alex).double())
    assert channels_last.net.slice1[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    grads = []
    for module in (nchw, channels_last):
        distance = AnchorDistance(module)
        distance.set_anchor(images[:1])
        x = images[1:].clone().requires_grad_(True)
        grads.append(torch.autograd.grad(distance(x).sum(), x)[0])
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)
    monkeypatch.setattr(SyncDiffusion, "lpips_channels_last", False)  # switched off: contiguous again
    assert sync._channels_last(channels_last).net.slice1[0].weight.is_contiguous()


# -- 3. the finite check without a host sync every step --------------------------------------


def poisoned(pipeline, call: int):
    """NaN from the UNet's ``call``-th call on (1-based)."""
    count = {"n": 0}

    def hook(module, inputs, output):
        count["n"] += 1
        if count["n"] >= call:
            return (output[0] * float("nan"),) if isinstance(output, tuple) else output * float("nan")

    return pipeline.unet.register_forward_hook(hook)


def test_finite_check_is_read_back_every_few_steps(fresh_tiny_pipeline, monkeypatch):
    reads = []
    original = JointDiffusion._raise_if_nonfinite
    monkeypatch.setattr(JointDiffusion, "_raise_if_nonfinite", staticmethod(
        lambda run, cause=None: (reads.append(1), original(run, cause))[1]))
    monkeypatch.setattr(JointDiffusion, "finite_check_every", 3)
    geometry = {"length_px": 128, "window_latent": 16}  # one window: one UNet call per step
    latents(job(fresh_tiny_pipeline, geometry=geometry), steps=7)
    assert len(reads) == 3  # after steps 2, 5 and 6 (the last)
    hook = poisoned(fresh_tiny_pipeline, call=2)
    reads.clear()
    with pytest.raises(NonFiniteLatentsError, match="at step 1 "):
        latents(job(fresh_tiny_pipeline, geometry=geometry), steps=7)
    assert len(reads) == 1  # read after step 2: the error still names step 1
    hook.remove()
    poisoned(fresh_tiny_pipeline, call=2)
    seen = []
    with pytest.raises(NonFiniteLatentsError, match="at step 1 "):  # with a callback: read every step
        latents(job(fresh_tiny_pipeline, geometry=geometry), steps=7, callback=lambda i, t, c: seen.append(i))
    assert seen == [0]


def test_an_earlier_nan_canvas_is_named_before_a_later_error(fresh_tiny_pipeline, alex):
    """Step 0's canvas is NaN; step 1's synchronization gradient fails on it: the error
    names the canvas at step 0, as the check after every step did."""
    poisoned(fresh_tiny_pipeline, call=1)
    sync = create("synchronizer", "syncdiffusion", lpips_module=alex, every=2)
    with pytest.raises(NonFiniteLatentsError, match="canvas latents at step 0 ") as raised:
        latents(job(fresh_tiny_pipeline, sync), steps=3)
    assert "synchronization gradient at step 1" in str(raised.value.__cause__)


# -- 4. encodings once per job ------------------------------------------------------------------


def test_prompts_and_conditions_are_encoded_once_per_job(tiny_pipeline, alex):
    model = as_model(tiny_pipeline)
    calls = {"prompts": 0, "condition": 0}

    def counted(name, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)
        return wrapper

    model.encode_prompts = counted("prompts", model.encode_prompts)
    model.control_condition = counted("condition", model.control_condition)
    image = Image.new("RGB", (256, 128), (120, 40, 200))
    conditioners = [text(), create("conditioner", "controlnet", model="tiny", image=image)]
    sync = create("synchronizer", "syncdiffusion", lpips_module=alex, until_step=1)
    latents(job(model, sync, conditioners), steps=3)
    assert calls == {"prompts": 1, "condition": 1}


# -- 5. compile, channels-last and SDPA, view_batch_size="auto" -------------------------------


def test_compile_flag_compiles_the_denoiser_for_the_job(fresh_tiny_pipeline, monkeypatch):
    """The plumbing, with ``torch.compile`` replaced by a recorder (inductor takes minutes on
    a CPU); the call is compiled during the loop and put back after."""
    pipeline = fresh_tiny_pipeline
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(denoiser_module, "_COMPILED", {})
    during = []
    engine = job(pipeline, compile="aot_eager")
    got = latents(engine, callback=lambda i, t, c: during.append(pipeline.unet._compiled_call_impl is not None))
    assert compiled == [{"backend": "aot_eager", "dynamic": False}] and during == [True, True]
    assert pipeline.unet._compiled_call_impl is None
    torch.testing.assert_close(got, latents(job(pipeline)), rtol=0, atol=0)
    latents(job(pipeline, compile=True), steps=1)
    assert compiled[-1]["backend"] == "inductor"
    for bad in ("", 3, None):
        with pytest.raises(ConfigError, match="compile"):
            job(pipeline, compile=bad)


def test_channels_last_and_sdpa_are_undone_and_exact(fresh_tiny_pipeline):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = fresh_tiny_pipeline.unet
    unet.set_attn_processor(AttnProcessor())
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=states).sample
        with denoiser_module._channels_last(unet), denoiser_module._sdpa(unet):
            assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
            during = unet(x, t, encoder_hidden_states=states).sample
    assert unet.conv_in.weight.is_contiguous() and {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)
    assert denoiser_module._conv_heavy(unet)
    with accelerated(as_model(fresh_tiny_pipeline)):  # on the CPU: nothing changes
        assert unet.conv_in.weight.is_contiguous() and {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}


def test_auto_view_batch_size(tiny_pipeline, alex):
    model = as_model(tiny_pipeline)
    geometry = create("geometry", "strip", length_px=512, window_latent=16, stride_latent=8)  # 7 windows
    assert auto_view_batch_size(model, geometry, [text()]) == 4  # the CPU's fixed default
    from jointdiff.cost import budget

    per_window = budget.activation_bytes(model, (16, 16), 2)
    assert auto_view_batch_size(model, geometry, [text()], free_bytes=6 * per_window) == 3
    assert auto_view_batch_size(model, geometry, [text()], free_bytes=10**15) == 7
    assert auto_view_batch_size(model, geometry, [text()], free_bytes=1) == 1
    engine = job(tiny_pipeline, geometry=STRIP, view_batch_size="auto")
    result = engine(2, seed=0, progress=False, output_type="latent")
    assert engine.view_batch_option == "auto" and engine.view_batch_size == 3
    assert result.metadata["job"]["view_batch_size"] == 3  # a job file can run it again
    one = latents(job(tiny_pipeline, view_batch_size=1))
    torch.testing.assert_close(result.latents, one, rtol=1e-4, atol=1e-4)  # float32: batch of 3 vs 1
    with pytest.raises(ConfigError, match="view_batch_size must be a positive integer, got 'big' \\(or 'auto'"):
        job(tiny_pipeline, view_batch_size="big")
