"""The package layout keeps its promises (docs/architecture.md):

- the import contracts of ``pyproject.toml`` hold (import-linter: layers, the core never
  imports a plugin, nothing imports the CLI, no cycles between sibling modules);
- no import cycle anywhere, counting every import the code runs (module level or inside a
  function; ``if TYPE_CHECKING:`` blocks left out);
- a function-local import of a jointdiff module says why it is lazy (``# lazy: ...``);
- ``jointdiff/`` has at most 12 entries, and every module is in the architecture table;
- the old module paths still import, as the new modules, with a DeprecationWarning;
- plugin authors find everything in ``jointdiff.plugin``: the guide, the hook reference and the
  template package use nothing else.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

import jointdiff.plugin
from jointdiff.utils.moved import MOVED

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jointdiff", "jointdiff_plugins")
MAX_TOP_LEVEL = 12


def source_modules() -> dict[str, Path]:
    """Every module of jointdiff and the built-in plugins, by dotted name."""
    found = {}
    for base in (ROOT, ROOT / "plugins"):
        for path in base.glob("jointdiff*/**/*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def test_import_contracts_hold():
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command(['--no-cache']))"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1 (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_strongly_connected_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_function_level_imports():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    edges = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    assert strongly_connected(edges) == []
    assert not [m for m in edges if m.startswith("jointdiff.") or m == "jointdiff"
                for other in edges[m] if other.startswith("jointdiff_plugins")]


def function_local_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, source line)`` of every import of a jointdiff module inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name.split(".")[0] in PACKAGES for name in names):
                statement = lines[node.lineno - 2: node.end_lineno]  # the comment may be on the line above
                found.append((node.lineno, "\n".join(statement)))
    return found


def test_function_local_imports_say_why_they_are_lazy():
    unexplained = [
        f"{path.relative_to(ROOT)}:{line}: {text.strip().splitlines()[-1]}"
        for path in source_modules().values()
        for line, text in function_local_imports(path)
        if "# lazy:" not in text
    ]
    assert not unexplained, "function-local imports without a '# lazy: why' comment:\n" + "\n".join(unexplained)


def test_jointdiff_has_at_most_twelve_entries():
    entries = [p.name for p in (ROOT / "jointdiff").iterdir()
               if p.name not in ("__init__.py", "py.typed", "__pycache__")]
    assert len(entries) <= MAX_TOP_LEVEL, sorted(entries)


def architecture_rows() -> dict[str, str]:
    """The layout table of docs/architecture.md: first cell (a package path) → the row."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`(jointdiff/[\w/]*|jointdiff/[\w]+\.py|plugins/jointdiff_plugins/)`\s*\|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_every_module_is_in_the_architecture_table():
    rows = architecture_rows()
    missing = []
    for name, path in source_modules().items():
        relative = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" and name.count(".") == 0:
            continue
        package = relative.rsplit("/", 1)[0] + "/"
        stem = path.stem if path.name != "__init__.py" else None
        top = "/".join(relative.split("/")[:2]) + ("/" if relative.count("/") > 1 else "")
        row = rows.get(package) or rows.get(top) or rows.get(relative)
        if row is None or (stem is not None and f"`{stem}`" not in row and relative not in rows):
            missing.append(relative)
    assert not missing, "modules missing from docs/architecture.md's layout table: " + ", ".join(sorted(missing))


def test_old_module_paths_import_the_new_modules_with_a_warning():
    code = """
import importlib, sys, warnings
from jointdiff.utils.moved import MOVED
bad = []
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    if module is not importlib.import_module(new):
        bad.append(f"{old} is not {new}")
    if not any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught):
        bad.append(f"{old}: no DeprecationWarning naming {new}")
for package, name, home in [("jointdiff.models", "make_scheduler", "jointdiff.models.loading"),
                            ("jointdiff.engine", "Denoiser", "jointdiff.engine.loop")]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(importlib.import_module(package), name)
    if value is not getattr(importlib.import_module(home), name):
        bad.append(f"{package}.{name} is not {home}.{name}")
    if not any(issubclass(w.category, DeprecationWarning) and home in str(w.message) for w in caught):
        bad.append(f"{package}.{name}: no DeprecationWarning naming {home}")
print("\\n".join(bad))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == ""
    assert len(MOVED) >= 40


def jointdiff_imports(source: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from jointdiff... import`` and ``import jointdiff...``."""
    found = []
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a block of signatures, not code: its import lines alone
        tree = ast.parse("\n".join(line.strip() for line in source.splitlines()
                                   if line.strip().startswith(("from jointdiff", "import jointdiff"))))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jointdiff":
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "jointdiff"]
    return found


def plugin_author_sources() -> dict[str, str]:
    """The template package's Python files and every Python block of the plugin docs."""
    sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
               for p in (ROOT / "examples" / "jointdiff-ring").rglob("*.py")}
    for doc in ("plugins.md", "hooks.md"):
        text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            sources[f"docs/{doc}[{i}]"] = textwrap.dedent(block)
    return sources


USER_API = {"Job", "JointDiffusion", "create", "load_model", "load_pipeline", "run_job"}
"""What a plugin's own tests may take from ``jointdiff`` itself: running a job."""


def test_plugin_authors_import_only_from_jointdiff_plugin():
    wrong = []
    for where, source in plugin_author_sources().items():
        for module, names in jointdiff_imports(source):
            if module == "jointdiff.plugin":
                wrong += [f"{where}: jointdiff.plugin has no {name!r}" for name in names
                          if not hasattr(jointdiff.plugin, name)]
            elif not (module == "jointdiff" and set(names) <= USER_API):
                wrong.append(f"{where}: imports {module} {names}; plugin authors import from jointdiff.plugin")
    assert not wrong, "\n".join(wrong)


def test_names_the_plugin_docs_give_exist_in_jointdiff_plugin():
    text = "".join((ROOT / "docs" / doc).read_text(encoding="utf-8") for doc in ("plugins.md", "hooks.md"))
    named = set(re.findall(r"jointdiff\.plugin\.(\w+)", text))
    assert named, "the docs name jointdiff.plugin's contents"
    assert sorted(name for name in named if not hasattr(jointdiff.plugin, name)) == []
    assert set(jointdiff.plugin.__all__) == {n for n in jointdiff.plugin.__all__ if hasattr(jointdiff.plugin, n)}


@pytest.mark.parametrize("name", ["hookimpl", "Geometry", "PluginOptions", "ConfigError", "LatentFormat",
                                  "GeometryConformance"])
def test_the_plugin_surface_is_the_real_thing(name):
    """Names in jointdiff.plugin are the objects the engine uses, not copies."""
    homes = {"hookimpl": "jointdiff.core.hookspecs", "Geometry": "jointdiff.core.geometry",
             "PluginOptions": "jointdiff.core.options", "ConfigError": "jointdiff.utils.errors",
             "LatentFormat": "jointdiff.core.family", "GeometryConformance": "jointdiff.testing"}
    module = __import__(homes[name], fromlist=[name])
    assert getattr(jointdiff.plugin, name) is getattr(module, name)
