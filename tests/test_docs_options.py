"""The docs and the code agree: every command-line flag in docs/cli.md's synopsis is one its
command accepts, and every job option the docs write as ``key = value`` (a field of the job
or of its ``[model]`` table) is accepted by a job file with that value, kept as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jointdiff.cli import build_parser
from jointdiff.jobs.spec import Job, ModelSpec, tomllib

DOCS = Path(__file__).resolve().parents[1] / "docs"
BASE = {
    "model": {"id": "tiny", "device": "cpu"},
    "geometry": {"name": "strip", "length_px": 768},
    "conditioners": [{"name": "text", "prompt": "a lake"}],
    "steps": 4,
}


def synopsis() -> dict[str, set[str]]:
    """Command → the flags its synopsis (the first code block of docs/cli.md) names."""
    block = (DOCS / "cli.md").read_text(encoding="utf-8").split("```")[1]
    flags: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if not line.startswith(" "):  # a new command line (continuations are indented)
            command = words[1] if len(words) > 1 and words[0] == "jointdiff" and not words[1].startswith("-") else None
            words = words[2:]
        if command is not None:
            flags.setdefault(command, set()).update(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", " ".join(words)))
    return flags


def test_every_flag_of_the_synopsis_is_accepted():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    documented = synopsis()
    assert {"run", "generate", "sky", "plugins", "view"} <= set(documented)
    missing = [f"{cmd} {flag}" for cmd, flags in documented.items() for flag in flags
               if flag not in commands[cmd]._option_string_actions and flag not in parser._option_string_actions]
    assert not missing, f"docs/cli.md names flags the CLI does not take: {missing}"


def test_every_generate_flag_is_documented():
    """The other way round: no flag of generate is missing from the synopsis (as --windows was)."""
    parser = build_parser()
    generate = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    documented = synopsis()["generate"]
    long_flags = {s for a in generate._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    undocumented = sorted(flag for flag in long_flags if flag not in documented
                          and not any(other in documented for other in _aliases(generate, flag)))
    assert not undocumented, f"generate flags missing from docs/cli.md's synopsis: {undocumented}"


def _aliases(parser, flag):
    return parser._option_string_actions[flag].option_strings


THIRD_PARTY_EXAMPLES = {("family", "my-family")}
"""Values the docs show for a plugin a reader writes (models.md's example family)."""


def documented_assignments() -> list[tuple[str, str, object]]:
    """``(file, key, value)`` of every inline ``key = value`` in docs/*.md whose key is a job
    or ``[model]`` field and whose value is TOML."""
    fields = set(Job.model_fields) | set(ModelSpec.model_fields)
    found = []
    for path in sorted(DOCS.glob("*.md")):
        for key, raw in re.findall(r"`(\w+) = ([^`]+)`", path.read_text(encoding="utf-8")):
            if key not in fields:
                continue
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                continue  # a placeholder such as `steps = N`
            if (key, value) not in THIRD_PARTY_EXAMPLES:
                found.append((path.name, key, value))
    return sorted(set((f, k, repr(v), v) for f, k, v in found if not isinstance(v, (dict, list))), key=str)


@pytest.mark.parametrize("where, key, shown, value", documented_assignments(), ids=lambda x: str(x))
def test_every_documented_job_option_is_accepted(where, key, shown, value):
    data = {**BASE, "model": dict(BASE["model"])}
    if key in ModelSpec.model_fields and key not in Job.model_fields:
        data["model"][key] = value
        kept = Job.from_dict(data).to_dict()["model"].get(key)
    else:
        data[key] = value
        kept = Job.from_dict(data).to_dict().get(key)
    assert kept == value, f"{where}: `{key} = {shown}` is accepted but read as {kept!r}"


def test_the_documented_options_include_the_ones_that_disagreed():
    keys = {(key, value) for _, key, _, value in documented_assignments()}
    assert ("view_batch_size", "auto") in keys and ("scheduler", "lcm") in keys


def test_view_batch_size_auto_from_the_command_line(capsys):
    from jointdiff.cli import job_from_generate_args, main

    args = build_parser().parse_args(["generate", "x", "-g", "length_px=768", "--view-batch-size", "auto"])
    assert job_from_generate_args(args).view_batch_size == "auto"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--view-batch-size", "many"])
    assert exit_.value.code == 2
    assert "--view-batch-size: must be a whole number or auto, got 'many'" in capsys.readouterr().err


def documented_calls() -> list[tuple[str, str]]:
    """``(file, call)`` of every ``jointdiff COMMAND ...`` the docs and README show (inline
    code and command lines of code blocks)."""
    calls = []
    for path in [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]:
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"`(jointdiff [a-z]+[^`]*)`", text) + re.findall(r"^\s*(jointdiff [a-z]+.*)$", text, flags=re.M)
        calls += [(path.name, call) for call in found]
    return calls


def test_every_documented_call_uses_flags_its_command_takes():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    calls = [(where, call.split("#")[0].split()) for where, call in documented_calls()]
    calls = [(where, words) for where, words in calls if words[1] in commands]  # not prose ("jointdiff denoises ...")
    assert len(calls) > 20
    wrong = []
    for where, words in calls:
        accepted = commands[words[1]]._option_string_actions.keys() | parser._option_string_actions.keys()
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(words[2:])):
            if flag not in accepted:
                wrong.append(f"{where}: {' '.join(words)[:80]} ({flag})")
    assert not wrong, f"documented calls with flags their command does not take: {wrong}"
