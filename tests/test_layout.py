"""The house rules, checked on the source: one import name, no import cycle, and the
dependency directions (models/ imports nothing of the rest; serving/ and the contract
import no torch and nothing of training; training never reaches into serving)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed name -> source folder (pyproject's package-dir)
FOLDERS = {"modeconn": "modeconn", "modeconn.models": "models",
           "modeconn.training": "training", "modeconn.serving": "serving"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "modeconn" and parts and f"modeconn.{parts[0]}" in FOLDERS:
                continue
            found[name] = path
    return found


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Absolute names this module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def test_no_import_cycle_between_modules() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert "modeconn.training.core.distributed" in graph  # the walk saw the package


@pytest.mark.parametrize(("package", "forbidden"), [
    ("modeconn.models", ("modeconn.training", "modeconn.serving", "modeconn.contract")),
    ("modeconn.serving", ("torch", "modeconn.training", "modeconn.models")),
    ("modeconn.contract", ("torch", "modeconn.training", "modeconn.serving", "modeconn.models")),
    ("modeconn.training", ("modeconn.serving",)),
])
def test_dependency_directions(package: str, forbidden: tuple[str, ...]) -> None:
    bad = []
    for name, path in _modules().items():
        if name != package and not name.startswith(package + "."):
            continue
        for imported in _imports(name, path, top_level_only=False):
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                bad.append(f"{name} imports {imported}")
    assert not bad, bad


def test_sources_never_import_the_bare_folder_names() -> None:
    bad = []
    for folder in ("modeconn", "models", "training", "serving", "tests", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bad += [f"{path.relative_to(ROOT)}: {n}" for n in names
                        if n.split(".")[0] in ("models", "training", "serving")]
    assert not bad, bad


def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("modeconn-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"modeconn"}
    for must in ("modeconn/models/registry.py", "modeconn/training/cli.py", "modeconn/serving/service.py",
                 "modeconn/contract/manifest.py", "modeconn/training/core/ranks.py"):
        assert must in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert "modeconn = modeconn.training.cli:main" in zf.read(entry).decode()


def test_a_users_own_models_training_and_serving_do_not_collide(tmp_path: Path) -> None:
    """A researcher's folder with its own models.py, training/ and serving.py, on sys.path first."""
    (tmp_path / "models.py").write_text("raise RuntimeError('the user models.py was imported')\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("raise RuntimeError('the user training was imported')\n")
    (tmp_path / "serving.py").write_text("raise RuntimeError('the user serving.py was imported')\n")
    code = ("import sys, modeconn, modeconn.training.cli, modeconn.serving.service, modeconn.models as m;"
            "print(m.build_model('cnn1d', num_classes=10).__class__.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    cli = subprocess.run([sys.executable, "-m", "modeconn", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "curve" in cli.stdout and "fge" in cli.stdout


def test_import_modeconn_loads_no_torch() -> None:
    code = "import sys, modeconn, modeconn.contract.artifact; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_serving_bypass_opens_with_what_it_replaces_and_why() -> None:
    """serving/fast_path.py reads the prediction bodies instead of BentoML: its first paragraph
    says what it replaces and why, naming a benchmark result that exists."""
    doc = ast.get_docstring(ast.parse((ROOT / "serving/fast_path.py").read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    assert first.startswith("This middleware replaces BentoML's request parsing"), first
    named = re.findall(r"benchmarks/results/[\w.-]+\.md", first)
    assert named and all((ROOT / name).is_file() for name in named), named
