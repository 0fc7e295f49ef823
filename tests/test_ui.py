"""``jointdiff ui`` in a real browser: one app (its server in this process, its jobs on the
built-in tiny model) and one headless Chromium for the whole session; plus the UI's parts
without a browser (forms from option schemas, path confinement, previews).

Jobs that a test must catch mid-run wait at a step through a step hook of the app's job
queue (:data:`GATES`), so nothing depends on timing. ``JOINTDIFF_UI_SCREENSHOT=PATH`` writes
the README's screenshot (docs/images/ui.png) from the first test. The browser tests need the
Debian ``chromium`` package (``scripts/install-browser.sh``) and the ``playwright`` package
(its own browser downloads are never used); ``JOINTDIFF_SKIP_BROWSER=1`` skips them.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from jointdiff.jobs.spec import Job
from jointdiff.models.loading import load_model
from jointdiff.ui import forms, preview, safety
from jointdiff.utils.errors import ConfigError

pytestmark = pytest.mark.xdist_group("ui")  # with --dist loadgroup (scripts/test.sh): one app and browser in all

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000
UPLOAD_CAP_MB = 1
PREVIEW_SEED, CANCEL_SEED, QUEUE_SEED = 101, 202, 303
GATES: dict[int, threading.Event] = {}
"""Jobs with these seeds wait after step 0 until the event is set or the job is cancelled (once)."""


def tiny_job(seed: int = 0, steps: int = 2, prompt: str = "a test", length_px: int = 96) -> dict:
    return {
        "model": {"id": "tiny"},
        "geometry": {"name": "strip", "length_px": length_px, "window_latent": 8, "stride_latent": 4},
        "conditioners": [{"name": "text", "prompt": prompt}],
        "steps": steps,
        "seed": seed,
    }


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ---- without a browser -----------------------------------------------------------------------


class _RingOptions(pydantic.BaseModel):
    radius_px: int = pydantic.Field(64, ge=8, le=4096, description="ring radius")
    mode: str = "soft"
    smooth: bool = True
    angles_deg: list[float] = [0.0, 90.0]
    kind: "str | None" = None


def test_form_fields_follow_the_schema_of_any_options_model():
    fields = {f.name: f for f in forms.fields_of("geometry/ring", _RingOptions)}
    radius = fields["radius_px"]
    assert (radius.kind, radius.default, radius.minimum, radius.maximum) == ("int", 64, 8, 4096)
    assert "ring radius" in radius.info and ">= 8" in radius.info
    assert fields["smooth"].kind == "bool" and fields["angles_deg"].kind == "json"
    assert forms.read(fields["angles_deg"], "[0, 45]") == (True, [0, 45])
    assert forms.read(fields["angles_deg"], forms.initial(fields["angles_deg"])) == (False, None)  # the default: left out
    assert forms.read(fields["kind"], "") == (False, None)
    with pytest.raises(ConfigError, match=r"^'ring': option 'angles_deg' = '\[0,': not valid JSON"):
        forms.read(fields["angles_deg"], "[0,")


def test_every_registered_plugin_has_a_form_that_composes_its_defaults():
    from jointdiff.ui.app import Form

    form = Form()
    for kind, names in form.plugins.items():
        assert names, kind
    values = form.fill(Job.from_dict(tiny_job(seed=5)).to_dict())
    data = form.compose(values)
    assert Job.from_dict(data).to_dict() == Job.from_dict(tiny_job(seed=5)).to_dict()


def test_error_sections_follow_the_owner_and_option_the_message_names():
    sections = ["model", "job", "geometry/strip", "conditioner/text"]
    assert forms.error_section("'strip': option 'length_px' = -5: bad", sections) == "geometry/strip"
    assert forms.error_section("job: option 'model.dtype' = 'x': bad", sections) == "model"
    assert forms.error_section("job: option 'steps' = 0: bad", sections) == "job"


def test_paths_are_confined_to_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "mask.png").write_bytes(b"x")
    (root / "link.png").symlink_to(outside / "secret.png")
    job = tiny_job()
    job["conditioners"][0]["mask"] = "mask.png"
    assert safety.confine_paths(job, [root])["conditioners"][0]["mask"] == str((root / "mask.png").resolve())
    for bad in ("../outside/secret.png", str(outside / "secret.png"), "link.png", "~/../../etc/passwd"):
        job["conditioners"][0]["mask"] = bad
        with pytest.raises(ConfigError, match=r"conditioners\[0\]\.mask = .* is outside the folders"):
            safety.confine_paths(job, [root])
    hub = {**tiny_job(), "model": {"id": "org/some-model"}}
    assert safety.confine_paths(hub, [root])["model"]["id"] == "org/some-model"  # a hub id, not a file
    with pytest.raises(ConfigError, match="model.id = '/etc' is outside"):
        safety.confine_paths({**tiny_job(), "model": {"id": "/etc"}}, [root])


def test_sd_preview_is_the_linear_map_and_fitted_maps_predict_the_vae():
    canvas = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    rgb = preview.project(canvas, preview.SD_FACTORS, torch.zeros(3))
    expected = (canvas[1, :, 3, 2] @ preview.SD_FACTORS).clamp(-1, 1)
    torch.testing.assert_close(rgb[1, :, 3, 2], expected)
    image = preview.to_image(rgb)
    assert image.size == (14 * 8, 5 * 8)  # two sheets side by side, enlarged to be seen
    expected_rgb = tuple(int(v) for v in ((rgb[1, :, 3, 2] + 1) * 127.5).round())
    assert image.getpixel(((7 + 2) * 8 + 3, 3 * 8 + 3)) == expected_rgb
    model = load_model("tiny-sdxl", device="cpu")
    factors, bias = preview.linear_map(model)
    assert factors.shape == (model.latent_format.channels, 3)
    z = torch.randn(1, model.latent_format.channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = torch.nn.functional.adaptive_avg_pool2d(model.decode(z).float(), (16, 16))
    fitted = preview.project(z, factors, bias)
    constant = truth.mean(dim=(2, 3), keepdim=True).expand_as(truth)
    assert (fitted - truth).square().mean() < (constant - truth).square().mean()


def test_a_local_tiny_autoencoder_decodes_the_preview(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    blocks = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    AutoencoderTiny(**blocks).save_pretrained(tmp_path / "taesd")
    model = load_model("tiny", device="cpu")
    canvas = torch.randn(1, 4, 12, 24, generator=torch.Generator().manual_seed(2))
    shown = preview.Previewer(taesd={"sd": str(tmp_path / "taesd")})(model, canvas)
    decoder = AutoencoderTiny.from_pretrained(tmp_path / "taesd")
    with torch.no_grad():
        expected = preview.to_image(decoder.decode(model.to_vae_latents(canvas)).sample)
    assert shown.size == expected.size == (192 * 2, 96 * 2)  # 8 pixels per cell, enlarged twice
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(expected))


# ---- in the browser --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gate(queue, job_id: int, step: int) -> None:
    event = GATES.get(queue.get(job_id).job["seed"])
    if event is None or step != 0:
        return
    for _ in range(WAIT_MS // 50):  # a failed test must not hold the device for the next ones
        if event.is_set() or queue.cancel_requested(job_id):
            break
        event.wait(0.05)
    GATES.pop(queue.get(job_id).job["seed"], None)  # once: a rerun of the job goes through


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if os.environ.get("JOINTDIFF_SKIP_BROWSER") == "1":
        pytest.skip("JOINTDIFF_SKIP_BROWSER=1")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh (or set JOINTDIFF_SKIP_BROWSER=1)")
    from jointdiff.ui import start

    folder = tmp_path_factory.mktemp("ui")
    port = _free_port()
    app, queue = start(folder, port=port, block=False, max_upload_mb=UPLOAD_CAP_MB)
    queue.step_hooks.append(_gate)
    yield f"http://127.0.0.1:{port}/", queue
    for event in GATES.values():
        event.set()
    queue.close()
    app.close()


@pytest.fixture(scope="session")
def chromium(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright (or set JOINTDIFF_SKIP_BROWSER=1)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server[0])
    page.wait_for_selector("#run")
    yield page
    context.close()


def field(page, section: str, name: str):
    """The text input of a form field (a number box, or a text box for optional numbers)."""
    return page.locator(f"#field-{section}-{name}").locator("input, textarea").first


def compose(page, seed: int, steps: int = 2, prompt: str = "a watercolor fox", length_px: int = 96) -> None:
    """Fill the form for a tiny strip job (the other inputs keep their defaults)."""
    field(page, "conditioner-text", "prompt").fill(prompt)
    for name, value in (("length_px", length_px), ("window_latent", 8), ("stride_latent", 4)):
        field(page, "geometry-strip", name).fill(str(value))
    field(page, "job", "steps").fill(str(steps))
    field(page, "job", "seed").fill(str(seed))


def status_of(page, status: str) -> int:
    """Wait until the page's job has ``status``; its id."""
    try:
        element = page.wait_for_selector(f'#status-text[data-status="{status}"]')
    except Exception:
        shown = page.locator("#status").inner_text(), page.locator("#error-general").inner_text()
        raise AssertionError(f"the page never showed {status!r}; it shows {shown}") from None
    return int(element.get_attribute("data-job"))


def test_compose_run_see_previews_and_the_final_image(page, server):
    url, queue = server
    GATES[PREVIEW_SEED] = threading.Event()
    compose(page, PREVIEW_SEED, steps=2)
    page.click("#run")
    job_id = status_of(page, "running")
    first = page.wait_for_selector("#preview img").get_attribute("src")  # the preview after step 1
    GATES[PREVIEW_SEED].set()
    assert status_of(page, "done") == job_id
    page.wait_for_function("s => document.querySelector('#preview img')?.getAttribute('src') !== s", arg=first)
    result = page.wait_for_selector("#results img")
    record = queue.get(job_id)
    assert record.status == "done" and Path(record.outputs[0]).is_file()
    shown = page.evaluate("el => [el.naturalWidth, el.naturalHeight]", result)
    assert tuple(shown) == Image.open(record.outputs[0]).size
    link = page.locator("#downloads a").first.get_attribute("href")
    with urllib.request.urlopen(urllib.parse.urljoin(url, link)) as response:  # the PNG, its job embedded
        assert response.read() == Path(record.outputs[0]).read_bytes()
    target = os.environ.get("JOINTDIFF_UI_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target, full_page=False)


def test_cancel_then_resume_equals_an_uninterrupted_run(page, server):
    url, queue = server
    GATES[CANCEL_SEED] = threading.Event()
    compose(page, CANCEL_SEED, steps=3, prompt="a cancelled sky")
    page.click("#run")
    job_id = status_of(page, "running")
    page.click("#cancel")
    assert status_of(page, "cancelled") == job_id
    record = queue.get(job_id)
    assert record.step == 1 and Path(record.job["checkpoint"]["path"]).is_file()  # stopped after step 1, kept
    page.click("#resume")
    assert status_of(page, "done") == job_id
    assert queue.live[job_id].first_step == 1  # continued from the checkpoint
    page.click("#run")  # the same form again: an uninterrupted run
    page.wait_for_selector(f'#status-text[data-job="{job_id + 1}"][data-status="done"]')
    whole = queue.get(job_id + 1)
    assert whole.job["seed"] == CANCEL_SEED
    np.testing.assert_array_equal(pixels(queue.get(job_id).outputs[0]), pixels(whole.outputs[0]))


def test_a_reloaded_page_finds_the_history_and_gallery(page, server):
    url, queue = server
    job_id = queue.submit(tiny_job(seed=11, prompt="a remembered lighthouse"))
    queue.wait(job_id)
    page.reload()
    cells = page.wait_for_function(
        """p => [...document.querySelectorAll('#history tr')].map(r => [...r.querySelectorAll('td')]
                 .map(c => c.textContent.trim())).find(cells => cells.includes(p))""",
        arg="a remembered lighthouse",
    ).json_value()
    assert cells[:2] == [str(job_id), "done"]
    page.wait_for_selector("#gallery img")
    assert page.locator("#gallery img").count() == sum(r.status == "done" for r in queue.history())


def test_dropping_a_png_restores_its_job(page, server):
    url, queue = server
    job_id = queue.submit(tiny_job(seed=77, steps=1, prompt="a dropped canyon", length_px=128))
    png = queue.wait(job_id).outputs[0]
    page.set_input_files("#drop-png input[type=file]", png)
    prompt = field(page, "conditioner-text", "prompt")
    page.wait_for_function("el => el.value === 'a dropped canyon'", arg=prompt.element_handle())
    assert field(page, "geometry-strip", "length_px").input_value() == "128"
    assert field(page, "job", "seed").input_value() == "77"
    assert field(page, "job", "steps").input_value() == "1"


def test_a_bad_option_shows_the_cli_message_next_to_its_plugin_before_anything_runs(page, server):
    url, queue = server
    before = len(queue.history())
    compose(page, 5)
    field(page, "geometry-strip", "window_latent").fill("-3")
    page.click("#run")
    error = page.wait_for_selector("#error-geometry-strip .jd-error-text")
    bad = tiny_job(seed=5)
    bad["geometry"]["window_latent"] = -3
    with pytest.raises(ConfigError) as expected:
        Job.from_dict(bad)
    assert error.inner_text().strip() == f"⚠ {expected.value}"
    assert len(queue.history()) == before


def test_two_pages_queue_two_jobs_and_both_finish(chromium, server):
    url, queue = server
    GATES[QUEUE_SEED] = threading.Event()
    contexts = [chromium.new_context(viewport={"width": 1280, "height": 1400}) for _ in range(2)]  # two users
    first, second = (c.new_page() for c in contexts)
    try:
        for tab in (first, second):
            tab.set_default_timeout(WAIT_MS)
            tab.goto(url)
            tab.wait_for_selector("#run")
        compose(first, QUEUE_SEED, prompt="first page")
        first.click("#run")
        one = status_of(first, "running")
        compose(second, QUEUE_SEED + 1, prompt="second page")
        second.click("#run")
        two = status_of(second, "queued")
        assert "place 1" in second.locator("#status-text").inner_text()
        GATES[QUEUE_SEED].set()
        assert (status_of(first, "done"), status_of(second, "done")) == (one, two)
        assert queue.get(one).started < queue.get(two).started
    finally:
        GATES.pop(QUEUE_SEED, threading.Event()).set()
        for context in contexts:
            context.close()


def test_estimate_shows_what_the_engine_announces(page, server):
    from jointdiff.ui.estimate import estimate_text

    compose(page, 9)
    page.click("#estimate")
    box = page.locator("#estimate-text textarea")
    page.wait_for_function("el => el.value.includes('windows:')", arg=box.element_handle())
    job = tiny_job(seed=9, prompt="a watercolor fox")
    shown = box.input_value()
    assert shown == estimate_text(Job.from_dict(job))
    # counted by hand: a 96 px strip is 12 latent cells; 8-cell windows every 4 cells are 2 windows
    assert "windows: 2 of 8×8 cells" in shown and "over 2 steps" in shown and "memory:" in shown


def test_uploads_are_capped_and_kept_under_the_app_folder(page, server, tmp_path):
    url, queue = server
    small, large = tmp_path / "small.png", tmp_path / "large.bin"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(small)
    large.write_bytes(os.urandom(int(UPLOAD_CAP_MB * 1024 * 1024) + 4096))
    uploaded = page.locator("#uploaded-path textarea, #uploaded-path input").first
    page.set_input_files("#upload-input input[type=file]", str(large))
    page.wait_for_selector("text=/exceed|too large|maximum/i")  # Gradio refuses it in the page
    assert uploaded.input_value() == ""
    page.set_input_files("#upload-input input[type=file]", str(small))
    page.wait_for_function("el => el.value !== ''", arg=uploaded.element_handle())
    stored = Path(uploaded.input_value())
    assert stored.resolve().is_relative_to((queue.folder / "uploads").resolve())
    assert stored.read_bytes() == small.read_bytes()
    assert not [p for p in (queue.folder / "uploads").rglob("*") if p.is_file() and p.stat().st_size > len(large.read_bytes()) - 8192]


def test_a_failing_job_shows_its_one_line_error_and_the_server_goes_on(page, server, monkeypatch):
    from jointdiff.jobs import queue as queue_module

    url, queue = server
    real = queue_module.run_job

    def out_of_memory_for_seed_13(job, **kwargs):
        if job.seed == 13:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nsecond line")
        return real(job, **kwargs)

    monkeypatch.setattr(queue_module, "run_job", out_of_memory_for_seed_13)
    compose(page, 13)
    page.click("#run")
    failed = status_of(page, "failed")
    assert page.locator("#status .jd-error-text").inner_text().strip() == "⚠ RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    field(page, "job", "seed").fill("14")
    page.click("#run")
    page.wait_for_selector(f'#status-text[data-job="{failed + 1}"][data-status="done"]')


def test_equirect_results_open_in_the_inline_360_viewer(tmp_path):
    import html

    from jointdiff.jobs.queue import JobRecord
    from jointdiff.surfaces.viewer import viewer_html
    from jointdiff.ui.app import _viewer

    pano = tmp_path / "sky.png"
    Image.new("RGB", (64, 32), (20, 40, 200)).save(pano)

    def record(geometry: str) -> JobRecord:
        return JobRecord(1, 1, "cpu", {"geometry": {"name": geometry}}, "done", 0.0, 0.0, 1.0, 1.0, 2, 2, [str(pano)], None)

    frame = _viewer(record("equirect"))
    assert frame.startswith('<iframe id="viewer-frame" srcdoc="')
    assert html.unescape(frame.split('srcdoc="', 1)[1].split('" style=', 1)[0]) == viewer_html(pano)
    assert _viewer(record("strip")) == ""


def test_a_cube_map_from_the_history_shows_its_six_faces(page, server):
    url, queue = server
    job = {**tiny_job(steps=1, prompt="a cube sky"), "geometry": {"name": "cubemap", "face_px": 64, "window_latent": 8}}
    record = queue.wait(queue.submit(job))
    assert len(record.outputs) == 6
    page.reload()
    page.locator("#job-id input").fill(str(record.id))  # its number typed: the page follows it
    page.wait_for_selector(f'#status-text[data-job="{record.id}"][data-status="done"]')
    page.wait_for_function("() => document.querySelectorAll('#results img').length === 6")
    sizes = page.eval_on_selector_all("#results img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
    assert sizes == [[64, 64]] * 6
