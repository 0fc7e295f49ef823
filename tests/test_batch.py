"""The batch runner (jointdiff.jobs.batch, manifest, cache; ``jointdiff batch``): outputs
equal to separate runs, one load per model, nothing redone, interrupted batches resumed,
failures retried then recorded, bad rows refused up front. Tiny model, 2-3 steps, 96×64."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jointdiff.cli import main
from jointdiff.jobs import batch as batch_module
from jointdiff.jobs.batch import job_fingerprint, run_batch, run_one
from jointdiff.jobs.cache import ModelCache
from jointdiff.jobs.manifest import BadJobsError, collect_jobs
from jointdiff.jobs.spec import Job, run_job
from jointdiff.utils.errors import ConfigError

BASE = """
steps = {steps}
output = "out/sky.png"

[model]
id = "tiny"
device = "cpu"

[geometry]
name = "strip"
length_px = 96
window_latent = 8
stride_latent = 4

[[conditioners]]
name = "text"
prompt = "a sky"
"""


def write_batch(folder: Path, rows: list[dict], steps: int = 2) -> tuple[Path, Path]:
    """A base job and a JSONL manifest of ``rows`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.toml"
    base.write_text(BASE.format(steps=steps))
    manifest = folder / "rows.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return base, manifest


ROWS = [
    {"prompt": "a red sky", "seed": 1, "output": "out/red.png"},
    {"prompt": "a blue sky", "seed": 2, "output": "out/blue.png", "model.scheduler": "euler"},
    {"prompt": "a grey sky", "seed": 3, "output": "out/grey.png"},
]


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_outputs_equal_separate_runs_with_one_load_per_model(tmp_path):
    base, manifest = write_batch(tmp_path, ROWS)
    summary = run_batch([manifest], base=base, progress=False)
    assert [r.status for r in summary.records] == ["done"] * 3
    assert summary.model_loads == 2  # two models (ddim, euler); jobs grouped by model, cache of one
    for item in collect_jobs([manifest], base=base):  # each job alone, its model loaded afresh
        reference = run_job(item.job, progress=False).images[0]
        assert np.array_equal(pixels(item.job.output), np.asarray(reference.convert("RGB"))), item.where
    assert (tmp_path / "out" / "batch-summary.csv").read_text().splitlines()[0].startswith("output,status,seconds,model_load_s")
    rows = [json.loads(line) for line in (tmp_path / "out" / "batch-summary.jsonl").read_text().splitlines()]
    assert [row["output"] for row in rows] == [str(tmp_path / r["output"]) for r in ROWS]  # the manifest's order
    assert sum(row["model_load_s"] > 0 for row in rows) == 2


def test_rerun_of_a_finished_batch_calls_no_model(tmp_path, monkeypatch, capsys):
    base, manifest = write_batch(tmp_path, ROWS[:2])
    run_batch([manifest], base=base, progress=False)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    calls = []
    monkeypatch.setattr(batch_module, "run_job", lambda *a, **k: calls.append(a))
    cache = ModelCache()
    first = [json.loads(line) for line in (tmp_path / "out/batch-summary.jsonl").read_text().splitlines()]
    summary = run_batch([manifest], base=base, cache=cache, progress=False)
    assert [r.status for r in summary.records] == ["skipped", "skipped"]
    assert [r.seconds for r in summary.records] == [row["seconds"] for row in first]  # the timings of the run that made them
    assert cache.loads == 0 and calls == [] and summary.model_loads == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")} == written
    assert main(["batch", str(manifest), "--base", str(base), "-q"]) == 0 and calls == []
    one = collect_jobs([manifest], base=base)[0].job
    assert run_one(one, cache).status == "skipped" and calls == [] and cache.loads == 0
    assert capsys.readouterr().out.startswith("2 jobs: 0 done, 2 skipped, 0 failed, 0 pending;")
    # A changed row is a different job: its output is made by another job and is refused.
    monkeypatch.undo()
    _, changed = write_batch(tmp_path, [{**ROWS[0], "prompt": "a green sky"}])
    with pytest.raises(BadJobsError, match=r"red.png' exists and was made by another job.*--overwrite replaces it"):
        run_batch([changed], base=base, progress=False)
    assert [r.status for r in run_batch([changed], base=base, overwrite=True, progress=False).records] == ["done"]


def test_interrupted_batch_resumes_from_checkpoints(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "model.scheduler"} for row in ROWS]
    base, manifest = write_batch(tmp_path / "whole", rows, steps=3)
    run_batch([manifest], base=base, progress=False)

    def interrupt(output: str, step: int) -> None:
        if output.endswith("blue.png") and step == 1:
            raise KeyboardInterrupt

    base, manifest = write_batch(tmp_path / "cut", rows, steps=3)
    with pytest.raises(KeyboardInterrupt):
        run_batch([manifest], base=base, checkpoint_every=1, step_callback=interrupt, progress=False)
    statuses = [json.loads(line)["status"] for line in (tmp_path / "cut/out/batch-summary.jsonl").read_text().splitlines()]
    assert statuses == ["done", "pending", "pending"]
    steps: list[tuple[str, int]] = []
    summary = run_batch([manifest], base=base, checkpoint_every=1, step_callback=lambda o, s: steps.append((Path(o).name, s)),
                        progress=False)
    assert [r.status for r in summary.records] == ["skipped", "done", "done"]
    assert steps == [("blue.png", 2), ("grey.png", 0), ("grey.png", 1), ("grey.png", 2)]  # blue resumed at step 2
    for row in rows:
        name = Path(row["output"]).name
        assert np.array_equal(pixels(tmp_path / "cut/out" / name), pixels(tmp_path / "whole/out" / name)), name
    assert not (tmp_path / "cut/out/.jointdiff-checkpoints").exists()  # finished jobs remove their checkpoints


def test_failures_are_retried_then_recorded_and_the_rest_go_on(tmp_path):
    base, manifest = write_batch(tmp_path, ROWS)
    tries: dict[str, int] = {}

    def flaky(output: str, step: int) -> None:
        name = Path(output).name
        if step == 0:
            tries[name] = tries.get(name, 0) + 1
        if name == "red.png" and tries[name] == 1 or name == "blue.png":
            raise RuntimeError(f"device lost\nsecond line of {name}")

    summary = run_batch([manifest], base=base, retries=2, step_callback=flaky, progress=False)
    by_name = {Path(r.output).name: r for r in summary.records}
    assert (by_name["red.png"].status, by_name["red.png"].attempts) == ("done", 2)
    assert (by_name["blue.png"].status, by_name["blue.png"].attempts) == ("failed", 3)
    assert by_name["blue.png"].error == "RuntimeError: device lost"
    assert (by_name["grey.png"].status, tries) == ("done", {"red.png": 2, "blue.png": 3, "grey.png": 1})
    assert not (tmp_path / "out/blue.png").exists() and not summary.ok


def test_manifest_with_bad_rows_is_refused_up_front_naming_every_row(tmp_path, monkeypatch, capsys):
    rows = [
        {"prompt": "fine", "output": "out/a.png"},
        {"prompt": "negative seed", "seed": -1, "output": "out/b.png"},
        {"prompt": "same output as row 1", "output": "out/a.png"},
        {"prompt": "fine", "output": "out/d.png"},
        {"prompt": "unknown option", "geometry.lenght_px": 96, "output": "out/e.png"},
        {"promt": "typo in a column", "output": "out/f.png"},
    ]
    base, manifest = write_batch(tmp_path, rows)
    monkeypatch.setattr(batch_module, "run_job", lambda *a, **k: pytest.fail("a job ran"))
    with pytest.raises(BadJobsError) as caught:
        run_batch([manifest], base=base, progress=False)
    problems = caught.value.problems
    assert [re.search(r"rows.jsonl row (\d+) \(line \d+\): ", p).group(1) for p in problems] == ["2", "5", "6", "3"]
    assert "seed" in problems[0] and "lenght_px" in problems[1] and "'promt' is unknown" in problems[2]
    assert "also the output of" in problems[3] and "row 1" in problems[3]
    assert main(["batch", str(manifest), "--base", str(base), "-q"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and err[-1] == "jointdiff: error: 4 bad job(s); nothing was run"
    assert not (tmp_path / "out").exists()


def test_csv_cells_keep_text_where_the_job_has_text(tmp_path):
    base, _ = write_batch(tmp_path, [])
    manifest = tmp_path / "rows.csv"
    manifest.write_text('prompt,seed,geometry.length_px\n1984,7,128\n"a sky, at dusk",,\n')
    jobs = collect_jobs([manifest], base=base)
    assert [j.job.conditioners[0].options["prompt"] for j in jobs] == ["1984", "a sky, at dusk"]
    assert [(j.job.seed, j.job.geometry.options["length_px"]) for j in jobs] == [(7, 128), (0, 96)]
    assert [Path(j.job.output).name for j in jobs] == ["sky-0001.png", "sky-0002.png"]  # numbered after the base's
    assert job_fingerprint(jobs[0].job) != job_fingerprint(jobs[1].job)
    moved = Job.from_dict({**jobs[0].job.to_dict(), "output": str(tmp_path / "elsewhere.png"), "view_batch_size": 1})
    assert job_fingerprint(moved) == job_fingerprint(jobs[0].job)  # where it is written does not make another image


def test_sources_job_files_folders_and_every_problem_at_once(tmp_path):
    base, _ = write_batch(tmp_path, [])
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "b.toml").write_text(BASE.format(steps=2).replace("out/sky.png", "b.png"))
    (jobs / "a.json").write_text(json.dumps({**Job.from_toml(base).to_dict(), "output": "a.png", "seed": 4}))
    (jobs / "notes.txt").write_text("not a job")
    found = collect_jobs([jobs, base])
    assert [Path(j.where).name for j in found] == ["a.json", "b.toml", "base.toml"]
    assert [Path(j.job.output) for j in found] == [jobs / "a.png", jobs / "b.png", tmp_path / "out/sky.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadJobsError) as caught:
        collect_jobs([tmp_path / "missing.toml", tmp_path / "empty", tmp_path / "rows.jsonl"])
    assert caught.value.problems == [
        f"manifest {str(tmp_path / 'rows.jsonl')!r} needs a base job (--base JOB.toml): its rows are changes to it",
        f"{str(tmp_path / 'missing.toml')!r} does not exist",
        f"folder {str(tmp_path / 'empty')!r} holds no job files (.toml, .json)",
    ]


def test_model_cache_is_least_recently_used_and_bounded():
    ddim = Job.from_dict({"model": {"id": "tiny", "device": "cpu"}, "geometry": {"name": "strip", "length_px": 96, "window_latent": 8},
                          "conditioners": [{"name": "text", "prompt": "x"}]}).model
    euler = ddim.model_copy(update={"scheduler": "euler"})
    cache = ModelCache(max_models=1)
    first = cache.get(ddim)
    assert cache.get(ddim) is first and cache.loads == 1 and cache.last_load_s == 0.0
    cache.get(euler)
    assert (cache.loads, len(cache), ddim in cache, euler in cache) == (2, 1, False, True)
    assert cache.get(ddim) is not first and cache.loads == 3
    with pytest.raises(ConfigError, match=r"--max-models \(max_models\) = 0: must be a positive integer"):
        ModelCache(max_models=0)


def test_ray_option_without_ray_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["batch", "--ray", "auto", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "jointdiff: error: --ray needs Ray, which is not installed: pip install 'jointdiff[ray]'"
    )


def test_a_job_whose_mesh_file_changed_is_made_again_and_an_unchanged_one_is_skipped(tmp_path, monkeypatch):
    trimesh = pytest.importorskip("trimesh")
    from types import SimpleNamespace

    mesh = tmp_path / "shape.obj"
    trimesh.creation.box().export(mesh)
    job = Job.from_dict({"model": {"id": "tiny", "device": "cpu"}, "geometry": {"name": "mesh", "path": str(mesh)},
                         "conditioners": [{"name": "text", "prompt": "a box"}], "steps": 1,
                         "output": str(tmp_path / "out" / "box.png")})
    calls: list[Job] = []

    def fake_run_job(job, **kwargs):  # what run_job returns, with an option the plugin filled in
        calls.append(job)
        recorded = job.to_dict()
        recorded["geometry"]["mesh_sha256"] = "filled-in"
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))], metadata={"job": recorded, "seed": 0})

    monkeypatch.setattr(batch_module, "run_job", fake_run_job)
    cache = ModelCache()
    monkeypatch.setattr(cache, "get", lambda model: SimpleNamespace(device="cpu"))
    assert run_one(job, cache).status == "done" and len(calls) == 1
    with Image.open(job.output) as image:
        embedded = json.loads(image.text["jointdiff:job"])
    assert embedded["geometry"]["mesh_sha256"] == "filled-in" and "checkpoint" not in embedded
    assert run_one(job, cache).status == "skipped" and len(calls) == 1  # same mesh: nothing to do
    before = job_fingerprint(job)
    trimesh.creation.icosphere(1).export(mesh)  # the same job on another mesh
    assert job_fingerprint(job) != before and job_fingerprint(job).split("-")[0] == before.split("-")[0]
    assert run_one(job, cache).status == "done" and len(calls) == 2
    assert run_one(job, cache).status == "skipped" and len(calls) == 2


def test_two_jobs_sharing_one_checkpoint_path_are_refused_up_front(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    for name, checkpoint in (("a", "shared.ckpt"), ("b", "own.ckpt"), ("c", "./shared.ckpt")):
        text = BASE.format(steps=2).replace('"out/sky.png"', f'"out/{name}.png"')
        (folder / f"{name}.toml").write_text(text + f'\n[checkpoint]\npath = "{checkpoint}"\nevery = 1\n')
    with pytest.raises(BadJobsError) as caught:
        collect_jobs([folder])
    [problem] = caught.value.problems
    assert re.fullmatch(r".*c\.toml: checkpoint path '.*shared\.ckpt' is also the checkpoint path of .*a\.toml", problem)
    (folder / "c.toml").unlink()
    assert [Path(item.job.output).name for item in collect_jobs([folder])] == ["a.png", "b.png"]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--retries", "-1", "--retries (retries) = -1: must be a non-negative integer"),
    ("--max-models", "0", "--max-models (max_models) = 0: must be a positive integer"),
    ("--checkpoint-every", "-3", "--checkpoint-every (checkpoint_every) = -3: must be a positive number of steps"),
])
def test_bad_batch_flags_are_named_as_flags(tmp_path, monkeypatch, capsys, flag, value, message):
    base, manifest = write_batch(tmp_path, ROWS[:1])
    monkeypatch.setattr(batch_module, "run_job", lambda *a, **k: pytest.fail("a job ran"))
    assert main(["batch", str(manifest), "--base", str(base), "-q", flag, value]) == 2
    assert capsys.readouterr().err.startswith(f"jointdiff: error: {message}")
