"""The floor plan, checked from the source: dags -> cxr -> {transforms, inference, expectations} -> lakehouse.

Every import statement counts, function-level ones too (a heavy import deferred into a function still
makes the lower floor depend on the upper one). Parsed with ``ast``: nothing is imported to check it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dags", "cxr", "transforms", "inference", "expectations", "lakehouse")
#: what each floor may import from the project (besides itself)
ALLOWED = {
    "lakehouse": set(),
    "transforms": {"lakehouse"},
    "inference": {"lakehouse"},  # no transforms/: the inference image ships without it
    "expectations": {"lakehouse"},
    "cxr": {"transforms", "inference", "expectations", "lakehouse"},
    "dags": {"cxr", "lakehouse"},
}
#: the only modules the DAG file may import from the project
DAG_IMPORTS = {"cxr", "cxr.tasks", "cxr.operators", "lakehouse.config"}
#: the one module that may talk to S3 through boto3
STORAGE = "lakehouse.storage"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str) -> Iterator[str]:
    """Every module an import statement in ``source`` names (absolute; relative ones resolved)."""
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield name
            # `from cxr import tasks` imports the module cxr.tasks
            yield from (f"{name}.{alias.name}" for alias in node.names if alias.name != "*")


def project_modules() -> dict[str, str]:
    """Module name -> source of every Python file of the product packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path.read_text()
    return out


def floor_violations(modules: dict[str, str]) -> list[str]:
    """Imports that run up (or sideways) the floor plan, and boto3/botocore outside the storage module."""
    problems = []
    for module, source in modules.items():
        floor = module.split(".")[0]
        for imported in imports_of(source, module):
            top = imported.split(".")[0]
            if top in ALLOWED and top != floor and top not in ALLOWED[floor]:
                problems.append(f"{module} imports {imported} ({floor} may import only {sorted(ALLOWED[floor])})")
            # `from lakehouse.config import load_settings` also yields lakehouse.config.load_settings: a name in it
            allowed_in_dag = imported in DAG_IMPORTS or imported.rsplit(".", 1)[0] in DAG_IMPORTS - {"cxr"}
            if floor == "dags" and top in ALLOWED and top != "dags" and not allowed_in_dag:
                problems.append(f"{module} imports {imported}: the DAG wires cxr.tasks/cxr.operators only")
            if top in ("boto3", "botocore") and module != STORAGE:
                problems.append(f"{module} imports {imported}: S3 access belongs in {STORAGE}")
    return sorted(set(problems))


def import_cycles(modules: dict[str, str]) -> list[list[str]]:
    """Cycles in the project's module import graph (function-level imports included)."""
    graph = {
        m: {i for i in imports_of(src, m) if i in modules and i != m and not m.startswith(f"{i}.")}
        for m, src in modules.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_every_floor_imports_only_the_floors_below_it() -> None:
    modules = project_modules()
    assert {"cxr.cli", "cxr.tasks", "cxr.operators", "cxr.local_run", "cxr.report", "cxr.sql"} <= set(modules)
    assert floor_violations(modules) == []


def test_no_import_cycle() -> None:
    assert import_cycles(project_modules()) == []


def test_the_checks_catch_what_they_are_for() -> None:
    """The checker itself: an upward import, a deferred one, boto3 outside storage, a loop are all found."""
    bad = {
        "lakehouse.spark": "def f():\n    from transforms.preprocess import run_preprocess\n",
        "lakehouse.runs": "import boto3\n",
        "inference.job": "from transforms import tensor\n",
        "transforms.preprocess": "from lakehouse import spark\n",
        "dags.pipeline": "from cxr import report\nfrom lakehouse.config import load_settings\n",
        "lakehouse.config": "from .tables import TensorDtype\n",
        "lakehouse.tables": "from lakehouse import config\n",
    }
    problems = floor_violations(bad)
    assert any(p.startswith("lakehouse.spark imports transforms.preprocess") for p in problems)
    assert any(p.startswith("lakehouse.runs imports boto3") for p in problems)
    assert any(p.startswith("inference.job imports transforms") for p in problems)
    assert any(p.startswith("dags.pipeline imports cxr.report") for p in problems)
    assert not any(p.startswith("dags.pipeline imports lakehouse.config") for p in problems)
    assert not any(p.startswith("transforms.preprocess") for p in problems)
    cycles = import_cycles(bad)
    assert ["lakehouse.config", "lakehouse.tables", "lakehouse.config"] in cycles


def test_no_stray_environment_reads() -> None:
    """``CXR_*`` variables are read in lakehouse/config.py only (other modules may name them in messages)."""
    # a read by name, or a scan of the environment by prefix
    pattern = re.compile(r"""(?:environ(?:\.get)?\s*[\[(]|getenv\(|startswith\(\(?)\s*f?["']CXR_""")
    assert pattern.search('x = os.environ.get("CXR_FOO", "1")') and pattern.search("os.environ['CXR_FOO']")
    assert pattern.search('{k: v for k, v in os.environ.items() if k.startswith(("CXR_S3_", "AWS_"))}')
    readers = [name for name, source in project_modules().items() if pattern.search(source)]
    assert readers == [], f"{readers} read CXR_* variables themselves: add them to lakehouse/config.py"
