"""Every built-in plugin loads through its entry point and registers what the docs list."""

from __future__ import annotations

from jointdiff.core.registry import PluginManager

EXPECTED = {
    "geometry": {"strip", "grid", "torus", "atlas", "cube_texture", "equirect", "cubemap", "mesh"},
    "conditioner": {"text", "tile_text", "controlnet", "regions", "inpaint_model", "flux_control"},
    "synchronizer": {"none", "syncdiffusion"},
}


def test_builtin_entry_points_load_without_failures(monkeypatch):
    monkeypatch.delenv("JOINTDIFF_PLUGINS", raising=False)
    manager = PluginManager()
    manager.load_entry_points()
    registry = manager.registry
    assert registry.failures == {}
    assert registry.conflicts == {}
    builtin = {kind: {i.name for i in registry.all() if i.kind == kind and i.distribution.startswith("jointdiff ")} for kind in EXPECTED}
    assert builtin == EXPECTED
