"""Window parallelism on torch.distributed: 2 and 3 gloo processes on the CPU.

Every job here runs once in this process (the reference, no process group) and once on 2 and
on 3 ranks; the ranks' canvases must equal the reference to float tolerance (partial sums are
added in another order), on every rank, also with stochastic schedulers (noise keyed per
window and step) and region bootstrapping (keyed per window, step and branch). The same
processes then check the fault path (one rank raises: every rank stops naming it) and
checkpoint/resume (2 ranks checkpoint and are killed, 3 ranks resume with another
``view_batch_size``, the result equals the uninterrupted job).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jointdiff import JointDiffusion
from jointdiff.core.registry import create
from jointdiff.core.synchronizer import Synchronizer
from jointdiff.engine.distributed import (
    Checkpoint,
    DistributedJobError,
    assign_owners,
    init_from_env,
    resolve,
    window_costs,
)
from jointdiff.models.loading import make_scheduler

# Windows of 32 latent cells (256 px): the machinery is the same, the decoder passes of the
# synchronizer four times cheaper than at the model's native 64.
STRIP = dict(length_px=384, window_latent=32, stride_latent=8)  # 3 windows
GRID = dict(height_px=320, width_px=320, window_latent=32, stride_latent=8)  # 2 x 2 windows
SYNC = dict(lpips_random_backbone=True, net="alex", w=20.0)
CASES = {
    "strip": dict(geometry="strip", options=STRIP, view_batch_size=1),
    "grid_stochastic": dict(geometry="grid", options=GRID, view_batch_size=1, eta=1.0),
    "wrap": dict(geometry="strip", options=dict(length_px=384, window_latent=32, stride_latent=16, wrap=True),
                 view_batch_size=2),
    "equirect": dict(geometry="equirect", options=dict(width_px=256, window_latent=16,
                                                       rings=[(0.0, 4), (60.0, 2), (-60.0, 2)]), view_batch_size=2),
    "strip_sync": dict(geometry="strip", options=STRIP, view_batch_size=1, sync=SYNC),
    "grid_x0_sync": dict(geometry="grid", options=GRID, view_batch_size=1, fusion="x0", sync=SYNC),
    "strip_euler_a": dict(geometry="strip", options=STRIP, view_batch_size=2, scheduler="euler_a"),
    "regions_ddpm": dict(geometry="strip", options=STRIP, view_batch_size=1, scheduler="ddpm", regions=dict(
        prompt="a lake", regions=[{"prompt": "a red boat", "rect": [64, 0, 320, 160]}], bootstrap_steps=2)),
}
RESUME = dict(geometry="strip", options=STRIP, view_batch_size=1, fusion="x0", eta=1.0, sync=SYNC)
STEPS, RESUME_STEPS, SEED = 2, 3, 5
TIMEOUT_S = 60.0
KILLED = 17


def build(pipeline, case: dict, **engine_kwargs) -> JointDiffusion:
    geometry = create("geometry", case["geometry"], **case["options"])
    if "regions" in case:
        prompt = create("conditioner", "regions", **case["regions"])
    else:
        prompt = create("conditioner", "text", prompt="a photo of a city", guidance_scale=7.5)
    sync = create("synchronizer", "syncdiffusion", **case["sync"]) if "sync" in case else None
    kwargs = {k: case[k] for k in ("view_batch_size", "eta", "fusion") if k in case}
    return JointDiffusion(pipeline, geometry, [prompt], sync, **kwargs, **engine_kwargs)


def run(pipeline, case: dict, steps: int = STEPS, **call_kwargs) -> torch.Tensor:
    """The case's canvas latents (its scheduler swapped in for the job, then put back)."""
    original = pipeline.scheduler
    if "scheduler" in case:
        pipeline.scheduler = make_scheduler(case["scheduler"], original.config)
    try:
        return build(pipeline, case)(steps, seed=SEED, progress=False, output_type="latent", **call_kwargs).latents
    finally:
        pipeline.scheduler = original


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_from_env(timeout_s=TIMEOUT_S)
    from jointdiff.models.loading import load_pipeline

    pipeline = load_pipeline("tiny", device="cpu", dtype="float32")
    for name, case in CASES.items():
        torch.save(run(pipeline, case), f"{out}/{name}_{world}_{rank}.pt")
    _fault(pipeline, rank, world, out)
    _stop(pipeline, rank, world, out)
    checkpoint = f"{out}/../resume.ckpt"
    if world == 2:  # checkpoint every step, then every rank dies after step 0
        run(pipeline, RESUME, RESUME_STEPS, checkpoint=Checkpoint(checkpoint, every=1),
            callback=lambda i, t, canvas: os._exit(KILLED))
    seen = []  # world 3 resumes world 2's checkpoint with other batches: the state is per window
    latents = run(pipeline, {**RESUME, "view_batch_size": 2}, RESUME_STEPS, checkpoint=Checkpoint(checkpoint, resume=True),
                  callback=lambda i, t, canvas: seen.append(i))
    torch.save({"latents": latents, "steps": seen}, f"{out}/resume_{world}_{rank}.pt")
    dist.destroy_process_group()


def _fault(pipeline, rank: int, world: int, out: str) -> None:
    """The last rank's UNet raises at its first call; record what every rank sees."""
    def explode(module, inputs, output):
        raise RuntimeError("injected fault")

    hook = pipeline.unet.register_forward_hook(explode) if rank == world - 1 else None
    start = time.monotonic()
    try:
        run(pipeline, CASES["strip"])
        message = "no error"
    except DistributedJobError as error:
        message = str(error)
    finally:
        if hook is not None:
            hook.remove()
    torch.save({"message": message, "seconds": time.monotonic() - start}, f"{out}/fault_{world}_{rank}.pt")


def _stop(pipeline, rank: int, world: int, out: str) -> None:
    """The last rank's step-end callback raises StopJob after step 0: every rank stops there."""
    from jointdiff.engine.loop import StopJob

    def halt(i, t, latents):
        if rank == world - 1:
            raise StopJob()

    result = build(pipeline, CASES["strip"])(STEPS, seed=SEED, progress=False, output_type="latent", callback_on_step_end=halt)
    torch.save({"stopped": result.metadata.get("stopped_at_step"), "latents": result.latents}, f"{out}/stop_{world}_{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2- and 3-rank jobs; return {(name, world, rank): saved object}."""
    root = tmp_path_factory.mktemp("distributed")
    results = {}
    for world in (2, 3):
        out = root / f"world{world}"
        out.mkdir()
        try:
            mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
        except mp.ProcessExitedException as error:
            assert world == 2 and error.exit_code == KILLED, error
        for path in out.glob("*.pt"):
            name, w, r = path.stem.rsplit("_", 2)
            results[name, int(w), int(r)] = torch.load(path, weights_only=False)
    return results


@pytest.fixture(scope="module")
def references(tiny_pipeline):
    refs = {name: run(tiny_pipeline, case) for name, case in CASES.items()}
    refs["resume"] = run(tiny_pipeline, RESUME, RESUME_STEPS)
    return refs


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_equals_the_single_process_result(ranks, references, name, world):
    for rank in range(world):
        torch.testing.assert_close(ranks[name, world, rank], references[name], rtol=1e-4, atol=1e-5)
    for rank in range(1, world):  # the all-reduce gives every rank the very same canvas
        assert torch.equal(ranks[name, world, rank], ranks[name, world, 0])


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_that_raises_stops_every_rank_naming_it(ranks, world):
    for rank in range(world):
        fault = ranks["fault", world, rank]
        assert f"rank {world - 1} failed at step 0: RuntimeError: injected fault" in fault["message"]
        assert fault["seconds"] < TIMEOUT_S / 2  # the error flag, not the collective timeout


@pytest.mark.parametrize("world", [2, 3])
def test_a_stop_on_one_rank_stops_every_rank(ranks, world):
    first = ranks["stop", world, 0]
    for rank in range(world):
        assert ranks["stop", world, rank]["stopped"] == 0
        assert torch.equal(ranks["stop", world, rank]["latents"], first["latents"])


def test_resume_on_other_ranks_gives_the_uninterrupted_result(ranks, references, tmp_path_factory):
    for rank in range(3):
        resumed = ranks["resume", 3, rank]
        assert resumed["steps"] == [1, 2]  # killed after step 0: resumed from its checkpoint
        torch.testing.assert_close(resumed["latents"], references["resume"], rtol=1e-4, atol=1e-5)
    root = tmp_path_factory.getbasetemp()
    assert not list(root.glob("distributed*/resume.ckpt"))  # the finished job removed it


def test_assignment_balances_windows_and_synchronized_work():
    assert sorted(assign_owners([1.0] * 6, 3)) == [0, 0, 1, 1, 2, 2]
    assert assign_owners([4.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1, 1]

    class Sync(Synchronizer):
        name = "test-sync"

        def synchronizes(self, i):
            return i < 2

        def anchor_windows(self):
            return (1,)

    class OldStyle:  # duck-typed, as before anchor_windows()
        anchor_id = 1

        def synchronizes(self, i):
            return i < 2

    costs = window_costs(3, 4, Sync(), sync_cost=4.0, anchor_cost=1.5)
    assert costs == [4 + 2 * 4.0, 4 + 2 * 1.5, 4 + 2 * 4.0]
    assert window_costs(3, 4, OldStyle(), sync_cost=4.0, anchor_cost=1.5) == costs
    assert window_costs(2, 4, Synchronizer(), 4.0, 1.5) == [4, 4]  # the base class adds nothing
    assert window_costs(2, 4, None, 4.0, 1.5) == [4, 4]


def test_one_rank_is_the_single_process_path(tiny_pipeline, monkeypatch):
    """A group of one rank, or none, runs no collective and gives the same result."""
    expected = run(tiny_pipeline, CASES["strip"])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        def forbidden(*args, **kwargs):
            raise AssertionError("collective in a single-process job")

        monkeypatch.setattr(dist, "all_reduce", forbidden)
        assert resolve(None) is None and resolve(True) is None
        assert torch.equal(build(tiny_pipeline, CASES["strip"], distributed=True)(
            STEPS, seed=SEED, progress=False, output_type="latent").latents, expected)
    finally:
        dist.destroy_process_group()
    assert resolve(None) is None and resolve(False) is None


def test_torchrun_cli_writes_the_single_process_image_once(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        f'steps = 2\nseed = {SEED}\nview_batch_size = 1\n[model]\nid = "tiny"\ndevice = "cpu"\n'
        '[geometry]\nname = "strip"\nlength_px = 384\nwindow_latent = 32\nstride_latent = 8\n'
        '[[conditioners]]\nname = "text"\nprompt = "a city"\n'
    )
    from jointdiff.cli import main

    assert main(["run", str(job), "-q", "-o", str(tmp_path / "one.png")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(_free_port()), "-m", "jointdiff.cli", "run", str(job), "-q",
                "--dist-timeout", "60", "-o", str(tmp_path / "two.png")]
    multi = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.split() == [str(tmp_path / "two.png")]  # rank 0 alone prints
    import numpy as np
    from PIL import Image

    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    two = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.int16)
    assert np.abs(one - two).max() <= 1  # float tolerance, then 8-bit rounding
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "one.png", "two.png"]
