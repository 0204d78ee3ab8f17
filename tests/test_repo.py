"""The promises the repository makes to a new user."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, "the test command in .ci/run differs from the README's"


def test_sample_data_ships_with_licence():
    lic = (ROOT / "covidlib" / "sample_data" / "LICENSE.md").read_text()
    assert "CC BY-NC-SA 4.0" in lic and "Soares" in lic


def _repository_url() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def test_the_repository_url_is_written_once_and_everything_agrees():
    """Setup cells, Colab badges, the book config and the citation all name pyproject's URL."""
    import json

    url = _repository_url()
    slug = url.removeprefix("https://github.com/")
    places = [ROOT / "README.md", ROOT / "_config.yml", ROOT / "CITATION.cff", *sorted((ROOT / "book").glob("*.md")),
              *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    seen = 0
    for path in places:
        text = path.read_text()
        for found in re.findall(r"github\.com/([\w.-]+/[\w.-]+)", text):
            assert found.removesuffix(".git") == slug, f"{path.name} names github.com/{found}, not {slug}"
            seen += 1
        for repo, badge in re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/([\w./-]+)", text):
            assert repo == slug and (ROOT / badge).exists(), f"{path.name}: Colab link to {repo}/{badge}"
            seen += 1
    assert seen >= 15  # not vacuous: badges, setup cells, book config, citation
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        setup = "".join(json.loads(nb.read_text())["cells"][1]["source"])
        assert f'"covidlib @ git+{url}"' in setup, f"{nb.name}: the setup cell installs from elsewhere"


def test_committed_notebooks_carry_no_outputs():
    """Outputs (and several MB of plotly.js) never reach git; nbstripout's pre-commit hook strips them."""
    import json
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "notebooks/*.ipynb"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()  # book/results: the published study, outputs kept
    assert len(tracked) >= 5
    for name in tracked:
        nb = json.loads((ROOT / name).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name} has outputs"
        ids = [cell.get("id") for cell in nb["cells"]]  # nbformat 4.5: a missing id will become an error
        assert None not in ids and len(set(ids)) == len(ids), f"{name}: cells without a unique id"
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    assert "nbstripout" in hooks


def _all_parsers():
    import argparse

    from covidlib.cli import build_parser

    todo = [build_parser()]
    while todo:
        parser = todo.pop()
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())


def test_every_flag_says_what_it_does_and_lists_its_valid_values():
    import argparse

    from covidlib.models.architectures import ARCHITECTURES, LOSSES, MODES
    from covidlib.vocabulary import SPLIT_KINDS

    for parser in _all_parsers():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction | argparse._VersionAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help text"
    helps = {p.prog: p.format_help() for p in _all_parsers()}
    for prog, flag, valid in [("covidlib train", "--arch", ARCHITECTURES), ("covidlib train", "--mode", MODES),
                              ("covidlib train", "--loss", LOSSES), ("covidlib train", "--split-kind", SPLIT_KINDS),
                              ("covidlib study", "--archs", ARCHITECTURES), ("covidlib study", "--splits", SPLIT_KINDS)]:
        text = " ".join(helps[prog].split())
        assert flag in text and all(v in text for v in valid), f"{prog} --help does not list every {flag}"


# --- the house (ARCHITECTURE.md): floors, no circle, readable sizes --------------------------

_FLOORS = {"vocabulary": 0, "paths": 0, "metrics": 0, "plots": 0, "_quiet": 0, "runtime": 0, "data": 1, "models": 2,
           "evaluate": 3, "explain": 4, "study": 5, "notebook": 6, "cli": 6}


def _covidlib_imports() -> dict[str, set[str]]:
    """Module -> the covidlib modules it imports (anywhere in it, top level or local)."""
    import ast

    graph = {}
    for path in sorted((ROOT / "covidlib").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("covidlib"):
                base = node.module
                for alias in node.names:  # `from covidlib.study import notebooks` imports a module
                    candidate = f"{base}.{alias.name}"
                    sub = ROOT / Path(*candidate.split("."))
                    found.add(candidate if sub.with_suffix(".py").exists() or sub.is_dir() else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("covidlib"))
        graph[name] = found - {name, "covidlib"}
    return graph


def _floor(module: str) -> int:
    parts = module.split(".")
    return _FLOORS[parts[1]] if len(parts) > 1 else 0


def test_every_import_goes_down_a_floor_or_stays_in_its_package():
    upward = [f"{m} -> {d}" for m, deps in _covidlib_imports().items() for d in deps
              if _floor(d) > _floor(m) and d.split(".")[:2] != m.split(".")[:2]]
    assert not upward, upward


def test_the_import_graph_has_no_circle():
    graph = _covidlib_imports()
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError(" -> ".join(path[path.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        state[node] = 2

    for module in graph:
        visit(module, [])


def test_modules_and_functions_are_short_enough_to_read_at_once():
    import ast

    long_modules, long_functions = [], []
    for path in sorted((ROOT / "covidlib").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 420:
            long_modules.append(f"{path.relative_to(ROOT)} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 62:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long_modules and not long_functions, (long_modules, long_functions)
