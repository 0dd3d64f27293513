"""Layers: a package never imports one above it (README, "Layers").

``extractors/``, ``training/`` and ``schemas/`` are plain code: no prefect, no duckdb, and nothing
from ``flows`` (orchestration) or ``warehouse`` (storage); ``schemas/`` also nothing from the
code that fills its tables. ``warehouse/`` does not import prefect or ``flows``, and ``radchain/``
(its shipped test doubles in ``radchain/testing/`` included) does not import ``flows``. Every import statement counts, the ones inside
functions too (they run when the function does), read with ``ast`` from the source files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "extractors": ("prefect", "duckdb", "flows", "warehouse"),
    "training": ("prefect", "duckdb", "flows", "warehouse"),
    "schemas": ("prefect", "duckdb", "flows", "warehouse", "extractors", "training"),  # the bottom layer
    "warehouse": ("prefect", "flows"),  # storage: orchestration sits above it
    "radchain/testing": ("flows",),
    "radchain": ("flows",),  # settings, secrets, runtime: used by every layer
}


def imported_modules(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the source, at any depth (functions, classes, if-blocks)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(package: str, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    out = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        for line, module in imported_modules(path.read_text(encoding="utf-8"), str(rel)):
            top = module.split(".")[0]
            if top in forbidden:
                out.append(f"{rel}:{line} imports {module}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(package):
    assert (REPO / package).is_dir()
    assert not violations(package, FORBIDDEN[package]), "\n".join(violations(package, FORBIDDEN[package]))


def test_the_scan_sees_imports_inside_functions_and_from_imports():
    """The checker itself: a function-level import and a from-import of a forbidden package are found,
    a relative import and a name that only starts like one are not."""
    source = (
        "import os\n"
        "from flowsy import x\n"
        "from . import flows\n"
        "def f():\n"
        "    import duckdb\n"
        "    if True:\n"
        "        from prefect.artifacts import create_markdown_artifact\n"
        "class C:\n"
        "    def g(self):\n"
        "        import warehouse.store as ws\n"
    )
    tops = {(line, m.split(".")[0]) for line, m in imported_modules(source, "<test>")}
    bad = sorted((line, top) for line, top in tops if top in FORBIDDEN["training"])
    assert bad == [(5, "duckdb"), (7, "prefect"), (10, "warehouse")]


def test_the_scan_catches_an_upward_import_in_a_real_file(tmp_path):
    """A file like those of training/ that imports flows inside a function fails the check."""
    pkg = tmp_path / "training"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import json\n")
    (pkg / "bad.py").write_text("def score():\n    from flows.commands.score import score_file\n")
    found = violations("training", FORBIDDEN["training"], root=tmp_path)
    assert found == ["training/bad.py:2 imports flows.commands.score"]


def test_the_llm_client_takes_its_settings_from_its_caller():
    """extractors/llm/client.py does not load radchain's settings: the mine stage, the judge and tests
    pass an LLMSettings (or anything shaped like extractors.llm.client.EndpointSettings) in."""
    path = REPO / "extractors" / "llm" / "client.py"
    modules = [m for _, m in imported_modules(path.read_text(encoding="utf-8"), str(path))]
    assert not [m for m in modules if m == "radchain.settings" or m.startswith("radchain.settings.")]
