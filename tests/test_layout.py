"""The house rules, checked on the source: one import name, no import cycle, and the
dependency directions (models/ imports nothing of the rest; serving/ and the contract
import no torch and nothing of training; training never reaches into serving)."""

from __future__ import annotations

import ast
import json
import os
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, timeout=300, capture_output=True)
    return next(out.glob("modeconn-*.whl"))


def test_the_wheel_installs_one_top_level_package(wheel: Path) -> None:
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


# A researcher's folder: their own models.py, training/ and serving.py (each fails loudly if
# imported), the network they name by import path, and their arrays.
USER_NETS = """from torch import nn


def build(num_classes: int, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(6, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes))
"""
USER_API = """import sys
import torch
from torch.utils.data import TensorDataset
import modeconn, modeconn.serving.service
from nets import build

g = torch.Generator().manual_seed(0)
x = torch.randn(96, 6, generator=g)
data = TensorDataset(x, (x[:, 0] > 0).long())
torch.manual_seed(0)
a, b = build(2), build(2)
curve = modeconn.fit_curve(a, b, data, epochs=1, batch_size=32)
snapshots = modeconn.fge(a, data, epochs=2, cycle_epochs=1, batch_size=24)
report = modeconn.evaluate_ensemble([curve.network(0.5), *snapshots], data)
print(modeconn.__file__, len(snapshots), 0 <= report.error <= 100, "models" in sys.modules)
"""


def _user_folder(root: Path) -> Path:
    import numpy as np

    root.mkdir()
    (root / "models.py").write_text("raise RuntimeError('the user models.py was imported')\n")
    (root / "training").mkdir()
    (root / "training" / "__init__.py").write_text("raise RuntimeError('the user training was imported')\n")
    (root / "serving.py").write_text("raise RuntimeError('the user serving.py was imported')\n")
    (root / "nets.py").write_text(USER_NETS)
    (root / "api.py").write_text(USER_API)
    rng = np.random.default_rng(0)
    for part, rows in (("train", 120), ("test", 40)):
        x = rng.normal(size=(rows, 6)).astype(np.float32)
        np.savez(root / f"{part}.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    return root


def test_installed_into_a_clean_venv_from_a_users_folder_with_models_training_and_serving(
    wheel: Path, tmp_path: Path
) -> None:
    """`pip install` of the wheel into a fresh venv (no editable install, no checkout on the path):
    `import models` fails, and from a folder holding the user's own models.py, training/ and
    serving.py the public API and the `modeconn` command (train, then ensemble-eval rebuilding the
    user's network from its checkpoint) work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # the dependencies (torch, bentoml, ...) from this environment's site directories, as plain path
    # entries after the venv's own: their .pth files, this checkout's editable install among them, do not run
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).resolve() != Path(purelib).resolve()]
    (Path(purelib) / "dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}

    def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)

    neutral = tmp_path / "neutral"
    neutral.mkdir()
    for name in ("models", "training", "serving"):
        missing = run(python, "-c", f"import {name}", cwd=neutral)
        assert missing.returncode == 1 and f"No module named '{name}'" in missing.stderr, (name, missing.stderr)

    user = _user_folder(tmp_path / "user")
    api = run(python, "api.py", cwd=user)
    assert api.returncode == 0, api.stderr[-3000:]
    where, snapshots, error_ok, user_models = api.stdout.split()
    assert Path(where).is_relative_to(Path(purelib)), where  # the installed copy, not the checkout
    assert (snapshots, error_ok, user_models) == ("2", "True", "False")

    modeconn = venv / "bin" / "modeconn"
    train = run(modeconn, "train", "--set", "data.name=arrays", "--set", "data.train=train.npz", "--set",
                "data.test=test.npz", "--set", "model.factory=nets:build", "--set", "train.epochs=1",
                "--device", "cpu", "--out", "run", "--json", cwd=user)
    assert train.returncode == 0, train.stderr[-3000:]
    evaluated = run(modeconn, "ensemble-eval", "run", "--device", "cpu", "--json", cwd=user)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["architecture"] == {"factory": "nets:build", "kwargs": {}}
    assert 0 <= result["ensemble"]["test_error"] <= 100


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
