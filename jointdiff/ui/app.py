"""The Gradio app of ``jointdiff ui``: compose a job from the registered plugins' forms,
estimate it, queue it, watch it form (progress with ETA, a preview every few steps), cancel
and resume it, and browse the history and gallery kept by :class:`~jointdiff.jobs.queue.JobQueue`.

Every job composed here is validated by the code the CLI uses (:meth:`Job.from_dict`,
:func:`check_before_loading`) after its file paths are confined to the server's roots
(:mod:`jointdiff.ui.safety`); the one-line message shows in the form section it names.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from jointdiff.core.registry import get_registry
from jointdiff.image.output import read_job_metadata
from jointdiff.jobs.queue import JobQueue, JobRecord, one_line
from jointdiff.jobs.spec import Job, ModelSpec, check_before_loading
from jointdiff.surfaces.viewer import viewer_html
from jointdiff.ui import forms
from jointdiff.ui.estimate import estimate_text
from jointdiff.ui.safety import confine_paths
from jointdiff.utils.errors import ConfigError

PLUGIN_KINDS = ("geometry", "conditioner", "synchronizer")
JOB_EXCLUDE = frozenset({"model", "geometry", "conditioners", "synchronizer", "checkpoint", "output"})
HISTORY_HEADERS = ["job", "status", "place", "step", "prompt", "seconds", "error"]
TICK_S = 0.5


@dataclass
class Settings:
    """Where the app keeps its jobs (``folder``) and which folders typed paths may name (``roots``)."""

    folder: Path
    roots: list[Path]


class Form:
    """The job form: plugin selectors, then one input per option of the model, the job and
    every registered plugin (a plugin's inputs show while it is selected)."""

    def __init__(self) -> None:
        registry = get_registry()
        self.plugins = {kind: sorted(registry.entries[kind]) for kind in PLUGIN_KINDS}
        self.fields: list[forms.FormField] = forms.fields_of("model", ModelSpec)
        self.fields += forms.fields_of("job", Job, JOB_EXCLUDE)
        for kind in PLUGIN_KINDS:
            for name in self.plugins[kind]:
                self.fields += forms.fields_of(f"{kind}/{name}", registry.entries[kind][name].cls.Options)
        self.sections = ["model", "job", *(f"{kind}/{name}" for kind in PLUGIN_KINDS for name in self.plugins[kind])]
        self.inputs: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}
        self.errors: dict[str, Any] = {}

    # -- layout ----------------------------------------------------------------------------

    def render(self) -> None:
        with gr.Accordion("Model", open=False):
            self._section("model")
        self.geometry = gr.Dropdown(self.plugins["geometry"], value="strip", label="geometry", elem_id="geometry")
        self._plugin_groups("geometry", "strip")
        self.conditioners = gr.CheckboxGroup(self.plugins["conditioner"], value=["text"], label="conditioners",
                                             elem_id="conditioners")
        self._plugin_groups("conditioner", "text")
        self.synchronizer = gr.Dropdown(self.plugins["synchronizer"], value="none", label="synchronizer", elem_id="synchronizer")
        self._plugin_groups("synchronizer", "none")
        with gr.Accordion("Steps, seed, fusion", open=True):
            self._section("job")
        self.geometry.change(lambda n: self._visible("geometry", [n]), self.geometry, self._groups_of("geometry"))
        self.conditioners.change(lambda ns: self._visible("conditioner", ns), self.conditioners, self._groups_of("conditioner"))
        self.synchronizer.change(lambda n: self._visible("synchronizer", [n]), self.synchronizer, self._groups_of("synchronizer"))

    def _plugin_groups(self, kind: str, selected: str) -> None:
        for name in self.plugins[kind]:
            section = f"{kind}/{name}"
            with gr.Group(visible=name == selected, elem_id=f"group-{kind}-{name}") as group:
                gr.Markdown(f"**{kind} `{name}`**")
                self._section(section)
            self.groups[section] = group

    def _section(self, section: str) -> None:
        self.errors[section] = gr.HTML("", elem_id=f"error-{section.replace('/', '-')}", elem_classes=["jd-error"])
        for field in self.fields:
            if field.section == section:
                self.inputs[field.key] = _component(field)

    def _groups_of(self, kind: str) -> list[Any]:
        return [self.groups[f"{kind}/{name}"] for name in self.plugins[kind]]

    def _visible(self, kind: str, selected: list[str]) -> list[Any]:
        return [gr.update(visible=name in (selected or [])) for name in self.plugins[kind]]

    # -- values ----------------------------------------------------------------------------

    @property
    def components(self) -> list[Any]:
        """Selectors then every input, in :attr:`fields` order (the handlers' inputs)."""
        return [self.geometry, self.conditioners, self.synchronizer, *(self.inputs[f.key] for f in self.fields)]

    def compose(self, values: list[Any]) -> dict[str, Any]:
        """The raw job of the form's values (ConfigError for an input that cannot be read)."""
        geometry, conditioners, synchronizer, *rest = values
        raw = {f.key: v for f, v in zip(self.fields, rest)}

        def options(section: str) -> dict[str, Any]:
            table = {}
            for field in self.fields:
                if field.section == section:
                    include, value = forms.read(field, raw[field.key])
                    if include:
                        table[field.name] = value
            return table

        return {
            "model": options("model"),
            **options("job"),
            "geometry": {"name": geometry, **options(f"geometry/{geometry}")},
            "conditioners": [{"name": name, **options(f"conditioner/{name}")} for name in conditioners or []],
            "synchronizer": {"name": synchronizer, **options(f"synchronizer/{synchronizer}")},
        }

    def fill(self, job: dict[str, Any]) -> list[Any]:
        """Updates of :attr:`components` showing ``job`` (a job dict, e.g. a PNG's)."""
        tables = {
            "model": job.get("model") or {},
            "job": job,
            f"geometry/{job['geometry']['name']}": job["geometry"],
            f"synchronizer/{(job.get('synchronizer') or {}).get('name', 'none')}": job.get("synchronizer") or {},
        }
        for table in job.get("conditioners", []):
            tables.setdefault(f"conditioner/{table['name']}", table)
        updates = [job["geometry"]["name"], [t["name"] for t in job.get("conditioners", [])],
                   (job.get("synchronizer") or {}).get("name", "none")]
        for field in self.fields:
            table = tables.get(field.section)
            value = table.get(field.name, field.default) if table is not None else field.default
            updates.append(forms.shown(field, value))
        return updates

    def validate(self, values: list[Any], roots: list[Path]) -> tuple[dict[str, Any] | None, list[str]]:
        """``(job data, error texts per section + the general one)``: the job checked as the CLI
        checks it, its paths confined to ``roots``; data None when it is refused."""
        try:
            data = confine_paths(self.compose(values), roots)
            check_before_loading(Job.from_dict(data))
        except (ConfigError, ValueError, OSError) as error:
            message = one_line(error)
            section = forms.error_section(message, self.sections)
            return None, [_error_html(message) if s == section else "" for s in self.sections] + [_error_html(message)]
        return data, [""] * (len(self.sections) + 1)

    @property
    def error_outputs(self) -> list[Any]:
        return [self.errors[s] for s in self.sections]


def _component(field: forms.FormField) -> Any:
    common = {"label": field.name, "info": field.info, "value": forms.initial(field),
              "elem_id": f"field-{field.section.replace('/', '-')}-{field.name}"}
    if field.kind == "bool":
        return gr.Checkbox(**common)
    if field.kind in ("int", "float") and field.optional:
        return gr.Textbox(placeholder="None", **common)
    if field.kind in ("int", "float"):
        return gr.Number(precision=0 if field.kind == "int" else None, minimum=field.minimum, maximum=field.maximum, **common)
    if field.kind == "choice":
        choices = [c for c in field.choices] + ([""] if field.optional else [])
        return gr.Dropdown(choices, **common)
    lines = 2 if field.name in ("prompt", "negative_prompt") else 1
    return gr.Textbox(lines=lines, placeholder="JSON" if field.kind == "json" else "", **common)


def _error_html(message: str) -> str:
    return f'<div class="jd-error-text" style="color:#c00">⚠ {html.escape(message)}</div>' if message else ""


# -- the page --------------------------------------------------------------------------------


def build_app(queue: JobQueue, settings: Settings) -> gr.Blocks:
    """The app's page on ``queue``: the form on the left, the current job on the right,
    the queue, history and gallery below. Each browser page follows its own current job."""
    form = Form()
    with gr.Blocks(title="jointdiff") as app:
        state = gr.State({"job": None})  # the job this page follows: written by Run, Cancel, Resume, a history row
        seen = gr.State({})  # what this page last showed: written by the timer only, so the two never race
        with gr.Row():
            with gr.Column(scale=1):
                dropped = gr.File(label="Drop a jointdiff PNG here to load its job", file_types=[".png"],
                                  type="filepath", elem_id="drop-png")
                form.render()
                upload = gr.File(label="Upload an input image (its path goes into the box below)", type="filepath",
                                 elem_id="upload-input")
                uploaded = gr.Textbox(label="uploaded file path", interactive=False, elem_id="uploaded-path")
            with gr.Column(scale=1):
                general = gr.HTML("", elem_id="error-general")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    estimate = gr.Button("Estimate", elem_id="estimate")
                with gr.Row():
                    job_id = gr.Number(label="job", precision=0, elem_id="job-id")
                    cancel = gr.Button("Cancel", elem_id="cancel")
                    resume = gr.Button("Resume", elem_id="resume")
                    load = gr.Button("Load into form", elem_id="load-job")
                estimate_out = gr.Textbox(label="estimate", lines=6, interactive=False, elem_id="estimate-text")
                status = gr.HTML("No job yet.", elem_id="status")
                preview = gr.Image(label="preview", type="pil", interactive=False, elem_id="preview", height=200)
                results = gr.Gallery(label="result (cube maps: one image per face)", elem_id="results", columns=3,
                                     object_fit="contain", height=320)
                viewer = gr.HTML("", elem_id="viewer")
                downloads = gr.File(label="downloads (PNG with its job)", file_count="multiple", interactive=False,
                                    elem_id="downloads")
        history = gr.Dataframe(headers=HISTORY_HEADERS, label="queue and history (newest first; select a row)",
                               interactive=False, elem_id="history")
        gallery = gr.Gallery(label="gallery", columns=6, elem_id="gallery", object_fit="contain", height=240)
        parts = dict(state=state, seen=seen, dropped=dropped, upload=upload, uploaded=uploaded, general=general, run=run,
                     estimate=estimate, job_id=job_id, cancel=cancel, resume=resume, load=load,
                     estimate_out=estimate_out, status=status, preview=preview, results=results, viewer=viewer,
                     downloads=downloads, history=history, gallery=gallery)
        _wire(form, queue, settings, parts)
    return app


def _wire(form: Form, queue: JobQueue, settings: Settings, ui: dict[str, Any]) -> None:
    """Connect the buttons, the drop zone, the history and the timer to their handlers."""
    state, job_id, general = ui["state"], ui["job_id"], ui["general"]
    errors = [*form.error_outputs, general]

    def submit(page: dict[str, Any], *values: Any) -> list[Any]:
        data, texts = form.validate(list(values), settings.roots)
        if data is None:
            return [page, gr.skip(), *texts]
        try:
            new = queue.submit(data)
        except ConfigError as error:
            return [page, gr.skip(), *[""] * len(form.sections), _error_html(one_line(error))]
        return [{"job": new}, new, *texts]

    def estimate(*values: Any) -> list[Any]:
        data, texts = form.validate(list(values), settings.roots)
        if data is None:
            return ["", *texts]
        try:
            return [estimate_text(Job.from_dict(data)), *texts]
        except Exception as error:  # a model that fails to load must not take the server down
            return ["", *[""] * len(form.sections), _error_html(one_line(error))]

    def act(action: str, page: dict[str, Any], number: Any) -> list[Any]:
        if number is None:
            return [page, _error_html("no job selected: run one or select a row of the history")]
        try:
            queue.cancel(int(number)) if action == "cancel" else queue.resume(int(number))
        except ConfigError as error:
            return [page, _error_html(one_line(error))]
        return [{"job": int(number)}, ""]

    def load_png(path: str | None) -> list[Any]:
        if not path:
            return [gr.skip()] * (len(form.components) + 1)
        try:
            return [*form.fill(read_job_metadata(path)), ""]
        except (ConfigError, KeyError, TypeError) as error:
            return [gr.skip()] * len(form.components) + [_error_html(one_line(error))]

    def load_job(number: Any) -> list[Any]:
        try:
            return [*form.fill(queue.get(int(number)).job), ""]
        except (ConfigError, TypeError, ValueError) as error:
            return [gr.skip()] * len(form.components) + [_error_html(one_line(error))]

    ui["run"].click(submit, [state, *form.components], [state, job_id, *errors])
    ui["estimate"].click(estimate, form.components, [ui["estimate_out"], *errors])
    ui["cancel"].click(lambda p, n: act("cancel", p, n), [state, job_id], [state, general])
    ui["resume"].click(lambda p, n: act("resume", p, n), [state, job_id], [state, general])
    ui["load"].click(load_job, job_id, [*form.components, general])
    ui["dropped"].upload(load_png, ui["dropped"], [*form.components, general])
    ui["upload"].upload(lambda path: path or "", ui["upload"], ui["uploaded"])
    ui["history"].select(_select_row, None, [state, job_id])
    ui["job_id"].input(lambda n: {"job": int(n) if n else None}, job_id, state)  # type a job's number to follow it
    outputs = [ui["seen"], ui["status"], ui["preview"], ui["results"], ui["viewer"], ui["downloads"], ui["history"], ui["gallery"]]
    gr.Timer(TICK_S).tick(lambda followed, seen: _tick(queue, (followed or {}).get("job"), seen), [state, ui["seen"]], outputs,
                          concurrency_limit=None, show_progress="hidden")


def _select_row(event: gr.SelectData) -> list[Any]:
    row = event.row_value if event.row_value is not None else []
    number = int(row[0]) if row else None
    return [{"job": number}, number]


def _tick(queue: JobQueue, job: int | None, seen: dict[str, Any]) -> list[Any]:
    """What changed since the page's last tick (``seen``): the followed ``job``'s status,
    preview and results, the history and gallery."""
    page = dict(seen or {})
    history = queue.history()
    signature = [(r.id, r.status, r.step, queue.position(r.id)) for r in history]
    table = gr.skip() if page.get("history") == signature else [_history_row(queue, r) for r in history]
    gallery = gr.skip()
    if page.get("history") is None or [s[:2] for s in page["history"]] != [s[:2] for s in signature]:
        gallery = [(r.outputs[0], f"#{r.id} {r.prompt}") for r in history if r.status == "done" and r.outputs]
    page["history"] = signature
    if job is None:
        return [page, "No job yet.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), table, gallery]
    try:
        record = queue.get(job)
    except ConfigError:  # a number typed for a job that is not in this queue: say so, keep ticking
        return [page, _error_html(f"job {job} does not exist"), gr.skip(), gr.skip(), gr.skip(), gr.skip(), table, gallery]
    live = queue.live.get(record.id)
    preview = gr.skip()
    if live is not None and live.preview is not None and page.get("preview") != (record.id, live.preview_step):
        preview, page["preview"] = live.preview, (record.id, live.preview_step)
    shown = (record.id, record.status)
    results = viewer = downloads = gr.skip()
    if page.get("shown") != shown:
        page["shown"] = shown
        results = list(record.outputs) if record.status == "done" else []
        viewer = _viewer(record) if record.status == "done" else ""
        downloads = list(record.outputs) if record.status == "done" else None
    return [page, _status_html(queue, record), preview, results, viewer, downloads, table, gallery]


def _history_row(queue: JobQueue, record: JobRecord) -> list[Any]:
    place = queue.position(record.id)
    seconds = f"{record.seconds:.1f}" if record.seconds is not None else ""
    return [record.id, record.status, place or "", f"{record.step}/{record.steps}", record.prompt[:60], seconds, record.error or ""]


def _status_html(queue: JobQueue, record: JobRecord) -> str:
    """``job 3: running, step 4/20, ETA 12 s`` (or its place in the queue, or its error)."""
    text = f"job {record.id}: {record.status}"
    live = queue.live.get(record.id)
    if record.status == "queued":
        text += f", place {queue.position(record.id)} in the {record.device} queue"
    elif record.status == "running" and live is not None:
        text += f", step {live.step}/{record.steps}"
        if live.eta_s is not None:
            text += f", ETA {live.eta_s:.0f} s"
    elif record.status in ("done", "cancelled", "interrupted"):
        text += f", step {record.step}/{record.steps}" + (f", {record.seconds:.1f} s" if record.seconds else "")
    body = f'<div id="status-text" data-status="{record.status}" data-job="{record.id}">{html.escape(text)}</div>'
    if record.error:
        body += _error_html(record.error)
    return body


def _viewer(record: JobRecord) -> str:
    """The inline 360° viewer for an equirectangular result (nothing for other geometries)."""
    if record.job.get("geometry", {}).get("name") != "equirect" or not record.outputs:
        return ""
    page = html.escape(viewer_html(record.outputs[0]), quote=True)
    return f'<iframe id="viewer-frame" srcdoc="{page}" style="width:100%;height:360px;border:0"></iframe>'
