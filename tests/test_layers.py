"""The house rules, as properties of the code: layers import downwards only and no module imports itself back, the
core loads no family, task or model, no function outgrows a screen, and the CLI's help is made from the registries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "upop"
MAX_LINES = 60
# argument-parser tables: one add_argument per flag, nothing else
PARSER_TABLES = {("cli/flags.py", name) for name in ("_common", "_task_flags", "_search_flags", "_recipe_flags")}


def test_no_module_imports_itself_back_through_others():
    import grimp

    graph = grimp.build_graph("upop")
    cycles = [
        (module, imported)
        for module in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.find_shortest_chain(importer=imported, imported=module)
    ]
    assert cycles == []


@pytest.mark.e2e
def test_the_layer_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], capture_output=True, text=True, cwd=SRC.parents[1])
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.e2e
def test_importing_the_core_loads_no_family_task_model_or_job():
    code = (
        "import sys, upop.core.pruner, upop.core.plan, upop.core.config; "
        "print(sorted(m for m in sys.modules if m.startswith(('upop.', 'timm', 'transformers', 'open_clip'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = eval(loaded)  # a printed list of module names
    assert all(m == "upop" or m.startswith(("upop.core", "upop.utils", "upop.errors")) for m in modules), modules


def _functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(SRC).as_posix(), node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen_except_the_argument_tables():
    long = [(f, name, n) for f, name, n in _functions() if n > MAX_LINES and (f, name) not in PARSER_TABLES]
    assert long == []
    tables = {(f, name) for f, name, _ in _functions()}
    assert PARSER_TABLES <= tables  # the exemptions name functions that exist


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at hyphens otherwise ("vit-" / "micro")


def _help(capsys, command: str | None = None) -> str:
    """The help text of ``upop`` or of one of its commands, as ``upop [command] --help`` prints it."""
    from upop.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"] if command else ["--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.e2e
def test_help_lists_every_registered_task_metric_model_and_family(capsys):
    from upop.adapters import registered_adapters
    from upop.models import registered_families
    from upop.tasks import registered_tasks

    text = _help(capsys, "compress")
    for name, cls in registered_tasks().items():
        assert f"{name} ({cls.main_metric})" in text
    for family in registered_families().values():
        for _, spec, _ in family.usage:
            assert spec in text, spec
    top = _help(capsys)
    assert "vision-language" in top
    for adapter in registered_adapters().values():
        assert adapter.name in top


@pytest.fixture
def extra_task():
    from upop.tasks import base
    from upop.tasks.classification import Classification

    class Counting(Classification):
        name, main_metric = "counting", "top1"

    base.register_task(Counting)
    yield Counting
    del base._TASKS["counting"]


@pytest.mark.e2e
def test_a_newly_registered_task_shows_in_the_help_and_is_accepted(extra_task, capsys):
    from upop.jobs.common import RunConfig
    from upop.tasks import task_class

    assert "counting (top1)" in _help(capsys, "train")
    assert task_class(RunConfig(task="counting").task) is extra_task
