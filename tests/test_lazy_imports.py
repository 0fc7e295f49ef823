"""Validating a job imports no model library: errors a user can cause arrive in well under a
second (``import torch`` alone takes over a second), and torch is imported only when a job runs.

Two checks: in a fresh interpreter, validating jobs (the Python API and the CLI) leaves torch,
diffusers and transformers out of ``sys.modules``; and statically, every module imported while
validating uses the names it imports only under ``TYPE_CHECKING`` (torch, numpy, PIL, ...)
in annotations or after a local import, so deferring an import cannot hide a NameError.
Speed itself is measured in benchmarks, not here (see docs/cli.md).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "panorama_tiny.toml"
MODEL_LIBRARIES = ("torch", "diffusers", "transformers")

PROBE = """
import json, sys, traceback

first = {}


class Witness:
    \"\"\"Notes who imports a model library first (for the failure message).\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name in %r and name not in first:
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            first[name] = [f"{f.filename}:{f.lineno} {f.line}" for f in frames[-4:]]
        return None


sys.meta_path.insert(0, Witness())
from jointdiff.utils.errors import ConfigError
from jointdiff.jobs.spec import Job
from jointdiff.core.registry import get_registry

outcomes = {}
for path in sys.argv[1:]:
    try:
        Job.from_toml(path)
        outcomes[path] = "ok"
    except ConfigError as error:
        outcomes[path] = str(error)
registry = get_registry()
print(json.dumps({
    "outcomes": outcomes,
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(%r)),
    "first": first,
    "failures": registry.failures,
    "modules": sorted(
        (name, module.__file__) for name, module in list(sys.modules.items())
        if name.split(".")[0] in ("jointdiff", "jointdiff_plugins") and getattr(module, "__file__", None)
    ),
}))
""" % (MODEL_LIBRARIES, MODEL_LIBRARIES)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _probe(*jobs: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, jobs)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _write_jobs(tmp_path: Path) -> dict[str, Path]:
    """The panorama example, its ``length_px`` misspelled, and jobs that fail late in validation
    (a window size against the family's latent format, a scheduler of the wrong family)."""
    text = EXAMPLE.read_text(encoding="utf-8").replace('"../out/panorama.png"', '"out.png"')
    jobs = {
        "ok": text,
        "typo": text.replace("length_px", "lenght_px"),
        "window": text.replace("window_latent = 64", "window_latent = 63").replace('id = "tiny"', 'id = "tiny-flux"')
        .replace('scheduler = "ddim"', "").replace('negative_prompt = "blurry"', ""),
        "scheduler": text.replace('id = "tiny"', 'id = "tiny-flux"'),
        "device": text.replace('device = "auto"', 'device = "gpu0"'),
    }
    paths = {}
    for name, body in jobs.items():
        paths[name] = tmp_path / f"{name}.toml"
        paths[name].write_text(body, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[dict, dict[str, Path]]:
    jobs = _write_jobs(tmp_path_factory.mktemp("jobs"))
    return _probe(*jobs.values()), jobs


def test_validating_jobs_imports_no_model_library(probe):
    result, jobs = probe
    outcomes = {name: result["outcomes"][str(path)] for name, path in jobs.items()}
    assert outcomes["ok"] == "ok"
    assert "unknown option 'lenght_px'" in outcomes["typo"]
    assert "window_latent = 63" in outcomes["window"]
    assert "scheduler must be one of" in outcomes["scheduler"] and "'flux'" in outcomes["scheduler"]
    assert "device must be" in outcomes["device"]
    assert result["failures"] == {}, "every plugin loads (validation covers them all)"
    assert result["loaded"] == [], f"validating a job imported {result['loaded']}, first from: {result['first']}"


def test_cli_error_imports_no_model_library(tmp_path):
    """``jointdiff run`` with a misspelled option: one line, status 2, no model library."""
    bad = _write_jobs(tmp_path)["typo"]
    code = (
        "import sys\nfrom jointdiff.cli import main\nrc = main(['run', sys.argv[1]])\n"
        f"print(rc, sorted({{m.split('.')[0] for m in sys.modules}} & set({MODEL_LIBRARIES!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
    assert done.stderr.startswith("jointdiff: error: 'strip': unknown option 'lenght_px'"), done.stderr


# -- static check: names imported for type checking only are not used at run time -----------


def _type_checking_names(tree: ast.Module) -> set[str]:
    """Names bound only inside ``if TYPE_CHECKING:`` at module level."""
    only, runtime = set(), set()
    for node in tree.body:
        is_tc = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node) if is_tc else [node]:
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                (only if is_tc else runtime).update(a.asname or a.name.split(".")[0] for a in sub.names)
        if not is_tc:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    runtime.add(sub.id)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                runtime.add(node.name)
    return only - runtime


def _loads(node: ast.AST, names: set[str], skip_defs: bool) -> list[tuple[str, int]]:
    """Run-time loads of ``names`` under ``node``: annotations are skipped (strings under
    ``from __future__ import annotations``), and with ``skip_defs`` so are function bodies."""
    found = []

    def visit(n: ast.AST) -> None:
        if isinstance(n, ast.Name) and n.id in names and isinstance(n.ctx, ast.Load):
            found.append((n.id, n.lineno))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for item in [*n.decorator_list, *n.args.defaults, *[d for d in n.args.kw_defaults if d]]:
                visit(item)
            if not skip_defs:
                for stmt in n.body:
                    visit(stmt)
            return
        for field, value in ast.iter_fields(n):
            if field in ("annotation", "returns"):
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ast.AST):
                    visit(item)

    visit(node)
    return found


def _function_problems(fn: ast.AST, names: set[str]) -> list[tuple[str, int]]:
    """Loads of ``names`` in ``fn`` that nothing inside ``fn`` binds (an import or assignment)."""
    imported = {
        a.asname or a.name.split(".")[0]
        for sub in ast.walk(fn) if isinstance(sub, (ast.Import, ast.ImportFrom)) for a in sub.names
    } | {sub.id for sub in ast.walk(fn) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store)}
    body_loads = [hit for stmt in fn.body for hit in _loads(stmt, names, skip_defs=False)]
    return [(name, line) for name, line in body_loads if name not in imported]


def deferred_import_problems(path: Path) -> list[str]:
    """``file:line name`` for every run-time use of a name imported only under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = _type_checking_names(tree)
    problems = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                problems.extend(_loads(node, names, skip_defs=True))
                problems.extend(_function_problems(node, names))
            elif isinstance(node, ast.ClassDef):
                for item in [*node.bases, *node.keywords, *node.decorator_list]:
                    problems.extend(_loads(item, names, skip_defs=True))
                walk(node.body)
            elif not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
                problems.extend(_loads(node, names, skip_defs=True))

    walk(tree.body)
    return [f"{path.relative_to(ROOT)}:{line} {name}" for name, line in problems]


def test_validation_modules_use_deferred_imports_only_after_importing_them(probe):
    result, _ = probe
    files = {name: Path(file) for name, file in result["modules"]}
    assert {"jointdiff.core.geometry", "jointdiff.models.families.flux", "jointdiff_plugins.sphere"} <= set(files)
    problems = [p for name, file in sorted(files.items()) for p in deferred_import_problems(file)]
    assert problems == [], "names imported under TYPE_CHECKING used at run time without a local import"
