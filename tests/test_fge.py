"""FGE, SSE, ensemble-eval and compare on tiny budgets (a width-8 CNN on MNIST-1D, CPU).

Tests that train are marked slow (about a minute together on an idle 2-core machine).

Expected values are computed here independently of the code under test: the LR schedules
by linear interpolation / the cosine formula, ensembles by loading each checkpoint with
load_network and averaging softmax outputs by hand.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeconn.training.cli import main
from modeconn.training.core.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from modeconn.training.core.config import load_config
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import build_network, load_data, load_network, predict_probs
from modeconn.training.core.networks import (
    held_out_metrics as network_metrics,  # not test_*: pytest would collect it
)
from modeconn.training.core.schedules import (
    cosine_restart_learning_rate,
    fge_collects,
    fge_learning_rate,
)
from modeconn.training.ensembles.fge import fge_start
from modeconn.training.ensembles.sse import run_sse
from modeconn.training.train import train_network
from tests.holds import start_held

STEPS = 29  # the published MNIST-1D: 3600 training signals (400 more held out for validation), batch 128
CYCLE = 30  # a cycle of 1 epoch, made even in iterations
# the published data set, not the demo's variant (the default); val_size: its default 10 %
PUBLISHED = {"data.generation": {}, "data.val_size": 400}
# FGE and SSE steps smaller than the demo's (lr1 0.4, lr2 0.04; SSE lr 0.4), for these short runs
SMALL_STEPS = {"fge.lr1": 0.05, "fge.lr2": 0.005, "sse.lr": 0.2}
SETTINGS = {"device": "cpu", "model.kwargs.width": 8, "train.epochs": 4, "train.save_every": 1,
            "fge.start_fraction": 0.5, **PUBLISHED}
# FGE from the epoch-2 checkpoint: cycle 1 epoch (30 iterations), 4.9 epochs = 142 iterations:
# collections at 15, 45, 75, 105 (and 135 would be the middle of a cycle the budget cuts off)
FGE_ARGS = ["--cycle", "1", "--epochs", "4.9", "--lr1", "0.05", "--lr2", "0.005"]
# the smallest run with one snapshot: 2 epochs (58 iterations) hold one whole 30-iteration cycle
ONE_SNAPSHOT = ["--cycle", "1", "--epochs", "2", "--lr1", "0.05", "--lr2", "0.005"]
SET_ARGS = [a for k, v in SETTINGS.items() if k != "device" for a in ("--set", f"{k}={v}")] + ["--device", "cpu"]


def expected_fge_lr(i: int, c: int, lr1: float, lr2: float) -> float:
    """The triangle by interpolation: lr1 at a cycle's start and end, lr2 at its middle."""
    position = (i - 1) % c + 1  # 1..c
    return float(np.interp(position, [0, c / 2, c], [lr1, lr2, lr1]))


def read_lr_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def ensemble_by_hand(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(member probabilities [K, N, C], their mean) from each checkpoint loaded on its own."""
    members = []
    for path in paths:
        model, state = load_network(path)
        data = load_data(state["dataset"], "cpu")
        members.append(predict_probs(model, data, "test").double())
    stacked = torch.stack(members)
    return stacked, stacked.sum(0) / len(members)


def labels_of(path: Path) -> torch.Tensor:
    return load_data(load_checkpoint(path)["dataset"], "cpu").y_test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, here and in the subprocess: on a busy 2-core machine two OpenMP
    threads wait on each other (an epoch took 29 s instead of 1.6 s), and the resume test
    compares runs bit for bit, which needs the same thread count in both processes."""
    previous, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the in-process CLI sets its threads from it
    yield
    torch.set_num_threads(previous)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("train")
    train_network(load_config(None, SETTINGS), run_dir)
    assert (run_dir / "checkpoints" / "epoch-0002.pt").is_file()  # fge_start_epoch: 0.5 x 4
    return run_dir


@pytest.fixture(scope="module")
def fge_run(train_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("fge")
    start = train_run / "checkpoints" / "epoch-0002.pt"
    result = _cli_json(["fge", "--from", str(start), "--out", str(run_dir), *FGE_ARGS, *SET_ARGS])
    return run_dir, result


def _cli_json(argv: list[str]) -> dict:
    """Run the CLI in-process with --json and return its JSON line."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


# ---------------------------------------------------------------- schedules
def test_fge_learning_rate_equals_design_formula_over_two_cycles() -> None:
    c, lr1, lr2 = 8, 0.05, 0.005
    for i in range(1, 2 * c + 1):
        assert fge_learning_rate(i, c, lr1, lr2) == pytest.approx(expected_fge_lr(i, c, lr1, lr2), abs=1e-15)
    # i ≡ 0 (mod c): t = 1, the cycle's end, lr = lr1; the middle i ≡ c/2: lr = lr2
    assert fge_learning_rate(c, c, lr1, lr2) == pytest.approx(lr1)
    assert fge_learning_rate(2 * c, c, lr1, lr2) == pytest.approx(lr1)
    assert fge_learning_rate(c // 2, c, lr1, lr2) == pytest.approx(lr2)
    assert fge_learning_rate(c + c // 2, c, lr1, lr2) == pytest.approx(lr2)
    assert fge_learning_rate(1, c, lr1, lr2) == pytest.approx(lr1 + (lr2 - lr1) / 4)
    assert [i for i in range(1, 2 * c + 1) if fge_collects(i, c)] == [4, 12]


def test_sse_learning_rate_is_cosine_with_restarts() -> None:
    period, base = 5, 0.2
    expected = [base / 2 * (1 + math.cos(math.pi * k / period)) for k in range(period)] * 2
    assert [cosine_restart_learning_rate(i, period, base) for i in range(1, 2 * period + 1)] == pytest.approx(expected)
    assert cosine_restart_learning_rate(1, period, base) == base
    assert cosine_restart_learning_rate(period + 1, period, base) == base  # the restart


# ---------------------------------------------------------------- FGE
@pytest.mark.slow
def test_fge_snapshots_one_per_whole_cycle_at_the_cycle_middles(fge_run: tuple[Path, dict]) -> None:
    run_dir, result = fge_run
    snapshots = sorted((run_dir / "snapshots").glob("snapshot-*.pt"))
    assert [p.name for p in snapshots] == [f"snapshot-00{k}.pt" for k in range(1, 5)]
    assert result["snapshots"] == 4 == 142 // CYCLE
    for path, iteration in zip(snapshots, [15, 45, 75, 105], strict=True):
        state = load_checkpoint(path)
        assert state["kind"] == "fge-snapshot"
        assert state["snapshot"]["iteration"] == iteration
        assert state["snapshot"]["lr"] == pytest.approx(0.005)
        # BN recomputed on a copy: the running averages kept beside differ from what the model holds
        running = state["bn_running_averages"]
        assert running and any(not torch.equal(v.float(), state["model"][k].float()) for k, v in running.items())
        assert state["metrics"] == pytest.approx(network_metrics(load_network(path)[0], load_data(state["dataset"], "cpu")))


@pytest.mark.slow
def test_fge_lr_csv_has_every_iteration_with_the_formula_values(fge_run: tuple[Path, dict]) -> None:
    run_dir, _ = fge_run
    rows = read_lr_csv(run_dir / "lr.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 143))
    for r in rows:
        i = int(r["iteration"])
        assert float(r["lr"]) == pytest.approx(expected_fge_lr(i, CYCLE, 0.05, 0.005), abs=1e-12)
        assert int(r["epoch"]) == (i - 1) // STEPS + 1
    collected = [int(r["iteration"]) for r in rows if int(r["iteration"]) % CYCLE == CYCLE // 2]
    assert collected == [15, 45, 75, 105, 135]  # 135: mid-cycle, but its cycle is cut off by the budget


@pytest.mark.slow
def test_fge_ensemble_is_the_mean_of_the_snapshots_probabilities(fge_run: tuple[Path, dict], train_run: Path) -> None:
    run_dir, result = fge_run
    snapshots = sorted((run_dir / "snapshots").glob("snapshot-*.pt"))
    members, mean = ensemble_by_hand(snapshots)
    labels = labels_of(snapshots[0])
    report = json.loads((run_dir / "fge.json").read_text())
    for k, row in enumerate(report["members"], start=1):
        expected = classification_metrics(members[:k].mean(0), labels)
        assert row["ensemble_test_nll"] == pytest.approx(expected["nll"], rel=1e-9)
        assert row["ensemble_test_error"] == pytest.approx(expected["error"])
        assert row["member_test_nll"] == pytest.approx(classification_metrics(members[k - 1], labels)["nll"], rel=1e-9)
    final = classification_metrics(mean, labels)
    assert result["ensemble"]["test_nll"] == pytest.approx(final["nll"], rel=1e-9)
    assert result["ensemble"]["test_ece"] == pytest.approx(final["ece"], rel=1e-9)
    start_net, start_state = load_network(train_run / "checkpoints" / "epoch-0002.pt")
    start = network_metrics(start_net, load_data(start_state["dataset"], "cpu"))
    assert result["start"] == pytest.approx(start)
    for name in ("json", "csv", "png", "lr_csv"):
        assert Path(result[name]).is_file()
    assert result["ensemble_running_bn"]["test_nll"] != result["ensemble"]["test_nll"]


def flat_parameters(path: Path) -> torch.Tensor:
    """A checkpoint's parameters (named_parameters of its architecture; BN buffers left out) as one vector."""
    state = load_checkpoint(path)
    names = [name for name, _ in build_network(state["architecture"], 10).named_parameters()]
    assert len(names) < len(state["model"])  # the state_dict also holds BN buffers; they do not count
    return torch.cat([state["model"][name].double().flatten() for name in names])


@pytest.mark.slow
def test_a_finished_run_is_judged_by_its_own_folder(fge_run: tuple[Path, dict], tmp_path: Path) -> None:
    """A moved (or relatively named) FGE folder is still finished, by the snapshots it holds, not
    by the paths its report recorded: one missing in the copy makes it unfinished although the
    recorded file still exists."""
    import shutil

    from modeconn.training.ensembles.snapshots import finished_snapshot_run

    run_dir, _ = fge_run
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    assert finished_snapshot_run(moved, "fge") is not None
    (moved / "snapshots" / "snapshot-002.pt").unlink()
    assert (run_dir / "snapshots" / "snapshot-002.pt").is_file()
    assert finished_snapshot_run(moved, "fge") is None


def test_fge_weight_distances_equal_a_direct_computation(fge_run: tuple[Path, dict], train_run: Path) -> None:
    run_dir, _ = fge_run
    snapshots = sorted((run_dir / "snapshots").glob("snapshot-*.pt"))
    start = flat_parameters(train_run / "checkpoints" / "epoch-0002.pt")  # the --from file itself
    vectors = [flat_parameters(p) for p in snapshots]
    report = json.loads((run_dir / "fge.json").read_text())
    table = read_lr_csv(run_dir / "fge.csv")
    assert len(report["members"]) == len(table) == len(vectors) == 4
    for k, (row, line) in enumerate(zip(report["members"], table, strict=True)):
        from_start = float((vectors[k] - start).norm())
        assert row["distance_from_start"] == pytest.approx(from_start, rel=1e-9)
        assert float(line["distance_from_start"]) == pytest.approx(from_start, rel=1e-9)
        if k == 0:
            assert row["distance_from_previous"] is None and line["distance_from_previous"] == ""
        else:
            step = float((vectors[k] - vectors[k - 1]).norm())
            assert step > 0 and row["distance_from_previous"] == pytest.approx(step, rel=1e-9)
            assert float(line["distance_from_previous"]) == pytest.approx(step, rel=1e-9)
    assert load_checkpoint(run_dir / "start.pt")["kind"] == "fge-start"


@pytest.mark.slow
def test_fge_starts_from_the_checkpoints_optimizer_state(train_run: Path) -> None:
    path = train_run / "checkpoints" / "epoch-0002.pt"
    saved = load_checkpoint(path)
    config = load_config(None, SETTINGS)
    settings = config.fge
    begin = fge_start(path, settings, torch.device("cpu"), model=config.model, data=config.data)
    model, optimizer = begin.model, begin.optimizer
    assert (begin.source, begin.momentum) == ("epoch checkpoint", "from checkpoint")
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    expected = [saved["optimizer"]["state"][i]["momentum_buffer"] for i in range(len(buffers))]
    assert all(torch.equal(b, e) for b, e in zip(buffers, expected, strict=True))
    assert any(b.abs().sum() > 0 for b in buffers)
    assert optimizer.param_groups[0]["momentum"] == settings.momentum
    # one step from the loaded state differs from one step of a zero-momentum start
    fresh = fge_start(path, settings, torch.device("cpu"), model=config.model, data=config.data).model
    cold = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=settings.momentum, weight_decay=settings.weight_decay)
    data = load_data(saved["dataset"], "cpu")
    x, y = data.x_train[:128], data.y_train[:128]
    for net, opt in ((model, optimizer), (fresh, cold)):
        for group in opt.param_groups:
            group["lr"] = 0.05
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert not torch.equal(torch.cat([p.flatten() for p in model.parameters()]),
                           torch.cat([p.flatten() for p in fresh.parameters()]))


@pytest.mark.slow
def test_fge_resume_after_sigkill_ends_with_the_same_snapshots(
    fge_run: tuple[Path, dict], train_run: Path, tmp_path: Path
) -> None:
    reference, _ = fge_run
    run_dir = tmp_path / "fge-killed"
    argv = ["fge", "--from", str(train_run / "checkpoints" / "epoch-0002.pt"), "--out", str(run_dir),
            *FGE_ARGS, *SET_ARGS]
    # stops right after its first epoch checkpoint (an explicit hook, not a race)
    proc = start_held([sys.executable, "-m", "modeconn", *argv], "fge:epoch-1",
                      {**os.environ, "OMP_NUM_THREADS": "1"})
    first = run_dir / "checkpoints" / "epoch-0001.pt"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first epoch checkpoint"
    assert not (run_dir / "fge.json").exists(), "the run finished before it was killed"
    assert main([*argv, "--resume"]) == 0
    for name in [f"snapshot-00{k}.pt" for k in range(1, 5)]:
        got, want = load_checkpoint(run_dir / "snapshots" / name), load_checkpoint(reference / "snapshots" / name)
        assert got["snapshot"] == want["snapshot"]
        for key, tensor in want["model"].items():
            assert torch.equal(got["model"][key], tensor), f"{name}: {key} differs after the resume"
    assert (run_dir / "lr.csv").read_text() == (reference / "lr.csv").read_text()
    assert not (run_dir / "snapshots" / "snapshot-005.pt").exists()


@pytest.mark.slow
def test_fge_from_a_final_checkpoint_starts_with_fresh_momentum(
    train_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    final = train_run / "final.pt"
    config = load_config(None, SETTINGS)
    begin = fge_start(final, config.fge, torch.device("cpu"), model=config.model, data=config.data)
    assert (begin.source, begin.momentum) == ("checkpoint without optimizer state", "fresh")
    assert len(begin.optimizer.state) == 0  # no momentum buffers: the first step starts them from its gradient
    saved = load_checkpoint(final)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in begin.model.state_dict().items())
    capsys.readouterr()
    result = _cli_json(["fge", "--from", str(final), "--out", str(tmp_path), *ONE_SNAPSHOT, *SET_ARGS])
    assert "no optimizer state: fresh momentum" in capsys.readouterr().err
    assert (result["momentum"], result["start_source"], result["snapshots"]) == ("fresh", begin.source, 1)
    report = json.loads((tmp_path / "fge.json").read_text())
    assert report["start"]["momentum"] == report["settings"]["momentum_start"] == "fresh"
    net, state = load_network(final)
    assert result["start"] == pytest.approx(network_metrics(net, load_data(state["dataset"], "cpu")))
    # the epoch checkpoint's run says the other thing
    assert _cli_json(["fge", "--from", str(train_run / "checkpoints" / "epoch-0002.pt"), "--out", str(tmp_path / "kept"),
                      *ONE_SNAPSHOT, *SET_ARGS])["momentum"] == "from checkpoint"


@pytest.mark.slow
def test_fge_from_a_bare_state_dict_takes_the_network_from_the_config(train_run: Path, tmp_path: Path) -> None:
    net, state = load_network(train_run / "final.pt")
    torch.save(net.state_dict(), tmp_path / "weights.pt")  # a plain torch state_dict, no modeconn fields
    result = _cli_json(["fge", "--from", str(tmp_path / "weights.pt"), "--out", str(tmp_path / "run"),
                        *ONE_SNAPSHOT, *SET_ARGS])
    assert (result["momentum"], result["start_source"], result["snapshots"]) == ("fresh", "weights file", 1)
    assert result["start"] == pytest.approx(network_metrics(net, load_data(state["dataset"], "cpu")))
    snapshot = load_checkpoint(tmp_path / "run" / "snapshots" / "snapshot-001.pt")
    assert snapshot["architecture"] == state["architecture"] == {"name": "cnn1d", "kwargs": {"width": 8}}
    assert snapshot["dataset"] == state["dataset"]
    assert snapshot["source"] == str(tmp_path / "weights.pt")


@pytest.mark.slow
def test_fge_bad_start_files_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    wide = build_network({"name": "cnn1d", "kwargs": {"width": 16}}, 10)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")  # the config's model is width 8
    cases = ((tmp_path / "wide.pt", "shape mismatch"), (tmp_path / "missing.pt", "does not exist"))
    for path, words in cases:
        proc = subprocess.run([sys.executable, "-m", "modeconn", "fge", "--from", str(path),
                               "--out", str(tmp_path / "run"), *SET_ARGS],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], proc.stderr
        assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_fge_no_bn_update_keeps_the_running_averages(train_run: Path, tmp_path: Path) -> None:
    result = _cli_json(["fge", "--from", str(train_run / "checkpoints" / "epoch-0002.pt"), "--out",
                        str(tmp_path), *ONE_SNAPSHOT, "--no-bn-update", *SET_ARGS])
    state = load_checkpoint(tmp_path / "snapshots" / "snapshot-001.pt")
    assert state["bn_recomputed"] is False and "bn_running_averages" not in state
    assert result["snapshots"] == 1 and result["bn_recompute_effect"] is None
    assert result["ensemble_running_bn"] == {k: v for k, v in result["ensemble"].items() if k.startswith("test_")}


@pytest.mark.slow
def test_fge_user_errors_name_the_field_or_file(train_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    start = str(train_run / "checkpoints" / "epoch-0002.pt")
    assert main(["fge", "--from", start, "--out", str(tmp_path / "a"), "--lr1", "0.01", "--lr2", "0.1", *SET_ARGS]) == 2
    assert "lr2" in capsys.readouterr().err
    missing = str(tmp_path / "nope.pt")
    assert main(["fge", "--from", missing, "--out", str(tmp_path / "b"), *SET_ARGS]) == 2
    assert missing in capsys.readouterr().err
    torch.save({"not": "weights"}, tmp_path / "other.pt")
    assert main(["fge", "--from", str(tmp_path / "other.pt"), "--out", str(tmp_path / "c"), *SET_ARGS]) == 2
    assert f"{tmp_path / 'other.pt'} is neither a modeconn checkpoint nor a state_dict" in capsys.readouterr().err
    assert main(["fge", "--from", start, "--out", str(tmp_path / "d"), "--cycle", "2", "--epochs", "1", *SET_ARGS]) == 2
    assert "fge.epochs" in capsys.readouterr().err


# ---------------------------------------------------------------- SSE
@pytest.mark.slow
def test_sse_one_snapshot_per_cycle_with_cosine_lr(tmp_path: Path) -> None:
    config = load_config(None, {**SETTINGS, "sse.epochs": 2, "sse.cycle_epochs": 1, "sse.lr": 0.2})
    result = run_sse(config, tmp_path)
    snapshots = sorted((tmp_path / "snapshots").glob("snapshot-*.pt"))
    assert result["snapshots"] == len(snapshots) == 2
    assert [load_checkpoint(p)["snapshot"]["iteration"] for p in snapshots] == [STEPS, 2 * STEPS]
    assert all(load_checkpoint(p)["kind"] == "sse-snapshot" for p in snapshots)
    rows = read_lr_csv(tmp_path / "lr.csv")
    assert len(rows) == 2 * STEPS
    for r in rows:
        k = (int(r["iteration"]) - 1) % STEPS
        assert float(r["lr"]) == pytest.approx(0.1 * (1 + math.cos(math.pi * k / STEPS)), abs=1e-12)
    members, mean = ensemble_by_hand(snapshots)
    expected = classification_metrics(mean, labels_of(snapshots[0]))
    assert result["ensemble"]["test_nll"] == pytest.approx(expected["nll"], rel=1e-9)
    assert result["start"] is None
    # distances from the initialisation: the seeded network fresh_network builds
    torch.manual_seed(config.seed)
    init = build_network({"name": "cnn1d", "kwargs": {"width": 8}}, 10)
    origin = torch.cat([p.detach().double().flatten() for p in init.parameters()])
    rows = json.loads((tmp_path / "sse.json").read_text())["members"]
    vectors = [flat_parameters(p) for p in snapshots]
    assert rows[0]["distance_from_start"] == pytest.approx(float((vectors[0] - origin).norm()), rel=1e-9)
    assert rows[1]["distance_from_previous"] == pytest.approx(float((vectors[1] - vectors[0]).norm()), rel=1e-9)


# ---------------------------------------------------------------- ensemble-eval
@pytest.mark.slow
def test_ensemble_eval_of_a_mix_equals_an_independent_computation(
    train_run: Path, fge_run: tuple[Path, dict], tmp_path: Path
) -> None:
    fge_dir, _ = fge_run
    given = [train_run / "final.pt", fge_dir / "snapshots" / "snapshot-002.pt", fge_dir]
    result = _cli_json(["ensemble-eval", *map(str, given), "--device", "cpu", "--out", str(tmp_path)])
    files = [given[0], given[1], *sorted((fge_dir / "snapshots").glob("snapshot-*.pt"))]
    assert [m["checkpoint"] for m in result["member_metrics"]] == [str(p) for p in files]
    members, mean = ensemble_by_hand(files)
    labels = labels_of(files[0])
    expected = classification_metrics(mean, labels)
    assert result["members"] == 6
    test_part = {k: v for k, v in result["ensemble"].items() if k.startswith("test_")}
    assert test_part == pytest.approx({f"test_{k}": v for k, v in expected.items()}, rel=1e-9)
    top = members.argmax(2)
    pairs = [(a, b) for a in range(6) for b in range(6) if a != b]
    disagree = sum(float((top[a] != top[b]).float().mean()) for a, b in pairs) / len(pairs)
    assert result["disagreement"] == pytest.approx(disagree)
    assert result["member_metrics"][0]["test_nll"] == pytest.approx(classification_metrics(members[0], labels)["nll"])
    assert json.loads((tmp_path / "ensemble.json").read_text())["members"] == 6
    # intervals: the ensemble against the first member and against the member with the lowest test error
    n = len(labels)
    assert result["test_size"] == n
    # the best member is chosen on validation (these data have a validation split), never on test
    data = load_data(load_checkpoint(files[0])["dataset"], "cpu")
    assert len(data.y_val) > 0
    best = int(np.argmin([network_metrics(load_network(p)[0], data)["val_error"] for p in files]))
    index = np.random.default_rng(0).integers(0, n, size=(1000, n))  # statistics.py's documented draws
    ens_nll = -np.log(mean[torch.arange(n), labels].numpy())
    for name, k in (("ensemble - first member", 0), ("ensemble - best member", best)):
        cell = result["differences"][name]
        assert cell["member"] == str(files[k])
        err = (mean.argmax(1) != labels).double().numpy() * 100 - (members[k].argmax(1) != labels).double().numpy() * 100
        nll_diff = ens_nll + np.log(members[k][torch.arange(n), labels].numpy())
        for key, d in (("error", err), ("nll", nll_diff)):
            low, high = np.percentile(d[index].mean(axis=1), [2.5, 97.5])
            assert (cell[key]["mean"], cell[key]["low"], cell[key]["high"]) == pytest.approx((d.mean(), low, high), abs=1e-9)
            assert cell[key]["resamples"] == 1000
    assert result["differences"]["ensemble - best member"]["chosen_on"] == "val_error"
    assert (tmp_path / "ensemble.csv").read_text().count("\n") == 1 + 6 + 1  # header, members, ensemble


@pytest.mark.slow
def test_ensemble_eval_errors_clearly(train_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    final = train_run / "final.pt"
    missing = tmp_path / "missing.pt"
    assert main(["ensemble-eval", str(final), str(missing)]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    state = load_checkpoint(final)
    wider = build_network({"name": "cnn1d", "kwargs": {"width": 16}}, 10)
    save_checkpoint(tmp_path / "wide.pt", model_checkpoint(wider, {"name": "cnn1d", "kwargs": {"width": 16}},
                                                           state["dataset"]))
    assert main(["ensemble-eval", str(final), str(tmp_path / "wide.pt"), "--device", "cpu"]) == 2
    assert "mixed architectures" in capsys.readouterr().err
    save_checkpoint(tmp_path / "other.pt", {**state, "dataset": {**state["dataset"], "name": "cifar10"}})
    assert main(["ensemble-eval", str(final), str(tmp_path / "other.pt"), "--device", "cpu"]) == 2
    assert "mixed data sets" in capsys.readouterr().err
    assert main(["ensemble-eval", str(tmp_path), "--device", "cpu"]) == 2
    assert "neither snapshots/snapshot-*.pt nor final.pt" in capsys.readouterr().err


# ---------------------------------------------------------------- compare
@pytest.mark.slow
def test_compare_writes_the_budget_table_and_skips_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["compare", "--out", str(tmp_path), "--budgets", "1", "2", "--seeds", "2", "--device", "cpu",
            *(a for k, v in {**PUBLISHED, **SMALL_STEPS}.items() for a in ("--set", f"{k}={v}")),
            "--set", "model.kwargs.width=8", "--set", "train.epochs=2", "--set", "fge.start_fraction=0.5",
            "--set", "fge.cycle_epochs=0.9", "--set", "compare.simplex=true", "--set", "sse.cycle_epochs=1"]
    result = _cli_json(argv)
    table = (tmp_path / "compare.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "1B" in header and "2B" in header
    for method in ("Ind", "SSE", "FGE", "SWA", "Simplex"):
        assert any(line.startswith(f"| {method} |") for line in table.splitlines())
        assert f"| {method} | calibrated NLL |" in table  # at the temperature fitted on validation
    with (tmp_path / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["calibrated_test_nll"]) > 0 and float(r["temperature"]) > 0 for r in rows)
    members = {(r["method"], int(r["k"]), int(r["seed"])): int(r["members"]) for r in rows
               if r["method"] not in ("Ind m*", "Ind curve")}
    # FGE: 1 + (k-1)*2 FGE epochs (29 iterations each) after epoch 1 of 2, cycle 26 iterations;
    # SSE: 2k cycles of 1 epoch
    # SWA averages the snapshots FGE ensembles at the same budget
    # equal budget: m networks of kB/m epochs (3 networks do not fit in 1B = 2 epochs)
    assert members == {(m, k, s): c for s in (0, 1) for (m, k), c in
                       {("Ind", 1): 1, ("Ind", 2): 2, ("FGE", 1): 1, ("FGE", 2): 3, ("SSE", 1): 2, ("SSE", 2): 4,
                        ("SWA", 1): 1, ("SWA", 2): 3, ("Ind m=2", 1): 2, ("Ind m=2", 2): 2,
                        ("Ind m=3", 2): 3, ("SWAG", 2): 8,  # SWAG: a spread needs 2 snapshots or more
                        ("Simplex", 2): 8}.items()}  # from 2B: the first Ind network spends 1B
    swag = [r for r in rows if r["method"] == "SWAG"]
    assert {float(r["swag_scale"]) for r in swag} <= {0.25, 0.5, 1.0} and "| SWAG − FGE |" in table
    assert all(r["swag_scale"] == "" for r in rows if r["method"] != "SWAG")
    _check_equal_budget(tmp_path, rows, table)
    _check_simplex_row(tmp_path / "seed-0", next(r for r in rows if (r["method"], r["k"], r["seed"]) == ("Simplex", "2", "0")),
                       result, table)
    _check_swa_row(tmp_path / "seed-0", next(r for r in rows if (r["method"], r["k"], r["seed"]) == ("SWA", "2", "0")))
    _check_swag_row(tmp_path / "seed-0", next(r for r in rows if (r["method"], r["k"], r["seed"]) == ("SWAG", "2", "0")))
    assert result["table"]["FGE"]["2B"]["members"] == 3
    # no --config: the built-in defaults (the demo's) with the overrides given, all recorded
    assert result["config_origin"]["file"] is None and result["config_origin"]["overrides"]["compare.budgets"] == [1, 2]
    assert result["config"]["compare"]["seeds"] == 2 and result["config"]["fge"]["cycle_epochs"] == 0.9
    assert "- Settings: from the built-in defaults (the demo's, `configs/mnist1d.yaml`) with " in table
    _check_compare_intervals(tmp_path, result, table)
    _check_selective(tmp_path / "seed-0", next(r for r in rows if (r["method"], r["k"], r["seed"]) == ("FGE", "2", "0")),
                     result, table)
    finished = [tmp_path / "seed-0" / "fge" / "fge.json", tmp_path / "seed-1" / "simplex-2B" / "simplex.json"]
    stamps = [path.stat().st_mtime_ns for path in finished]
    assert _cli_json(argv)["table"] == result["table"]  # all sub-runs reused, the same numbers
    assert [path.stat().st_mtime_ns for path in finished] == stamps
    assert main([*argv[:-2], "--set", "sse.cycle_epochs=2"]) == 2  # other SSE settings: refused
    assert f"{tmp_path / 'seed-0' / 'sse'} was made with other sse settings" in capsys.readouterr().err


def _check_equal_budget(run_dir: Path, rows: list[dict[str, str]], table: str) -> None:
    """The equal-budget members' epochs sum to the budget, at their own lr (compare.equal_budget_lr,
    the demo's default, not train.lr); Ind m* is the validation choice."""
    for k, m in ((1, 2), (2, 2), (2, 3)):
        states = [load_checkpoint(run_dir / "seed-0" / f"eq-{k}B-m{m}-{j}" / "final.pt") for j in range(m)]
        epochs = [state["metrics"]["epoch"] for state in states]
        assert sum(epochs) == 2 * k, (k, m, epochs)  # B = 2 epochs
        assert {state["config"]["train"]["lr"] for state in states} == {0.2}
    assert load_checkpoint(run_dir / "seed-0" / "ind-0" / "final.pt")["config"]["train"]["lr"] == 0.4
    for k in (1, 2):
        candidates = {}
        for method in ("Ind", "Ind m=2", "Ind m=3"):
            cell = [float(r["calibrated_val_nll"]) for r in rows if r["method"] == method and int(r["k"]) == k]
            if cell:
                candidates[method] = sum(cell) / len(cell)
        chosen = {r["chosen"] for r in rows if r["method"] == "Ind m*" and int(r["k"]) == k}
        assert chosen == {min(candidates, key=candidates.__getitem__)}
    assert "| Ind m* | calibrated NLL |" in table and "| FGE − Ind m* | calibrated NLL |" in table
    assert "| FGE | DEE |" in table and "What the table shows" in table
    assert "two-level bootstrap interval over seeds and test examples" in table


def _check_simplex_row(seed_dir: Path, row: dict[str, str], result: dict, table: str) -> None:
    """The Simplex row at 2B: the first Ind network's epochs and its trained vertices' sum to the
    budget, and the row is the ensemble of its sampled points rebuilt by hand (θ(w) = Σ w_i θ_i from
    the saved vertices, BN recomputed), those points drawn as `modeconn simplex` draws them."""
    from modeconn.training.core.bn import recompute_bn
    from modeconn.training.simplex.model import sample_weights

    run = seed_dir / "simplex-2B"
    vertices = [load_checkpoint(path) for path in sorted(run.glob("vertex-*/vertex.pt"))]
    epochs = [max(r["epoch"] for r in v["history"]) for v in vertices]
    assert load_checkpoint(seed_dir / "ind-0" / "final.pt")["metrics"]["epoch"] + sum(epochs) == 2 * 2  # B = 2
    assert epochs == [1, 1] and load_checkpoint(run / "vertex-01" / "vertex.pt")["config"]["seed"] == 0
    simplex = load_checkpoint(run / "final.pt")
    ind = load_checkpoint(seed_dir / "ind-0" / "final.pt")["model"]
    net, state = load_network(seed_dir / "ind-0" / "final.pt")
    names = [n for n, _ in net.named_parameters()]
    assert torch.equal(simplex["model"]["vertices"][0], torch.cat([ind[n].flatten() for n in names]))  # grown from it
    data = load_data(state["dataset"], "cpu")
    generator = torch.Generator().manual_seed(0 + 7)  # the run's seed (seed 0's) + 7, as `modeconn simplex`
    members = []
    for snapshot in sorted((run / "snapshots").glob("snapshot-*.pt")):
        w = sample_weights(3, [[0, 1, 2]], generator)
        assert load_checkpoint(snapshot)["simplex"]["weights"] == pytest.approx(w.tolist(), abs=1e-12)
        flat = (w[:, None] * simplex["model"]["vertices"].double()).sum(0).float()
        net.load_state_dict({**simplex["base"], **dict(zip(names, (c.view_as(ind[n]) for n, c in zip(
            names, flat.split([ind[n].numel() for n in names]), strict=True)), strict=True))})
        members.append(predict_probs(recompute_bn(net, data).eval(), data, "test").double())
    assert len(members) == int(row["members"]) == 8
    expected = classification_metrics(torch.stack(members).mean(0), data.y_test)
    assert float(row["test_error"]) == pytest.approx(expected["error"], abs=0.01)  # at most one example
    assert float(row["test_nll"]) == pytest.approx(expected["nll"], abs=1e-4)
    assert float(row["test_brier"]) == pytest.approx(expected["brier"], abs=1e-4)
    assert "test_aurc" in row and row["calibrated_test_nll"]  # the selective and calibrated columns too
    assert set(result["differences"]["Simplex - FGE"]) == {"2B"} and "seeds_and_examples" in (
        result["differences"]["Simplex - Ind m=2"]["2B"])
    assert "| Simplex − FGE | calibrated NLL |" in table and "| Simplex − Ind m=3 | error (pp) |" in table
    assert "- Simplex at kB (from 2B): ESPRO grown from the first Ind network" in table


def _check_swa_row(seed_dir: Path, row: dict[str, str]) -> None:
    """The SWA row at 2B: the mean of the first 3 FGE snapshots' weights (by hand), BN recomputed."""
    from modeconn.training.core.bn import recompute_bn

    paths = sorted((seed_dir / "fge" / "snapshots").glob("snapshot-*.pt"))[:3]
    states = [load_checkpoint(p)["model"] for p in paths]
    net, state = load_network(paths[0])
    net.load_state_dict({k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
                         for k, v in states[0].items()})
    data = load_data(state["dataset"], "cpu")
    recompute_bn(net, data).eval()
    expected = classification_metrics(predict_probs(net, data, "test"), data.y_test)
    assert float(row["test_error"]) == pytest.approx(expected["error"], abs=0.01)  # at most one example
    assert float(row["test_nll"]) == pytest.approx(expected["nll"], abs=1e-4)


def _check_swag_row(seed_dir: Path, row: dict[str, str]) -> None:
    """The SWAG row at 2B of seed 0: every scale's 8 draws (generator seed 0 * 1000 + 2, BN
    recomputed) evaluated on validation AND test by hand; the row is the scale with the lowest
    calibrated validation NLL, with that scale's test numbers (compare evaluates only it on test)."""
    from modeconn.training.ensembles.calibration import calibration_report
    from modeconn.training.ensembles.swag import swag_from_checkpoints, swag_network

    paths = sorted((seed_dir / "fge" / "snapshots").glob("snapshot-*.pt"))[:3]
    moments, model, first = swag_from_checkpoints(paths)
    data = load_data(first["dataset"], "cpu")
    by_scale = {}
    for scale in (0.25, 0.5, 1.0):
        generator = torch.Generator().manual_seed(2)
        val, test = [], []
        for _ in range(8):
            net = swag_network(model, moments, generator, scale, data)
            val.append(predict_probs(net, data, "val").double())
            test.append(predict_probs(net, data, "test").double())
        report = calibration_report(torch.stack(val).mean(0), data.y_val, torch.stack(test).mean(0), data.y_test)
        by_scale[scale] = (report["calibrated_val_nll"], classification_metrics(torch.stack(test).mean(0), data.y_test))
    chosen = min(by_scale, key=lambda scale: by_scale[scale][0])
    assert float(row["swag_scale"]) == chosen
    assert float(row["calibrated_val_nll"]) == pytest.approx(by_scale[chosen][0], abs=1e-6)
    assert float(row["test_nll"]) == pytest.approx(by_scale[chosen][1]["nll"], abs=1e-6)
    assert float(row["test_error"]) == pytest.approx(by_scale[chosen][1]["error"], abs=1e-6)


def _check_selective(seed_dir: Path, row: dict[str, str], result: dict, table: str) -> None:
    """The FGE row at 2B: AURC, E-AURC and the AUROC against the built-in OOD sets (seed 0: the
    config's seed) of the first 3 snapshots' ensemble, by hand; and the second table."""
    from modeconn.training.core.data import ood_inputs, ood_split
    from modeconn.training.ensembles import selective

    paths = sorted((seed_dir / "fge" / "snapshots").glob("snapshot-*.pt"))[:3]
    _, mean = ensemble_by_hand(paths)
    labels = labels_of(paths[0])
    probs = mean.numpy()
    wrong = (probs.argmax(1) != labels.numpy()).astype(float)
    assert float(row["test_aurc"]) == pytest.approx(selective.aurc(probs.max(1), wrong), abs=1e-9)
    assert float(row["test_eaurc"]) == pytest.approx(selective.excess_aurc(probs.max(1), wrong), abs=1e-9)
    data = load_data(load_checkpoint(paths[0])["dataset"], "cpu")
    for name in ("mnist1d-noise", "shuffled"):
        split = ood_split(data, ood_inputs(name, data, 0))
        out = torch.stack([predict_probs(load_network(p)[0], split, "test").double() for p in paths]).mean(0).numpy()
        expected = selective.auroc(selective.entropy(probs), selective.entropy(out))
        assert float(row[f"auroc_entropy:{name}"]) == pytest.approx(expected, abs=1e-9)
        assert f"| FGE | AUROC entropy: {name} |" in table
    cell = result["table"]["FGE"]["2B"]
    assert cell["test_aurc_mean"] > 0 and "test_aurc_std" in cell and "| SWAG | E-AURC |" in table


def _check_compare_intervals(run_dir: Path, result: dict, table: str) -> None:
    """FGE − Ind at 2B and FGE − single network at 1B, recomputed from the sub-runs' files."""
    seeds = [run_dir / f"seed-{s}" for s in (0, 1)]
    labels = labels_of(seeds[0] / "ind-0" / "final.pt")
    n = len(labels)
    assert result["test_size"] == n and f"Test set: {n:,} examples" in table

    def errors(probs: torch.Tensor) -> np.ndarray:
        return (probs.argmax(1) != labels).double().numpy() * 100

    def brier(probs: torch.Tensor) -> np.ndarray:
        return ((probs - torch.nn.functional.one_hot(labels, probs.shape[1]).double()) ** 2).sum(1).numpy()

    index = np.random.default_rng(0).integers(0, n, size=(1000, n))
    fge2 = [ensemble_by_hand(sorted((d / "fge" / "snapshots").glob("snapshot-*.pt"))[:3])[1] for d in seeds]
    ind2 = [ensemble_by_hand([d / "ind-0" / "final.pt", d / "ind-1" / "final.pt"])[1] for d in seeds]
    fge1 = [ensemble_by_hand(sorted((d / "fge" / "snapshots").glob("snapshot-*.pt"))[:1])[1] for d in seeds]
    single = [ensemble_by_hand([d / "ind-0" / "final.pt"])[1] for d in seeds]
    for name, budget, a, b in (("FGE - Ind", "2B", fge2, ind2), ("FGE - single network", "1B", fge1, single)):
        cell = result["differences"][name][budget]
        for metric, per_example in (("error", errors), ("brier", brier)):
            per_seed = [per_example(x) - per_example(y) for x, y in zip(a, b, strict=True)]
            for s, d in enumerate(per_seed):
                low, high = np.percentile(d[index].mean(axis=1), [2.5, 97.5])
                got = cell["per_seed"][s][metric]
                assert (got["mean"], got["low"], got["high"]) == pytest.approx((d.mean(), low, high), abs=1e-9)
            d = (per_seed[0] + per_seed[1]) / 2  # the seed mean, resampled with the same indices
            low, high = np.percentile(d[index].mean(axis=1), [2.5, 97.5])
            got = cell["seed_mean"][metric]
            assert (got["mean"], got["low"], got["high"]) == pytest.approx((d.mean(), low, high), abs=1e-9)
            means = [x.mean() for x in per_seed]
            assert cell["over_seeds"][metric]["mean"] == pytest.approx(np.mean(means), abs=1e-9)
            assert cell["over_seeds"][metric]["std"] == pytest.approx(np.std(means, ddof=1), abs=1e-9)
    assert "| FGE − Ind | error (pp) |" in table and "| FGE − SSE | NLL |" in table
    mean = result["differences"]["FGE - Ind"]["2B"]["seed_mean"]["error"]
    assert f"{mean['mean']:+.2f} [{mean['low']:+.2f}, {mean['high']:+.2f}]" in table
    with (run_dir / "compare_differences.csv").open() as f:
        written = list(csv.DictReader(f))
    # comparisons x budgets x metrics (calibrated NLL, error, NLL, Brier) x (2 seeds + mean + two-level);
    # FGE − Ind m=M where the equal-budget ensemble exists;
    # SWAG - FGE only at 2B (one FGE snapshot at 1B has no spread)
    # and Simplex − FGE, Simplex − Ind m*, m=2 and m=3 at 2B
    assert len(written) == (6 * 2 + 1 + 3 + 4) * 4 * 4  # FGE − Ind m=2 at 1B and 2B, m=3 at 2B
    assert json.loads((run_dir / "compare.json").read_text())["differences"] == result["differences"]
