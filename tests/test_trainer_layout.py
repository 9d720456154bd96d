"""The trainer's shape: no import cycles, tables that are the only place knowing their entries, and
extensions (the toy world among them) that register through the public functions."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trainer"


def _modules() -> dict[str, Path]:
    """Every module of the trainer package by dotted name (``trainer.stages.train``; packages by their name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Trainer modules ``name`` imports anywhere (module level and inside functions; not under TYPE_CHECKING).

    ``from pkg import sub`` is an edge to the submodule; ``from pkg import NAME`` (not a submodule) and
    ``import pkg`` are edges to the package itself, also from inside it; the packages that importing a
    module initialises on the way count as edges unless they contain ``name`` (Python initialises a
    module's own packages first, whatever it imports).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    explicit: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            explicit |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules}
            explicit |= subs
            if len(subs) < len(node.names):
                explicit.add(mod)
    out = set()
    own_chain = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    for t in explicit:
        if not t.startswith("trainer"):
            continue
        while t and t not in modules:
            t = t.rpartition(".")[0]
        out.add(t)
        parts = t.split(".")
        for i in range(1, len(parts)):  # importing a.b.c initialises a and a.b first
            m = ".".join(parts[:i])
            if m in modules and m not in own_chain:
                out.add(m)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    assert len(graph) > 40 and graph["trainer.cli"] >= {"trainer.commands"}, "the analysis found the modules"
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    """The analysis itself: a lazy import inside a function closes a cycle too."""
    graph = _graph()
    graph["trainer.core.errors"] = graph["trainer.core.errors"] | {"trainer.cli"}
    assert any("trainer.cli" in c and "trainer.core.errors" in c for c in _cycles(graph))


def test_no_command_imports_the_cli_and_lower_layers_import_no_commands():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("trainer.commands"):
            assert "trainer.cli" not in deps, name
        if name.startswith(("trainer.core", "trainer.families", "trainer.evaluation", "trainer.recipes")):
            assert not any(d.startswith("trainer.commands") for d in deps), (name, deps)
        if not name.startswith(("trainer.toy", "trainer.commands.demo")):
            assert not any(d.startswith("trainer.toy") for d in deps), f"{name} imports the toy world: {deps}"


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint(len(sys.argv) - 1)"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(len(names))


def _string_comparisons(path: Path) -> set[str]:
    """String constants compared with ``==``/``!=``/``in``/``not in`` anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found |= {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return found


@pytest.mark.parametrize("table_module, names, exempt", [
    # the demo's benchmark rows are named after what they train (its `deviate` variant), not looked up by objective
    ("trainer/stages/objectives.py", ("anchor", "deviate", "distill", "flow"), ("trainer/commands/demo.py",)),
    ("trainer/evaluation/scorers.py", ("nudenet", "clip", "toy"), ()),
])
def test_each_table_is_the_only_place_that_compares_its_names(table_module, names, exempt):
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == table_module or rel in exempt or rel.startswith("trainer/toy/"):
            continue
        hits = _string_comparisons(path) & set(names)
        if hits:
            offenders[rel] = sorted(hits)
    assert offenders == {}


def test_the_objectives_table_drives_the_config_and_the_checks():
    from trainer.core.config import TrainConfig, init_std
    from trainer.core.errors import UsageError
    from trainer.stages import objectives

    rules = {f.name: f.metadata.get("rule") for f in dataclasses.fields(TrainConfig)}
    assert rules["unlearn"].choices == ("anchor", "deviate", "none")
    assert rules["preserve"].choices == ("distill", "flow", "none")
    assert objectives.needs("anchor", "flow") == {"unsafe", "anchors", "images"}
    assert objectives.needs("deviate", "none") == {"unsafe"}
    assert init_std(TrainConfig(unlearn="deviate")) == 0.1 and init_std(TrainConfig()) == 0.0
    with pytest.raises(UsageError, match="'train.unlearn': 'forget' is not one of anchor, deviate, none"):
        TrainConfig(unlearn="forget")


def test_the_command_table_is_what_the_cli_offers():
    from trainer.cli import build_parser
    from trainer.commands import COMMANDS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == ["demo", "build", "collect", "select", "train", "evaluate", "generate", "convert",
                                 "inspect", "recipes"]
    assert len(COMMANDS) == len(sub.choices)
    only = build_parser(commands=[m for m in COMMANDS if m.__name__.endswith(".inspect")])
    assert list(next(a for a in only._actions if a.dest == "command").choices) == ["inspect"]


def test_a_user_extension_registers_a_model_and_a_scorer(tiny_flux, tmp_path, monkeypatch):
    """An extension named in SAFEROPE_TRAINER_EXTENSIONS is loaded like the toy world: its model name and scorer work."""
    import trainer.extensions as extensions
    from trainer.evaluation import scorers
    from trainer.families import models

    (tmp_path / "my_extension.py").write_text(
        "from trainer.evaluation.scorers import LabelScorer, register_scorer\n"
        "from trainer.families.models import register_model\n"
        f"def setup():\n    register_model('mine', {str(tiny_flux)!r})\n"
        "    register_scorer('always-red', lambda ctx: LabelScorer('always-red', lambda im: {'colour': 'red'},"
        " {'colour': 'red'}), auto=lambda ctx: ctx.model == 'mine')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(extensions.ENV, "my_extension:setup, not_a_module_anywhere")
    monkeypatch.setattr(extensions, "_loaded", {})
    monkeypatch.setattr(models, "NAMED_MODELS", {})
    monkeypatch.setattr(scorers, "SCORERS", dict(scorers.SCORERS))
    assert models.resolve_model("mine").path == tiny_flux
    names = [s.name for s in scorers.make_scorers(["auto"], scorers.ScorerContext(model="mine"))]
    assert "always-red" in names
    assert "not_a_module_anywhere" in extensions.failures()
    assert "toy" in scorers.scorer_names() and models.resolve_model("toy").name == "toy"  # the shipped extension
