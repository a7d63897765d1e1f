"""The package's layering (docs/architecture.md) as tests: a wrong-way import or an import cycle fails.

- the import-linter contracts in setup.cfg (layers, "models import no training/data/CLI code", "only
  the CLI imports the CLI", no cycles among the modules and subpackages of any package), run with
  ``lint-imports`` exactly as a developer runs it by hand;
- no import cycle between any two modules at all (grimp's graph, function-level imports included):
  this also catches a package's ``__init__`` and one of its own modules importing each other, which
  ``acyclic_siblings`` does not look at;
- the experiment files in ``configs/`` (not a package, so invisible to import-linter) import neither
  ``cli`` nor the layers that load them (``bench``, ``eval``).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import starflow2_jax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "starflow2_jax"
CONFIGS_MAY_NOT_IMPORT = ("starflow2_jax.cli", "starflow2_jax.bench", "starflow2_jax.eval")


def test_the_package_under_test_is_this_checkout():
    assert Path(starflow2_jax.__file__).resolve().parent == ROOT / PACKAGE


def test_import_linter_contracts():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.is_file():
        pytest.fail(f"{lint_imports} not found: install the test extra (pip install -e '.[test]'), "
                    "which pins import-linter")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([str(lint_imports), "--config", str(ROOT / "setup.cfg"), "--no-cache"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = result.stdout[result.stdout.find("Contracts"):] + result.stderr
    assert result.returncode == 0, f"import contracts broken (lint-imports exit {result.returncode}):\n{report}"
    assert "0 broken" in report and " kept" in report, report


def _cycles(adjacency: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(adjacency):
        if root in index:
            continue
        work = [(root, iter(adjacency[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(adjacency[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_cycle_finder_on_a_hand_built_graph():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["f"], "f": ["e"], "g": ["g2"], "g2": []}
    assert _cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    problems = []
    for component in _cycles(adjacency):
        first = component[0]
        back = next(m for m in component if first in adjacency[m])  # imports `first`, inside the cycle
        cycle = list(graph.find_shortest_chain(importer=first, imported=back) or (first,)) + [first]
        lines = []
        for importer, imported in zip(cycle, cycle[1:]):
            where = graph.get_import_details(importer=importer, imported=imported)
            lines.append(f"  {importer} -> {imported} (line {', '.join(str(d['line_number']) for d in where)})")
        problems.append(f"cycle among {component}, e.g.:\n" + "\n".join(lines))
    assert not problems, "import cycles in the package:\n" + "\n".join(problems)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement in the file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def test_config_files_do_not_import_the_cli():
    files = sorted((ROOT / "configs").glob("*.py"))
    assert files, f"no config files in {ROOT / 'configs'}"
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files
           for line, module in _imported_modules(path)
           if any(module == p or module.startswith(p + ".") for p in CONFIGS_MAY_NOT_IMPORT)]
    assert not bad, ("the files in configs/ import starflow2_jax.config_files and train's config schema, "
                     "never the layers that load them:\n" + "\n".join(bad))
    assert ("starflow2_jax.config_files.parse_preset" in
            {module for path in files for _, module in _imported_modules(path)})  # the scanner sees imports
