"""Training over two processes (torchrun, gloo, CPU) against one process.

Real `torchrun --nproc_per_node=2` subprocesses: one launch of tests/ddp_worker.py runs
several stages in one process group (each torchrun start costs seconds here), one CLI run
is killed and resumed. The one-process references run in this process with the same
settings. Tiny settings: cnn1d of width 8, 2 epochs of MNIST-1D (64 steps), a 1-epoch curve.
Early training at lr 0.1 is chaotic (a difference of 6e-8 after 32 steps of the no-BN net
grows to 1e-6 after 64 and 9e-5 after 96), hence so few steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from torch.nn import functional as F

from modeconn.training.core import distributed
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.config import ConfigError, load_config
from modeconn.training.core.networks import load_data, load_network
from modeconn.training.curves.fit import fit_curve
from modeconn.training.ensembles.fge import run_fge
from modeconn.training.ensembles.sse import run_sse
from modeconn.training.train import train_network
from tests.holds import start_held

REPO = Path(__file__).resolve().parents[1]
# torchrun as a module: the same launcher, also where a virtual environment has no torchrun script
LAUNCHER = [sys.executable, "-m", "torch.distributed.run"]
TORCHRUN = [*LAUNCHER, "--standalone", "--nproc_per_node=2"]
MODECONN = str(Path(sys.executable).with_name("modeconn"))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
sys.path.insert(0, str(REPO / "tests"))
from ddp_worker import BN, NO_BN, config  # noqa: E402 (the worker's settings, shared)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str] | None = None) -> float:
    keys = keys if keys is not None else [k for k in a if a[k].is_floating_point()]
    assert set(keys) <= set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One-process references (here) and the 2-rank worker's runs (one torchrun launch)."""
    root = tmp_path_factory.mktemp("ddp")
    one = root / "one"
    # the workers' thread count (ENV): with other threads the reductions round otherwise, and
    # the chaotic start of training turns that into 5e-3 apart after 64 steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ends = [train_network(config(**NO_BN, seed=s), one / f"end-{s}")["checkpoint"] for s in (1, 2)]
        for name, overrides in (("train-nobn", NO_BN), ("train-bn", BN)):
            train_network(config(**overrides), one / name)
        fit_curve(config(**NO_BN), Path(ends[0]), Path(ends[1]), one / "curve-nobn")
        run_fge(config(), one / "train-nobn" / "checkpoints" / "epoch-0001.pt", one / "fge-nobn")
        run_sse(config(**NO_BN), one / "sse-nobn")
    finally:
        torch.set_num_threads(threads)
    two = root / "two"
    two.mkdir()
    started = time.perf_counter()
    proc = subprocess.run([*TORCHRUN, str(REPO / "tests" / "ddp_worker.py"), str(two), *ends],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    print(f"\n[ddp worker] {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [json.loads((two / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return {"one": one, "two": two, "seen": seen, "stderr": proc.stderr}


@pytest.mark.slow
def test_two_ranks_without_batchnorm_train_the_one_process_weights(runs: dict[str, Any]) -> None:
    one, two = runs["one"] / "train-nobn", runs["two"] / "train-nobn"
    diff = _max_diff(_weights(one / "final.pt"), _weights(two / "final.pt"))
    print(f"\nno BN, 64 steps: max |w_2ranks - w_1process| = {diff:.2e}")
    assert diff < 1e-5
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["iteration"] for r in rows[0]] == [r["iteration"] for r in rows[1]] == [32, 64]  # global steps
    for a, b in zip(*rows, strict=True):  # the train loss is all-reduced over the ranks
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=0.1)


@pytest.mark.slow
def test_batchnorm_per_rank_and_synchronised_against_one_process(runs: dict[str, Any]) -> None:
    """SyncBatchNorm normalises with the global batch's statistics: the one-process step to
    float tolerance. Stated tolerances (measured: 5e-6 after 32 steps, 5e-3 after 64 as the
    chaotic start amplifies rounding; 1.7e-2 and a train loss 3.4e-4 apart on an AMD EPYC):
    weights within 1e-4 after epoch 1 and 5e-2 at the end, train loss within 1e-4 and 1e-3. Per-rank BN normalises each half-batch by itself: another
    optimisation (weights apart by O(1) after 32 steps), which still trains, with a train loss
    within 0.3 of one process's in each epoch."""
    def state(where: str, name: str, epoch: int | None = None) -> dict[str, Any]:
        run = runs[where] / name
        return load_checkpoint(run / "checkpoints" / f"epoch-{epoch:04d}.pt" if epoch else run / "final.pt")

    for epoch, weight_tol, loss_tol in ((1, 1e-4, 1e-4), (None, 5e-2, 1e-3)):
        one, sync, per_rank = state("one", "train-bn", epoch), state("two", "train-syncbn", epoch), state("two", "train-bn", epoch)
        sync_diff, rank_diff = _max_diff(one["model"], sync["model"]), _max_diff(one["model"], per_rank["model"])
        print(f"\nBN, epoch {epoch or 'final'}: max weight difference from one process: SyncBN {sync_diff:.2e}, "
              f"per-rank BN {rank_diff:.2e}")
        assert sync_diff < weight_tol
        assert sync["metrics"]["train_loss"] == pytest.approx(one["metrics"]["train_loss"], abs=loss_tol)
        assert rank_diff > 0.1
        assert per_rank["metrics"]["train_loss"] == pytest.approx(one["metrics"]["train_loss"], abs=0.3)
    assert per_rank["metrics"]["train_loss"] < state("two", "train-bn", 1)["metrics"]["train_loss"] < 2.3


@pytest.mark.slow
def test_recompute_bn_over_two_shards_equals_one_process(runs: dict[str, Any]) -> None:
    model, state = load_network(runs["two"] / "train-bn" / "final.pt")
    recompute_bn(model, load_data(state["dataset"], "cpu"))  # one process, all 8 batches
    two = torch.load(runs["two"] / "recomputed-bn-2ranks.pt", weights_only=True)
    one = model.state_dict()
    assert {k for k in one if "running" in k} <= set(two)
    diff = _max_diff(one, two, [k for k in two if "running" in k])
    assert diff < 1e-5
    assert all(int(two[k]) == int(one[k]) == 8 for k in two if k.endswith("num_batches_tracked"))
    # and it is not the statistics the network was saved with (those are running averages)
    saved = _weights(runs["two"] / "train-bn" / "final.pt")
    assert _max_diff(saved, two, [k for k in two if "running" in k]) > 100 * max(diff, 1e-7)


@pytest.mark.slow
def test_a_curve_step_uses_the_same_t_on_both_ranks(runs: dict[str, Any]) -> None:
    t0, t1 = (s["curve_t"] for s in runs["seen"])
    assert len(t0) == len(t1) == 32  # one t per global step of the 1-epoch curve
    assert t0 == t1
    assert len(set(t0)) == 32 and all(0.0 <= t <= 1.0 for t in t0)
    one, two = runs["one"] / "curve-nobn" / "final.pt", runs["two"] / "curve-nobn" / "final.pt"
    assert _max_diff(_weights(one), _weights(two)) < 1e-5  # the same t as one process, too


@pytest.mark.slow
def test_fge_and_sse_on_two_ranks(runs: dict[str, Any]) -> None:
    """Without BN: the one-process snapshots and LR log (schedules count global steps). With BN:
    the snapshot's statistics are the exact re-estimation over the whole training set (one
    process recomputing them on the snapshot's weights), not any rank's running averages."""
    for name in ("fge-nobn", "sse-nobn"):
        one, two = runs["one"] / name, runs["two"] / name
        assert _files(one) == _files(two) and (two / "snapshots" / "snapshot-001.pt").is_file()
        assert _max_diff(_weights(one / "snapshots" / "snapshot-001.pt"), _weights(two / "snapshots" / "snapshot-001.pt")) < 1e-5
    lr_one, lr_two = ((runs[w] / "fge-nobn" / "lr.csv").read_text() for w in ("one", "two"))
    assert lr_one == lr_two and len(lr_one.splitlines()) == 33
    snapshot = runs["two"] / "fge-bn" / "snapshots" / "snapshot-001.pt"
    model, state = load_network(snapshot)
    saved = model.state_dict()
    assert state["bn_recomputed"]
    recompute_bn(model, load_data(state["dataset"], "cpu"))
    keys = [k for k in saved if "running" in k]
    assert _max_diff(model.state_dict(), saved, keys) < 1e-5
    assert _max_diff(state["bn_running_averages"], saved, keys) > 1e-3  # rank 0's averages differ


@pytest.mark.slow
def test_only_rank_zero_writes(runs: dict[str, Any]) -> None:
    for name in ("train-nobn", "train-bn", "curve-nobn", "fge-nobn", "sse-nobn"):
        assert _files(runs["two"] / name) == _files(runs["one"] / name)
    r0, r1 = runs["seen"]
    assert r0["write"] == "written" and (runs["two"] / "written-by-rank-0").is_file()
    assert "rank 1 tried to write" in r1["write"] and not (runs["two"] / "written-by-rank-1").exists()
    checkpoint = load_checkpoint(runs["two"] / "train-nobn" / "checkpoints" / "epoch-0001.pt")
    assert len(checkpoint["rng_ranks"]) == 2  # every rank's RNG states
    assert torch.equal(checkpoint["rng_ranks"][0]["torch"], checkpoint["rng"]["torch"])


@pytest.mark.slow
def test_bad_input_under_torchrun_names_the_setting(runs: dict[str, Any]) -> None:
    for seen in runs["seen"]:
        assert "train.batch_size (127)" in seen["odd_batch_error"] and "world size (2" in seen["odd_batch_error"]
        assert seen["nccl_error"].startswith("distributed.backend: nccl needs one CUDA GPU per rank")


def test_shards_and_loss_weights_give_the_global_batch_gradient() -> None:
    """An uneven last batch (here 7 rows over 3 ranks: 3, 2, 2): weighting each rank's mean
    loss by rows * world / global and averaging over ranks (what DDP does) is the full-batch
    gradient. (With 2 ranks MNIST-1D's 4000 examples never split unevenly.)"""
    assert [distributed.shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [distributed.shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    torch.manual_seed(0)
    w = torch.randn(5, 3, requires_grad=True)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    (full,) = torch.autograd.grad(F.cross_entropy(x @ w, y), w)
    parts = []
    for r in range(3):
        lo, hi = distributed.shard_bounds(7, r, 3)
        loss = F.cross_entropy(x[lo:hi] @ w, y[lo:hi]) * distributed.loss_weight(hi - lo, 7, world=3)
        parts.append(torch.autograd.grad(loss, w)[0])
    assert torch.allclose(torch.stack(parts).mean(0), full, atol=1e-6)
    with pytest.raises(ConfigError, match=r"curve.batch_size \(130\).*world size \(4"):
        distributed.check_batch_size(130, 4000, "curve.batch_size", world=4)
    with pytest.raises(ConfigError, match=r"last batch of each epoch has 2 of the 4002"):
        distributed.check_batch_size(4, 4002, "train.batch_size", world=4)
    distributed.check_batch_size(128, 4000, "train.batch_size", world=2)


@pytest.mark.slow
def test_killed_two_rank_run_resumes_to_the_uninterrupted_weights(runs: dict[str, Any], tmp_path: Path) -> None:
    """The whole job SIGKILLed after its first checkpoint, then `--resume`: the weights of the
    uninterrupted 2-rank run (the worker's, same settings), bit for bit."""
    out = tmp_path / "killed"
    args = ["train", "--config", str(REPO / "configs" / "mnist1d_standard.yaml"), "--device", "cpu",
            "--set", "data.val_size=0",
            "--set", "model.kwargs={width: 8, batchnorm: false}", "--set", "train.epochs=2",
            "--set", f"train.lr={NO_BN['train.lr']}",
            "--set", "train.save_every=1", "--out", str(out)]
    cli = [*TORCHRUN, "--no-python", MODECONN]
    # rank 0 stops right after writing the first checkpoint (rank 1 then waits for it in the
    # next epoch's first all-reduce): an explicit hook, not a race with the second epoch
    job = start_held([*cli, *args], "train:epoch-1", ENV, cwd=REPO, start_new_session=True)
    _kill_torchrun(job)
    job.wait(timeout=60)
    assert (out / "checkpoints" / "epoch-0001.pt").exists(), "the run never wrote its first checkpoint"
    assert not (out / "checkpoints" / "epoch-0002.pt").exists(), "the run went on past the hold"
    resumed = subprocess.run([*cli, *args, "--resume", "--json"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    result = json.loads(resumed.stdout.strip().splitlines()[-1])  # rank 0's JSON line only
    assert result["checkpoint"] == str(out / "final.pt")
    one_node = {"world_size": 2, "nodes": 1, "ranks_per_node": 2, "backend": "gloo"}
    assert result["distributed"] == one_node
    assert _first_run_line(resumed.stderr) == "distributed: 2 ranks on 1 node (2 per node), backend gloo, 1 thread(s) per rank"
    assert load_checkpoint(out / "final.pt")["processes"] == one_node
    assert resumed.stdout.count('"run_dir"') == 1
    reference = _weights(runs["two"] / "train-nobn" / "final.pt")
    resumed_weights = _weights(out / "final.pt")
    assert all(torch.equal(reference[k], resumed_weights[k]) for k in reference)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _first_run_line(stderr: str) -> str:
    """The first line the modeconn ranks wrote (torchrun's own warnings left out)."""
    launcher = re.compile(r"[WIE]\d{4} |node_rank |\*{5}|Setting OMP_NUM_THREADS")  # torch's log and notices
    return next(line for line in stderr.splitlines() if line.strip() and not launcher.match(line))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_the_single_node_two_rank_weights(runs: dict[str, Any], tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes=2, one rank each) meeting at a c10d rendezvous on localhost,
    as two machines would: the weights of the one-node 2-rank run (the worker's train-nobn, same
    settings), and the run says it ran on 2 ranks on 2 nodes (first log line, --json, checkpoint)."""
    out, port = tmp_path / "two-nodes", _free_port()
    args = ["train", "--config", str(REPO / "configs" / "mnist1d_standard.yaml"), "--device", "cpu",
            "--set", "data.val_size=0", "--set", "model.kwargs={width: 8, batchnorm: false}",
            "--set", "train.epochs=2", "--set", f"train.lr={NO_BN['train.lr']}", "--set", "train.save_every=1",
            "--out", str(out), "--json"]
    nodes = [subprocess.Popen([*LAUNCHER, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=modeconn-test",
                               "--no-python", MODECONN, *args],
                              cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for node in (0, 1)]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_torchrun(node)
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    # the rendezvous, not --node-rank, decides which agent's process is rank 0: it prints
    (stdout, stderr), = [o for o in outputs if o[0].strip()]
    two_nodes = {"world_size": 2, "nodes": 2, "ranks_per_node": 1, "backend": "gloo"}
    assert json.loads(stdout.strip().splitlines()[-1])["distributed"] == two_nodes
    assert _first_run_line(stderr) == "distributed: 2 ranks on 2 nodes (1 per node), backend gloo, 1 thread(s) per rank"
    final = load_checkpoint(out / "final.pt")
    assert final["processes"] == two_nodes
    reference = _weights(runs["two"] / "train-nobn" / "final.pt")
    diff = _max_diff(reference, final["model"])
    print(f"\n2 nodes x 1 rank against 1 node x 2 ranks: max weight difference {diff:.1e}")
    assert all(torch.equal(reference[k], final["model"][k]) for k in reference)


def _workers(parent: int) -> dict[int, list[str]]:
    """The worker processes torchrun (`parent`) started: pid -> environment."""
    try:
        children = psutil.Process(parent).children()
    except psutil.NoSuchProcess:  # torchrun already gone
        return {}
    found = {}
    for proc in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found[proc.pid] = [f"{k}={v}" for k, v in proc.environ().items()]
    return found


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker process with RANK `rank` that torchrun (`parent`) started."""
    return next((pid for pid, env in _workers(parent).items() if f"RANK={rank}" in env), None)


def _kill_torchrun(job: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks: torchrun starts each rank in a session of its own, so
    killing torchrun's process group alone leaves them running (a held rank forever)."""
    ranks = _workers(job.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
def test_one_killed_rank_restarts_and_ends_with_the_uninterrupted_weights(runs: dict[str, Any], tmp_path: Path) -> None:
    """Rank 1 alone SIGKILLed after the first checkpoint of a run started with torchrun's
    --max-restarts=1 and --resume: torchrun stops rank 0, starts both again, they resume from the
    checkpoint and end with the uninterrupted 2-rank run's weights, bit for bit."""
    out = tmp_path / "restarted"
    args = ["train", "--config", str(REPO / "configs" / "mnist1d_standard.yaml"), "--device", "cpu",
            "--set", "data.val_size=0", "--set", "model.kwargs={width: 8, batchnorm: false}",
            "--set", "train.epochs=2", "--set", f"train.lr={NO_BN['train.lr']}", "--set", "train.save_every=1",
            "--out", str(out), "--resume", "--json"]
    cli = [*TORCHRUN, "--max-restarts=1", "--no-python", MODECONN]
    # rank 0 stops right after writing the first checkpoint, rank 1 waits for it in the next
    # epoch; the restarted ranks resume past epoch 1 and do not stop there again
    job = start_held([*cli, *args], "train:epoch-1", ENV, cwd=REPO, start_new_session=True,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _rank_pid(job.pid, 1)
        assert killed is not None, "rank 1 was not found after the first checkpoint"
        os.kill(killed, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            _kill_torchrun(job)
    assert job.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr  # the restarted ranks continued from the checkpoint
    assert json.loads(stdout.strip().splitlines()[-1])["checkpoint"] == str(out / "final.pt")
    reference = _weights(runs["two"] / "train-nobn" / "final.pt")
    restarted = _weights(out / "final.pt")
    assert all(torch.equal(reference[k], restarted[k]) for k in reference)


def test_commands_that_run_as_one_process_refuse_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from modeconn.training.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the check comes before any group is joined
    assert main(["eval-curve", "nowhere"]) == 2
    assert capsys.readouterr().err.strip() == (
        "modeconn eval-curve: eval-curve runs as one process; start it without torchrun "
        "(under torchrun: train, curve, fge, sse)")


def test_distributed_settings_validate() -> None:
    with pytest.raises(ConfigError, match="distributed.backend"):
        load_config(None, {"distributed.backend": "mpi"})


@pytest.mark.slow
def test_compare_jobs_2_equals_jobs_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ind and SSE side by side in two worker processes, then FGE after its Ind run: the same
    table and the same snapshots as one after the other (one thread per run in both)."""
    from modeconn.training.ensembles.compare import compare_budgets

    settings = load_config(REPO / "configs" / "mnist1d_standard.yaml", {
        "device": "cpu", "data.val_size": 0, "model.kwargs": {"width": 8}, "train.epochs": 2, "fge.start_fraction": 0.5,
        "fge.cycle_epochs": 1, "sse.cycle_epochs": 1, "compare.budgets": [1], "compare.seeds": 1})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compare_budgets(settings, tmp_path / "jobs1")
        started = time.perf_counter()
        compare_budgets(settings, tmp_path / "jobs2", jobs_at_once=2)
        print(f"\n[compare --jobs 2] {time.perf_counter() - started:.1f} s")
    finally:
        torch.set_num_threads(threads)
    one, two = tmp_path / "jobs1", tmp_path / "jobs2"
    assert (one / "compare.csv").read_text() == (two / "compare.csv").read_text()
    snapshots = sorted(p.relative_to(one) for p in one.rglob("snapshot-*.pt"))
    assert len(snapshots) == 3  # FGE 1 (one cycle in 1 epoch), SSE 2 (2 epochs, cycle 1)
    assert snapshots == sorted(p.relative_to(two) for p in two.rglob("snapshot-*.pt"))
    for rel in [*snapshots, Path("seed-0/ind-0/final.pt")]:
        a, b = _weights(one / rel), _weights(two / rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel


ORPHANED_POOL = """
import time, torch
from modeconn.training.core.distributed import Job, run_jobs
run_jobs([Job(time.sleep, (600,)), Job(time.sleep, (600,))], 2, torch.device("cpu"))
"""


def test_job_workers_end_when_their_command_is_killed() -> None:
    """`compare --jobs 2` (run_jobs) SIGKILLed: its pool's workers end too, instead of training
    the jobs they hold for nobody."""
    parent = subprocess.Popen([sys.executable, "-c", ORPHANED_POOL], cwd=REPO, env=ENV)
    try:
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while len(workers) < 2:  # both spawned and holding a job (a spawn helper may be a child too)
            assert time.monotonic() < deadline and parent.poll() is None, "the pool never started its workers"
            workers = [p for p in psutil.Process(parent.pid).children()
                       if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(0.2)
        time.sleep(3)  # past their initialiser: now in time.sleep(600)
        parent.kill()
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, [p.pid for p in alive]
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
