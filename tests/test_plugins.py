"""Plugin discovery: the template package through its entry point, and robust loading.

Every test uses its own :class:`~jointdiff.core.registry.PluginManager` (or
:func:`~jointdiff.testing.isolated_plugins`), so the process-wide manager is never changed.
Fake distributions are written as ``*.dist-info`` folders on a temporary ``sys.path`` entry:
``importlib.metadata`` finds their entry points exactly as it finds installed ones.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from jointdiff import JointDiffusion, hookimpl
from jointdiff.core import hookspecs
from jointdiff.core import registry as plugin_module
from jointdiff.core.registry import PluginManager, create, register_plugin
from jointdiff.testing import isolated_plugins
from jointdiff.utils.errors import ConfigError, PluginError

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "jointdiff-ring"


# ----------------------------------------------------------------------------- the template package


@pytest.fixture(scope="module")
def ring_site(tmp_path_factory):
    """The template package built and installed (not editable) into a temporary site folder,
    from a copy so that the build leaves nothing in the checkout."""
    source = tmp_path_factory.mktemp("src") / "jointdiff-ring"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return source, site


@pytest.fixture
def ring_installed(ring_site, monkeypatch):
    """The installed template on ``sys.path`` for one test; its module is forgotten afterwards."""
    monkeypatch.syspath_prepend(str(ring_site[1]))
    yield ring_site
    sys.modules.pop("jointdiff_ring", None)


def test_template_is_discovered_through_its_entry_point(ring_installed, monkeypatch):
    monkeypatch.delenv("JOINTDIFF_PLUGINS", raising=False)
    manager = PluginManager()
    manager.load_entry_points()
    info = manager.registry.entries["geometry"]["ring"]
    assert (info.plugin, info.distribution) == ("ring", "jointdiff-ring 0.1.0")
    assert info.cls.__module__ == "jointdiff_ring"
    assert "ring" not in manager.registry.failures
    assert "strip" in manager.registry.entries["geometry"]  # built-ins load beside it


def test_template_ring_denoises_exactly_like_a_looping_strip(ring_installed, tiny_pipeline):
    """The ring's canvas is a looping strip; only its output image differs. With the same
    windows, joint diffusion must give the built-in wrapped strip's latents."""
    sizes = {"window_latent": 32, "stride_latent": 16}
    with isolated_plugins():
        ring = create("geometry", "ring", circumference_px=896, thickness_px=256, **sizes)
        strip = create("geometry", "strip", length_px=896, wrap=True, **sizes)
        text = create("conditioner", "text", prompt="a wreath", guidance_scale=1.0)  # no CFG: half the work
    runs = [
        JointDiffusion(tiny_pipeline, g, [text])(num_inference_steps=2, seed=3, progress=False, output_type="latent")
        for g in (ring, strip)
    ]
    assert ring.num_windows == strip.num_windows == 7
    assert runs[0].latents.shape == (1, 4, 32, 112)
    torch.testing.assert_close(runs[0].latents, runs[1].latents, rtol=0, atol=1e-6)


def test_template_own_tests_pass(ring_site, pytester, monkeypatch):
    """The template's test suite, collected from its own folder as its author would run it
    (including its end-to-end test on the tiny model, which decodes and warps the ring)."""
    source, site = ring_site
    monkeypatch.delenv("JOINTDIFF_PLUGINS", raising=False)
    pytester.syspathinsert(site)
    try:
        result = pytester.runpytest_inprocess(str(source), f"--rootdir={source}", "-p", "no:cacheprovider")
    finally:
        sys.modules.pop("jointdiff_ring", None)
        sys.modules.pop("test_ring", None)
    result.assert_outcomes(passed=26)


# ----------------------------------------------------------------------------- fake distributions


class FakeSite:
    """Writes distributions (dist-info with entry points, plus modules) into one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add(self, dist: str, version: str, modules: dict[str, str], entry_points: dict | None = None) -> None:
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        points = entry_points if entry_points is not None else {name: name for name in modules}
        lines = "".join(f"{name} = {target}\n" for name, target in points.items())
        (info / "entry_points.txt").write_text(f"[jointdiff]\n{lines}")
        for name, source in modules.items():
            (self.root / f"{name}.py").write_text(textwrap.dedent(source))
            self.modules.append(name)


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    site = FakeSite(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield site
    for name in site.modules:
        sys.modules.pop(name, None)


GEOMETRY = """
from jointdiff import hookimpl
from jointdiff_plugins.tiles import StripGeometry

class {cls}(StripGeometry):
    name = "{name}"

@hookimpl
def register_geometries(register):
    register({cls})
"""


def load(*names: str, monkeypatch) -> PluginManager:
    """A fresh manager loading only the named entry points."""
    monkeypatch.setenv("JOINTDIFF_PLUGINS", ",".join(names))
    manager = PluginManager()
    manager.load_entry_points()
    return manager


def test_import_failure_is_reported_by_name_and_the_rest_still_load(fake_site, monkeypatch):
    fake_site.add("jointdiff-broken", "1.0", {"fake_broken": "raise ImportError('needs libfoo')"})
    fake_site.add("jointdiff-good", "1.0", {"fake_good": GEOMETRY.format(cls="Good", name="good")})
    registry = load("fake_broken", "fake_good", monkeypatch=monkeypatch).registry
    assert "ImportError: needs libfoo" in registry.failures["fake_broken"]
    assert "jointdiff-broken 1.0" in registry.failures["fake_broken"]
    assert registry.get("geometry", "good").__name__ == "Good"
    with pytest.raises(ConfigError, match="plugin 'fake_broken' failed to load: .*needs libfoo"):
        registry.get("geometry", "missing")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("register(int)", "expects a subclass of Geometry, got <class 'int'>"),
        ("register(Abstract)", "Abstract is abstract: it does not implement canvas_shape_latent, extract"),
        ("register(BadName)", "BadName.name must be a non-empty string .* got 'has space'"),
        ("register(NoName)", "NoName.name must be .* got None"),
        ("register(BadOptions)", "BadOptions.Options must be a subclass of jointdiff.core.options.PluginOptions"),
        ("raise RuntimeError('boom')", "register_geometries raised RuntimeError: boom"),
    ],
)
def test_invalid_registration_is_reported_and_nothing_of_the_plugin_is_kept(fake_site, monkeypatch, body, reason):
    source = f"""
    from jointdiff import hookimpl
    from jointdiff.core.geometry import Geometry
    from jointdiff_plugins.tiles import StripGeometry
    class Fine(StripGeometry):
        name = "fine"
    class Abstract(Geometry):
        name = "abstract"
    class BadName(StripGeometry):
        name = "has space"
    class NoName(StripGeometry):
        name = None
    class BadOptions(StripGeometry):
        name = "bad-options"
        Options = dict
    @hookimpl
    def register_geometries(register):
        register(Fine)
        {body}
    """
    fake_site.add("jointdiff-invalid", "1.0", {"fake_invalid": source})
    manager = load("fake_invalid", monkeypatch=monkeypatch)
    assert re.search(reason, manager.registry.failures["fake_invalid"])
    assert "fine" not in manager.registry.entries["geometry"]  # all or nothing
    assert not manager.pm.has_plugin("fake_invalid")


def test_two_plugins_claiming_one_name_is_an_error_naming_both_distributions(fake_site, monkeypatch):
    fake_site.add("jointdiff-one", "1.0", {"fake_one": GEOMETRY.format(cls="One", name="dup")})
    two = GEOMETRY.format(cls="Two", name="dup") + "\nclass Other(Two):\n    name = 'other'\n" + \
        "@hookimpl(specname='register_geometries')\ndef also(register):\n    register(Other)\n"
    fake_site.add("jointdiff-two", "2.0", {"fake_two": two})
    registry = load("fake_one", "fake_two", monkeypatch=monkeypatch).registry
    with pytest.raises(PluginError) as error:
        registry.get("geometry", "dup")
    message = str(error.value)
    for part in ("'dup'", "'fake_one'", "jointdiff-one 1.0", "'fake_two'", "jointdiff-two 2.0"):
        assert part in message
    assert registry.get("geometry", "other").__name__ == "Other"  # the rest of both plugins stays


def test_one_entry_point_name_in_two_distributions_loads_both(fake_site, monkeypatch):
    for side in ("left", "right"):
        module = {f"fake_{side}": GEOMETRY.format(cls=side.title(), name=side)}
        fake_site.add(f"jointdiff-{side}", "1.0", module, {"same": f"fake_{side}"})
    registry = load("same", monkeypatch=monkeypatch).registry
    plugins = {registry.entries["geometry"][n].plugin for n in ("left", "right")}
    assert len(plugins) == 2 and "same" in plugins and not registry.failures


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("@hookimpl\ndef register_geometry(register):\n    pass\n",
         "unknown hook 'register_geometry'; did you mean 'register_geometries'?"),
        ("@hookimpl(specname='register_shapes')\ndef anything(register):\n    pass\n",
         "unknown hook 'register_shapes'"),
        ("def register_geometries(register):\n    pass\n",
         "'register_geometries' is not marked with @jointdiff.hookimpl"),
        ("@hookimpl\ndef register_geometries(register, extra):\n    pass\n", "invalid hook implementation: .*extra"),
        ("x = 1\n", "implements no jointdiff hook"),
    ],
)
def test_hook_mistakes_are_errors_not_silence(fake_site, monkeypatch, source, reason):
    fake_site.add("jointdiff-typo", "1.0", {"fake_typo": "from jointdiff import hookimpl\n" + source})
    failures = load("fake_typo", monkeypatch=monkeypatch).registry.failures
    assert re.search(reason, failures["fake_typo"].replace("\n", " "))


# ----------------------------------------------------------------------------- plugin API version


@pytest.mark.parametrize(
    ("required", "reason"),
    [
        ("2", None),
        ("2.0", None),
        ("2.1", None),
        ("3.0", "requires plugin API 3.0, but this jointdiff provides 2.1"),
        ("1.0", "requires plugin API 1.0, but this jointdiff provides 2.1; to port it to 2.x: rename Conditioner.unet_kwargs"),
        ("2.99", "requires plugin API 2.99"),
        ("one", "REQUIRES_PLUGIN_API must look like 'MAJOR' or 'MAJOR.MINOR', got 'one'"),
    ],
)
def test_required_plugin_api_is_checked(fake_site, monkeypatch, required, reason):
    source = f"REQUIRES_PLUGIN_API = {required!r}\n" + GEOMETRY.format(cls="Versioned", name="versioned")
    fake_site.add("jointdiff-versioned", "1.0", {"fake_versioned": source})
    registry = load("fake_versioned", monkeypatch=monkeypatch).registry
    if reason is None:
        assert registry.get("geometry", "versioned").__name__ == "Versioned" and not registry.failures
    else:
        assert reason in registry.failures["fake_versioned"]
        assert "versioned" not in registry.entries["geometry"]


def test_plugin_api_version_is_exposed():
    import jointdiff

    assert jointdiff.PLUGIN_API_VERSION == hookspecs.PLUGIN_API_VERSION
    assert hookspecs.parse_version(jointdiff.PLUGIN_API_VERSION) >= (1, 0)


# ----------------------------------------------------------------------------- environment variables


def test_jointdiff_plugins_restricts_which_entry_points_are_imported(fake_site, monkeypatch):
    fake_site.add("jointdiff-a", "1.0", {"fake_a": GEOMETRY.format(cls="A", name="a")})
    fake_site.add("jointdiff-b", "1.0", {"fake_b": "raise RuntimeError('must not be imported')"})
    registry = load("fake_a", monkeypatch=monkeypatch).registry
    assert [info.name for info in registry.all()] == ["a"]  # no built-ins either
    assert "fake_b" not in sys.modules and not registry.failures
    with pytest.raises(ConfigError, match="JOINTDIFF_PLUGINS restricts loading to: fake_a"):
        registry.get("geometry", "strip")


def test_jointdiff_plugins_reports_a_name_that_nothing_provides(monkeypatch):
    registry = load("tiles", "tilez", monkeypatch=monkeypatch).registry
    assert registry.get("geometry", "strip")
    assert "no installed distribution has a 'jointdiff' entry point" in registry.failures["tilez"]


def test_jointdiff_plugins_empty_loads_nothing(monkeypatch):
    registry = load(monkeypatch=monkeypatch).registry
    assert registry.all() == [] and registry.failures == {}


def test_without_jointdiff_plugins_every_entry_point_loads(fake_site, monkeypatch):
    fake_site.add("jointdiff-a", "1.0", {"fake_a": GEOMETRY.format(cls="A", name="a")})
    monkeypatch.delenv("JOINTDIFF_PLUGINS", raising=False)
    manager = PluginManager()
    manager.load_entry_points()
    names = {info.name for info in manager.registry.all()}
    assert {"a", "strip", "grid", "text", "none"} <= names


def test_trace_hooks_writes_every_hook_call_to_stderr(capsys, monkeypatch):
    plugin = types.ModuleType("traced")
    exec(GEOMETRY.format(cls="Traced", name="traced"), plugin.__dict__)
    monkeypatch.setenv("JOINTDIFF_TRACE_HOOKS", "1")
    PluginManager().add(plugin, "traced")
    err = capsys.readouterr().err
    assert "register_geometries" in err and "finish register_geometries" in err
    monkeypatch.delenv("JOINTDIFF_TRACE_HOOKS")
    PluginManager().add(plugin, "traced")
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- in-process plugins


def test_register_plugin_raises_for_an_invalid_plugin_and_global_state_is_restored():
    before = plugin_module._MANAGER
    typo = types.SimpleNamespace(register_geometrie=hookimpl(lambda register: None))
    with isolated_plugins(entry_points=False) as manager:
        with pytest.raises(PluginError, match="plugin 'typo': unknown hook 'register_geometrie'"):
            register_plugin(typo, "typo")
        assert plugin_module.get_plugin_manager() is manager
    assert plugin_module._MANAGER is before


def test_in_process_plugin_is_usable_by_name():
    plugin = types.ModuleType("local_geometry")
    exec(GEOMETRY.format(cls="Local", name="local"), plugin.__dict__)
    with isolated_plugins(plugin, entry_points=False) as manager:
        geometry = create("geometry", "local", length_px=1024)
        assert type(geometry).__name__ == "Local"
        assert manager.registry.entries["geometry"]["local"].distribution == "local"
        with pytest.raises(PluginError, match="already registered"):
            manager.add(plugin, "local_geometry")


def test_two_entry_points_loading_one_module_keep_the_first(fake_site, monkeypatch):
    fake_site.add("jointdiff-twice", "1.0", {"fake_twice": GEOMETRY.format(cls="Twice", name="twice")},
                  {"first": "fake_twice", "second": "fake_twice"})
    manager = load("first", "second", monkeypatch=monkeypatch)
    assert manager.registry.entries["geometry"]["twice"].plugin == "first"
    assert "already registered as plugin 'first'" in manager.registry.failures["second"]
    assert manager.pm.has_plugin("first")


def test_failure_reasons_are_one_line(fake_site, monkeypatch):
    fake_site.add("jointdiff-syntax", "1.0", {"fake_syntax": "def broken(:\n    pass\n"})
    fake_site.add("jointdiff-extra", "1.0", {"fake_extra": "from jointdiff import hookimpl\n"
                                             "@hookimpl\ndef register_geometries(register, extra):\n    pass\n"})
    failures = load("fake_syntax", "fake_extra", monkeypatch=monkeypatch).registry.failures
    assert "SyntaxError" in failures["fake_syntax"] and "extra" in failures["fake_extra"]
    assert all("\n" not in why for why in failures.values())
