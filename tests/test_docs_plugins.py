"""The plugin guide and the hook reference stay true to the code.

- Every code block in ``docs/plugins.md`` preceded by ``<!-- snippet: PATH#REGION -->`` must
  equal that region of the file, marked there by ``# --8<-- [start:REGION]`` and
  ``# --8<-- [end:REGION]`` lines (``PATH`` alone: the whole file). To refresh the guide
  after changing the template, run ``JOINTDIFF_UPDATE_DOCS=1 pytest tests/test_docs_plugins.py``.
- ``docs/hooks.md`` documents every hook under its exact signature, no hook that does not
  exist, every public method of the base classes under its exact signature, and the
  current plugin API version.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

from jointdiff.core import hookspecs
from jointdiff.core.conditioner import Conditioner
from jointdiff.core.geometry import Geometry
from jointdiff.core.registry import ENV_PLUGINS, ENV_TRACE
from jointdiff.core.synchronizer import Synchronizer

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
REFERENCE = ROOT / "docs" / "hooks.md"
SNIPPET = re.compile(
    r"<!-- snippet: (?P<path>[^ #]+)(?:#(?P<region>[\w-]+))? -->\n```(?P<lang>\w*)\n(?P<body>.*?)```", re.S
)
MARKER = re.compile(r"^\s*# --8<-- \[(start|end):([\w-]+)\]\s*$")


# ----------------------------------------------------------------------------- snippets


def region(path: str, name: str | None) -> str:
    """The lines between a region's markers (other markers dropped), or the whole file."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines(keepends=True)
    if name is None:
        return "".join(lines)
    marks = [(i, *m.groups()) for i, line in enumerate(lines) if (m := MARKER.match(line))]
    starts = [i for i, kind, label in marks if (kind, label) == ("start", name)]
    ends = [i for i, kind, label in marks if (kind, label) == ("end", name)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise LookupError(f"{path}: region {name!r} must have one start and one end marker")
    return "".join(line for line in lines[starts[0] + 1 : ends[0]] if not MARKER.match(line))


def with_current_snippets(text: str) -> str:
    def replace(match: re.Match) -> str:
        body = region(match["path"], match["region"])
        head = match.group(0)[: match.start("body") - match.start(0)]
        return head + body + "```"

    return SNIPPET.sub(replace, text)


def test_guide_snippets_are_cut_from_tested_files():
    text = GUIDE.read_text(encoding="utf-8")
    assert len(SNIPPET.findall(text)) >= 10
    current = with_current_snippets(text)
    if os.environ.get("JOINTDIFF_UPDATE_DOCS") and current != text:
        GUIDE.write_text(current, encoding="utf-8")
        pytest.skip("docs/plugins.md rewritten from the marked regions")
    for ours, theirs in zip(SNIPPET.finditer(text), SNIPPET.finditer(current)):
        where = f"{ours['path']}#{ours['region']}"
        assert ours["body"] == theirs["body"], f"docs/plugins.md snippet {where} differs from the code"


def test_guide_code_blocks_all_come_from_files():
    """Every Python block in the guide is a snippet (no untested code)."""
    text = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"(.*)\n```python\n", text)
    assert blocks and all(line.startswith("<!-- snippet:") for line in blocks)


def test_snippet_regions_are_used_by_the_guide():
    """Every region marked in the template's module is shown in the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    source = "examples/jointdiff-ring/jointdiff_ring.py"
    marked = {m.group(2) for line in (ROOT / source).read_text().splitlines() if (m := MARKER.match(line))}
    shown = {m["region"] for m in SNIPPET.finditer(text) if m["path"] == source}
    assert marked == shown


def test_region_extraction_rejects_a_missing_region():
    with pytest.raises(LookupError, match="region 'nope'"):
        region("examples/jointdiff-ring/jointdiff_ring.py", "nope")


def test_guide_names_the_environment_variables_the_code_reads():
    text = GUIDE.read_text(encoding="utf-8")
    assert f"{ENV_PLUGINS}=" in text and f"{ENV_TRACE}=" in text


# ----------------------------------------------------------------------------- hook reference


def signature(function, name: str | None = None) -> str:
    """``name(arg: annotation = default, ...) -> return``, annotations as written in the
    source (string annotations, since the modules use ``from __future__ import annotations``)."""
    sig = inspect.signature(function)
    params = []
    for p in sig.parameters.values():
        text = p.name if p.annotation is inspect.Parameter.empty else f"{p.name}: {p.annotation}"
        params.append(text if p.default is inspect.Parameter.empty else f"{text} = {p.default!r}")
    returns = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
    return f"{name or function.__name__}({', '.join(params)}){returns}"


def sections(text: str, level: str) -> dict[str, str]:
    """Markdown sections at heading ``level`` (e.g. ``"###"``) by their backquoted title."""
    parts = re.split(rf"^{level} `([\w]+)`\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("hook", hookspecs.hook_names())
def test_every_hook_is_documented_under_its_exact_signature(hook):
    documented = sections(REFERENCE.read_text(encoding="utf-8"), "###")
    assert hook in documented, f"docs/hooks.md has no section '### `{hook}`'"
    function = getattr(hookspecs, hook)
    assert f"```python\n{signature(function)}\n```" in documented[hook]
    for parameter in inspect.signature(function).parameters:
        assert f"`{parameter}`" in documented[hook], f"parameter {parameter!r} of {hook} is not described"


def test_no_documented_hook_is_missing_from_the_hookspecs():
    text = REFERENCE.read_text(encoding="utf-8")
    documented = {name for name in sections(text, "###") if name.startswith("register_")}
    assert documented == set(hookspecs.hook_names())


def base_class_members():
    for cls in (Geometry, Conditioner, Synchronizer):
        for name, value in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                yield cls, f"{name} -> {inspect.signature(value.fget).return_annotation}"
            elif callable(value):
                yield cls, signature(value)


@pytest.mark.parametrize(("cls", "line"), list(base_class_members()), ids=lambda v: getattr(v, "__name__", v))
def test_every_base_class_method_is_documented_under_its_exact_signature(cls, line):
    documented = sections(REFERENCE.read_text(encoding="utf-8"), "###")
    assert f"`{line}`" in documented[cls.__name__], f"docs/hooks.md, {cls.__name__}: missing `{line}`"


def test_reference_states_the_current_plugin_api_version():
    text = REFERENCE.read_text(encoding="utf-8")
    assert f"Plugin API version: **{hookspecs.PLUGIN_API_VERSION}**" in text
    assert hookspecs.REQUIRES_ATTRIBUTE in text
