"""The package layout: imports point one way (down the layers below), nothing
imports another package's private names, and importing any module has no
process-wide side effect (warning filters, logging, files)."""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "onnxprune"

# lower layers never import higher ones; a unit is a top-level module or package
LAYERS = [
    {"errors"},
    {"io"},
    {"core"},
    {"rules", "report"},
    {"runtime"},
    {"torchbridge"},
    {"plan", "rewrite"},
    {"recover"},  # recovery computes weights; the rewriter writes them
    {"validate.checks", "validate.oracle", "validate"},  # the oracle takes a Job; it imports no pipeline
    {"pipeline"},
    {"api"},
    {"methods"},
    {"cli"},
    {"__main__", "__init__"},
]
LAYER = {u: i for i, units in enumerate(LAYERS) for u in units}


def _module(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _unit(parts: list[str]) -> str:
    if len(parts) == 1:
        return "__init__"
    if parts[1] == "validate" and len(parts) > 2:
        return f"validate.{parts[2]}"
    return parts[1]


def _module_edges():
    """(importing module, imported module, imported name, file, line, under TYPE_CHECKING) for every
    onnxprune import, lazy ones included; modules as lists of name parts."""
    for path in sorted(ROOT.rglob("*.py")):
        me = _module(path)
        pkg = me if path.name == "__init__.py" else me[:-1]
        tree = ast.parse(path.read_text())
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for b in n.body for x in ast.walk(b)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - node.level + 1] if node.level else []
                mod = base + (node.module.split(".") if node.module else [])
                if not mod or mod[0] != "onnxprune":
                    continue
                for a in node.names:
                    sub = mod + [a.name]
                    is_module = (ROOT.parent / pathlib.Path(*sub)).is_dir() or (ROOT.parent / pathlib.Path(*sub)).with_suffix(".py").exists()
                    yield me, sub if is_module else mod, a.name, path.name, node.lineno, id(node) in typing_only
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("onnxprune."):
                        yield me, a.name.split("."), "", path.name, node.lineno, id(node) in typing_only


def _imports():
    """(importing unit, imported unit, imported name, file, line) for every onnxprune import, lazy ones included."""
    for me, mod, name, f, line, _ in _module_edges():
        yield _unit(me), _unit(mod), name, f, line


def test_every_unit_has_a_layer():
    units = {u for u, *_ in _imports()} | {_unit(_module(p)) for p in ROOT.rglob("*.py")}
    assert units - set(LAYER) == set()


def test_imports_point_down_the_layers():
    up = sorted({f"{a} -> {b} ({f}:{line})" for a, b, _, f, line in _imports() if a != b and LAYER[a] <= LAYER[b]})
    assert up == []


def test_no_private_name_crosses_a_unit():
    leaks = sorted({f"{a} imports {name} from {b} ({f}:{line})" for a, b, name, f, line in _imports()
                    if a != b and name.startswith("_")})
    assert leaks == []


# third-party packages of the optional extras (export, finetune, plot): the only imports allowed to be missing
OPTIONAL = ("torch", "torchvision", "timm", "onnx2torch", "onnxscript", "matplotlib", "PIL")


def test_importing_everything_has_no_process_wide_side_effect(tmp_path):
    mods = sorted(".".join(_module(p)) for p in ROOT.rglob("*.py") if p.name != "__main__.py")
    code = f"""
import logging, warnings, os, importlib, importlib.util
for dep in ("numpy", "onnx", "onnx_ir", "onnxruntime", "torch", "torchvision", "timm", "onnx2torch", "onnxscript", "PIL"):
    try:  # third-party imports set their own filters: not ours to judge
        importlib.import_module(dep)
    except ImportError:
        pass
filters, handlers, level = list(warnings.filters), list(logging.getLogger().handlers), logging.getLogger().level
imported, skipped = [], []
for m in {mods!r}:
    try:
        importlib.import_module(m)
    except ModuleNotFoundError as e:  # only an optional extra that is really not installed may be missing
        top = (e.name or "").split(".")[0]
        if top not in {OPTIONAL!r} or importlib.util.find_spec(top) is not None:
            raise
        skipped.append(m)
        continue
    imported.append(m)
assert list(warnings.filters) == filters, "warning filters changed on import"
assert logging.getLogger().handlers == handlers and logging.getLogger().level == level, "root logging changed on import"
assert os.listdir(".") == [], os.listdir(".")
print("imported", len(imported), "skipped", skipped)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]  # any other import failure fails here
    installed = all(importlib.util.find_spec(d) is not None for d in OPTIONAL)
    # with every extra installed ([all]), every module imports; else only the ones a missing extra explains are skipped
    assert f"imported {len(mods)} skipped []" in r.stdout if installed else "imported" in r.stdout, r.stdout


def _module_imports() -> dict[str, set[str]]:
    """Module -> the onnxprune modules it imports (lazy imports included; imports
    under ``if TYPE_CHECKING:`` left out: they never run)."""
    edges: dict[str, set[str]] = {".".join(_module(p)): set() for p in ROOT.rglob("*.py")}
    for me, mod, _, _, _, typing_only in _module_edges():
        if not typing_only:
            edges[".".join(me)].add(".".join(mod))
    return edges


def test_no_module_imports_itself_through_others():
    edges = _module_imports()
    circles = set()
    for start in edges:
        stack, seen = [(start, (start,))], {start}
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start and len(path) > 1:
                    circles.add(" -> ".join(path + (start,)))
                elif nxt not in seen and nxt in edges:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    assert sorted(circles) == []


def test_every_command_module_declares_its_parser_and_run():
    """A command is the module onnxprune.cli.NAME: a docstring, ``NAME``, ``parser()`` whose prog is
    "onnxprune NAME" (the default command's: "onnxprune"), and ``run(args)``; the default
    command's help lists every other command."""
    from onnxprune.cli import COMMANDS, DEFAULT, command_module

    wrong = []
    for name in COMMANDS:
        mod = command_module(name)
        missing = [a for a in ("__doc__", "NAME", "parser", "run") if not getattr(mod, a, None)]
        if missing or mod.NAME != name:
            wrong.append(f"{name}: missing {missing}, NAME {getattr(mod, 'NAME', None)!r}")
            continue
        prog = "onnxprune" if name == DEFAULT else f"onnxprune {name}"
        if mod.parser().prog != prog:
            wrong.append(f"{name}: prog {mod.parser().prog!r}, not {prog!r}")
    assert wrong == []
    epilog = command_module(DEFAULT).parser().epilog
    assert [c for c in COMMANDS if c != DEFAULT and c not in epilog] == []


def test_a_command_is_added_in_the_registry_only():
    """Every module of cli/ but __init__ and common is a command listed in COMMANDS, and no module
    imports a command module by name (main reaches them through COMMANDS; what commands share
    lives in common): a new command is its module plus its name in COMMANDS."""
    from onnxprune.cli import COMMANDS

    modules = sorted(p.stem for p in (ROOT / "cli").glob("*.py") if p.stem not in ("__init__", "common"))
    assert modules == sorted(COMMANDS)
    by_name = sorted({f"{'.'.join(me)} imports {'.'.join(mod)} ({f}:{line})" for me, mod, _, f, line, _ in _module_edges()
                      if mod[:2] == ["onnxprune", "cli"] and mod[2:3] and mod[2] in COMMANDS})
    assert by_name == []


# edits of an onnx-ir model: where they may appear (io's load-time passes normalise a model
# as it is read; io.write swaps tensors for placeholders while serialising and puts them back)
EDITS = ("replace_input_with", "register_initializer", "insert_after", "insert_before", "resize_inputs",
         "resize_outputs", "replace_all_uses_with")
MAY_EDIT = {"rewrite.py", "io/passes.py", "io/read.py", "io/write.py"}


def test_only_the_rewriter_edits_a_model():
    """After loading, a model changes only through onnxprune.rewrite: no other module calls an
    IR editing method, assigns a value's tensor or a node's attribute, or deletes an initializer."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in MAY_EDIT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            what = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EDITS:
                what = node.func.attr
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Attribute) and t.attr == "const_value":
                        what = ".const_value ="
                    elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "attributes":
                        what = ".attributes[...] ="
            elif isinstance(node, ast.Delete) and any(isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute)
                                                      and t.value.attr == "initializers" for t in node.targets):
                what = "del .initializers[...]"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "pop" \
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "initializers":
                what = ".initializers.pop"
            if what:
                found.append(f"{rel}:{node.lineno} {what}")
    assert found == []


# what a command may import: the front door, the report's tables, the error type, its own
# room (cli.common), and methods (algorithms built on the API, e.g. GOHSP)
CLI_MAY_IMPORT = {"api", "report", "errors", "cli", "methods"}


def test_the_cli_goes_through_the_api():
    """The command line parses, calls onnxprune.api and prints: no command reaches past it
    into the pipeline, the plan, the rewriter, recovery, io or the runtime."""
    reached = sorted({f"{'.'.join(me)} -> {'.'.join(mod)} ({f}:{line})" for me, mod, _, f, line, _ in _module_edges()
                      if me[:2] == ["onnxprune", "cli"] and len(mod) > 1 and mod[1] not in CLI_MAY_IMPORT})
    assert reached == []


def test_api_prune_runs_the_stages_in_pipeline_order():
    """api.prune's body reaches the stages in the order of the pipeline: plan, oracle, rewrite,
    recover, write/validate, bench (read from the source: the calls' first appearance)."""
    import inspect

    from onnxprune import api

    src = inspect.getsource(api.prune)
    marks = ["resolve_plan(", "oracle(", "job.rewrite(", "job.recover(", "job.save(", "_bench_pruned("]
    where = [src.find(m) for m in marks]
    assert -1 not in where, dict(zip(marks, where))
    assert where == sorted(where), dict(zip(marks, where))
