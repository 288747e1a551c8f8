"""The parts of `core`, and the page above them, import downwards only, as DESIGN.md draws
them."""

import ast
import subprocess
import sys
from pathlib import Path

from core.files import REPO_ROOT
from tests.helpers import COMMANDS, module_name

LAYERS = (
    "runtime",
    "files",
    "quadrants",
    "sae",
    "diffusion",
    "training",
    "shapes",
    "annotate",
    "steer",
    "emergence",
    "revelio",
    "toy",
    "views",
    "page",
)
"""Bottom to top: a module may import its own part and the parts before it (`core.<part>`, and
`page`, the Gradio page, above the core; `app.py` above everything)."""


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, wherever the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(
            n for n in names if n.split(".")[0] in ("core", "page", "tests", "scripts", "app")
        )
    found.discard("core")  # `from core import files` is counted as `core.files`
    return found


def part(module: str) -> str:
    return module.split(".")[1] if module.startswith("core.") else module.split(".")[0]


SOURCES = sorted([*(REPO_ROOT / "core").rglob("*.py"), *(REPO_ROOT / "page").rglob("*.py")])


def test_every_module_belongs_to_a_layer():
    assert {part(module_name(p)) for p in SOURCES} - {"core"} == set(LAYERS)


def test_imports_point_down():
    upward = [
        f"{module_name(path)} imports {target}"
        for path in SOURCES
        for target in project_imports(path)
        if part(target) not in LAYERS
        or LAYERS.index(part(target)) > LAYERS.index(part(module_name(path)))
    ]
    assert upward == []


def test_views_and_app_import_no_command():
    commands = set(COMMANDS)
    assert "core.training.train" in commands and "core.emergence.evaluate" in commands
    views = [
        *(REPO_ROOT / "core" / "views").glob("*.py"),
        *(REPO_ROOT / "page").glob("*.py"),
        REPO_ROOT / "app.py",
    ]
    found = [f"{p.name} imports {t}" for p in views for t in project_imports(p) & commands]
    assert found == []


def test_scripts_do_not_import_tests():
    found = [
        f"{p.name} imports {t}"
        for p in (REPO_ROOT / "scripts").glob("*.py")
        for t in project_imports(p)
        if t.startswith("tests")
    ]
    assert found == []


def test_the_app_imports_no_model_library_before_serving_its_page():
    """diffusers, transformers, gensim and scipy take seconds to import: the page is served
    first, and the preset (which needs them) loads in the background."""
    heavy = ("diffusers", "transformers", "gensim", "scipy")
    code = f"import sys, app; print([m for m in {heavy!r} if m in sys.modules])"
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip() == "[]"
