"""Imports run down the lifecycle: the layering table in docs/architecture.md is the rule, and
every import in llm_assets/ and resources/ (lazy ones inside functions included) obeys it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from llm_assets.settings import PROJECT_ROOT

PACKAGES = ("llm_assets", "resources")


def layers() -> dict[str, int]:
    """Component -> its row in the docs' layering table, 0 for the top row."""
    text = (PROJECT_ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Layering", 1)[1].split("\n\n")[2]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    return {name: rank for rank, row in enumerate(rows) for name in re.findall(r"`(\w+)`", row.split("|")[2])}


def component(module: str) -> str:
    """llm_assets.data.cleaning -> data; resources.handles -> resources; llm_assets -> llm_assets."""
    parts = module.split(".")
    return parts[0] if parts[0] == "resources" or len(parts) == 1 else parts[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's own packages in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def sources() -> list[tuple[str, Path]]:
    return [(".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts), path)
            for package in PACKAGES for path in sorted((PROJECT_ROOT / package).rglob("*.py"))]


def test_every_component_has_a_row_in_the_table():
    rank = layers()
    known = {component(module) for module, _ in sources()} - {"llm_assets", "__init__"}
    assert known - set(rank) == set(), "add these to the layering table in docs/architecture.md"
    assert set(rank) - known == set(), "the layering table names what does not exist"


def test_no_import_runs_up_the_lifecycle():
    rank = layers()
    upward = [f"{path.relative_to(PROJECT_ROOT)}:{line}: {component(module)} imports {target}"
              for module, path in sources() if component(module) in rank
              for line, target in imports(path)
              if component(target) in rank and rank[component(target)] < rank[component(module)]]
    assert upward == []


def test_the_libraries_layer_imports_no_dagster():
    """The training and quantization workers import these; the quantization environment has no Dagster."""
    rank = layers()
    bottom = max(rank.values())
    dagster = [f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}"
               for module, path in sources() if rank.get(component(module)) == bottom
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Import | ast.ImportFrom)
               and any(n.split(".")[0] == "dagster" for n in
                       ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]))]
    assert dagster == []


# What only a step's work needs. Loading the definitions (the CLI, `dagster dev`, the daemon's code
# server, every run's process) must not import them: it took 9 s on 2 cores, 2.3 s without them.
ML_LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "lm_eval", "mlflow", "accelerate")


def test_the_definitions_and_the_cli_load_without_the_ml_libraries() -> None:
    probe = ("import sys, llm_assets.definitions, llm_assets.cli; "
             f"print(' '.join(name for name in {ML_LIBRARIES!r} if name in sys.modules))")
    probed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert probed.returncode == 0, probed.stderr[-3000:]
    loaded = probed.stdout.split()
    assert loaded == [], (f"importing the definitions loads {loaded}: import the module that needs it inside "
                          "the step (python -X importtime -c 'import llm_assets.definitions' shows who imports it)")
