"""compare's sub-runs as Ray tasks (training/core/cluster.py): a local Ray instance started by
the test gets the local run's table and snapshots; without Ray, `--ray` is one line naming the
extra. Ray is the optional `cluster` extra for users and part of the dev extra, so CI runs this."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = {"device": "cpu", "data.val_size": 0, "model.kwargs": {"width": 8}, "train.epochs": 2, "fge.start_fraction": 0.5,
        "fge.cycle_epochs": 1, "sse.cycle_epochs": 1, "compare.budgets": [1], "compare.seeds": 1}


@pytest.mark.slow
def test_compare_on_a_local_ray_instance_equals_the_local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from modeconn.training.ensembles.compare import compare_budgets

    settings = load_config(REPO / "configs" / "mnist1d_standard.yaml", TINY)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per run, here and in the Ray tasks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compare_budgets(settings, tmp_path / "local")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            result = compare_budgets(settings, tmp_path / "ray", ray="auto")
        finally:
            ray.shutdown()
    finally:
        torch.set_num_threads(threads)
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert (local / "compare.csv").read_text() == (remote / "compare.csv").read_text()
    assert result["table"] and result["provenance"]["processes"]["world_size"] == 1
    snapshots = sorted(p.relative_to(local) for p in local.rglob("snapshot-*.pt"))
    assert len(snapshots) == 3 and snapshots == sorted(p.relative_to(remote) for p in remote.rglob("snapshot-*.pt"))
    for rel in [*snapshots, Path("seed-0/ind-0/final.pt")]:
        a, b = load_checkpoint(local / rel)["model"], load_checkpoint(remote / rel)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), rel


def test_ray_option_without_ray_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    """Ray made unimportable in a real `modeconn compare --ray auto` process: exit status 2, one
    line naming the extra, nothing written."""
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ImportError
            "from modeconn.training.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-c", code, "compare", "--ray", "auto", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "modeconn compare: error: --ray needs Ray: pip install 'modeconn[cluster]'"
    assert not out.exists()
