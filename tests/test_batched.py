"""Many networks in one pass (training/batched.py) against their separate runs, on the demo
(configs/mnist1d.yaml: MNIST-1D, cnn1d with BatchNorm), K = 3 members for 2 epochs.

Why float64 for the numbers: early demo training at lr 0.1 amplifies float32 rounding
chaotically. A ReLU input within rounding of 0 flips which element a max-pool passes its
gradient to, and two epochs turn that into several per cent of the weights. Two separate
float32 runs that differ only in their thread count (1 vs 2) end 3-7 % apart in weights and up
to 2 pp apart in test error. So the batched members are compared with their separate runs in
float64, where rounding stays far below any such flip: the same init, data order, gradients,
momentum, weight decay, LR schedule and BN statistics give the same networks to 1e-4 (measured:
1e-15). The float32 run (the one compare and the pipeline make) is checked for
what it writes: the same files, fields and RNG states as a separate run's, and a separate run
continues from its checkpoints.

The separate float64 runs are `fit` with the plan `train_network` makes (train_network itself
loads float32 data).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from modeconn.training.batched import batching_blocker, train_members, train_seeds, wants_batching
from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.config import Config, ConfigError, load_config
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import FitPlan, fit
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import (
    dataset_spec,
    epoch_metrics,
    fresh_network,
    load_data,
    load_network,
    predict_probs,
)
from modeconn.training.core.schedules import paper_learning_rate
from modeconn.training.train import fge_start_epoch, train_network

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
EPOCHS = 2
ITERATIONS = 16  # per epoch: 2000 training signals, batch 128
BATCHED = {"train.batched": True}  # auto (the default) batches on GPUs only


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (a busy 2-core machine; and the same thread count in every run)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def demo(seed: int = 0, **overrides: object) -> Config:
    return load_config(REPO / "configs" / "mnist1d.yaml", {"device": "cpu", "seed": seed, "train.epochs": EPOCHS,
                                                           "train.save_every": 1, **overrides})


def as_float64(data: Dataset) -> Dataset:
    doubled = {f"x_{s}": getattr(data, f"x_{s}").double() for s in ("train", "val", "test")}
    return Dataset(**{**data.__dict__, **doubled})


def separate_run(config: Config, data: Dataset, run_dir: Path, resume: bool = False) -> None:
    """What train_network runs for `config`, on the given (float64) data."""
    settings = config.train
    model, optimizer, fields = fresh_network(config, data, "cpu", settings, "train")
    plan = FitPlan(epochs=settings.epochs, batch_size=settings.batch_size,
                   learning_rate=lambda epoch, _: paper_learning_rate(settings.lr, epoch, settings.epochs),
                   seed=config.seed + 1, save_every=settings.save_every, save_epochs=[fge_start_epoch(settings, config.fge)],
                   evaluate=lambda: epoch_metrics(model, data))
    run_dir.mkdir(parents=True, exist_ok=True)
    fit(plan, run_dir=run_dir, model=model, optimizer=optimizer, data=data, checkpoint_fields=fields, resume=resume)


@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("float64")
    data = as_float64(load_data(dataset_spec(demo().data), "cpu"))
    configs = [demo(s) for s in SEEDS]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the networks are built in float64
    try:
        results = train_members(configs, [root / f"batched-{s}" for s in SEEDS], data=data)
        for config in configs:
            separate_run(config, data, root / f"separate-{config.seed}")
    finally:
        torch.set_default_dtype(previous)
    return {"root": root, "data": data, "configs": configs, "results": results}


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    """||a - b|| / ||b|| over the named tensors together."""
    diff = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in keys) ** 0.5
    return diff / sum(float(b[k].double().norm() ** 2) for k in keys) ** 0.5


def parameter_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def test_each_member_equals_its_separate_run(float64_runs: dict) -> None:
    root, data = float64_runs["root"], float64_runs["data"]
    finals = {}
    for seed in SEEDS:
        for epoch in range(1, EPOCHS + 1):
            name = f"checkpoints/epoch-{epoch:04d}.pt"
            batched, separate = (load_checkpoint(root / f"{kind}-{seed}" / name) for kind in ("batched", "separate"))
            keys = parameter_keys(separate["model"])
            assert relative(batched["model"], separate["model"], keys) < 1e-4, (seed, epoch)
            momentum = [separate["optimizer"]["state"][i]["momentum_buffer"] for i in range(len(keys))]
            got = [batched["optimizer"]["state"][i]["momentum_buffer"] for i in range(len(keys))]
            assert relative(dict(enumerate(got)), dict(enumerate(momentum)), list(range(len(keys)))) < 1e-4
            assert (batched["epoch"], batched["iteration"]) == (separate["epoch"], separate["iteration"]) \
                == (epoch, epoch * ITERATIONS)
        finals[seed] = load_checkpoint(root / f"batched-{seed}" / "checkpoints" / f"epoch-{EPOCHS:04d}.pt")["model"]
        # the test error of each file, computed here from the weights alone
        errors = []
        for kind in ("batched", "separate"):
            path = root / f"{kind}-{seed}" / "checkpoints" / f"epoch-{EPOCHS:04d}.pt"
            model, _ = load_network(path)
            model.double()
            errors.append(classification_metrics(predict_probs(model, data, "test"), data.y_test)["error"])
        assert abs(errors[0] - errors[1]) <= 0.1, (seed, errors)
        final = float64_runs["results"][SEEDS.index(seed)]["metrics"]
        assert final["test_error"] == pytest.approx(errors[0], abs=0.01)  # final.pt's metrics: the same network
    # the members are different networks (a pass that trained one network K times would fail above, not here)
    keys = parameter_keys(finals[0])
    assert relative(finals[0], finals[1], keys) > 0.1 and relative(finals[1], finals[2], keys) > 0.1


def test_each_members_batchnorm_statistics_are_its_own(float64_runs: dict) -> None:
    root = float64_runs["root"]
    means = []
    for seed in SEEDS:
        batched = load_checkpoint(root / f"batched-{seed}" / "final.pt")["model"]
        separate = load_checkpoint(root / f"separate-{seed}" / "checkpoints" / f"epoch-{EPOCHS:04d}.pt")["model"]
        stats = [k for k in separate if k.endswith(("running_mean", "running_var"))]
        assert len(stats) == 8  # 4 BN layers
        for key in stats:
            assert relative(batched, separate, [key]) < 1e-6, (seed, key)
        counts = [k for k in separate if k.endswith("num_batches_tracked")]
        assert all(int(batched[k]) == int(separate[k]) == EPOCHS * ITERATIONS for k in counts)
        means.append(batched["features.0.1.running_mean"])
    # each member's statistics come from its own batches through its own weights
    assert not torch.allclose(means[0], means[1], rtol=1e-2) and not torch.allclose(means[1], means[2], rtol=1e-2)


def test_a_separate_run_continues_a_batched_checkpoint_and_the_batched_pass_resumes(
        float64_runs: dict, tmp_path: Path) -> None:
    """Truncated to epoch 1, a member's folder continues as a separate run (`fit --resume`), and
    all three continue as one batched pass, ending where the uninterrupted pass ended."""
    root, data, configs = float64_runs["root"], float64_runs["data"], float64_runs["configs"]
    copies = []
    for seed in SEEDS:
        copy = tmp_path / f"member-{seed}"
        shutil.copytree(root / f"batched-{seed}", copy)
        (copy / "final.pt").unlink()
        (copy / "checkpoints" / f"epoch-{EPOCHS:04d}.pt").unlink()
        copies.append(copy)
    separate = tmp_path / "separate-from-batched"
    shutil.copytree(copies[1], separate)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        separate_run(configs[1], data, separate, resume=True)
        train_members(configs, copies, resume=True, data=data)
    finally:
        torch.set_default_dtype(previous)
    name = f"checkpoints/epoch-{EPOCHS:04d}.pt"
    expected = load_checkpoint(root / "batched-1" / name)["model"]
    assert relative(load_checkpoint(separate / name)["model"], expected, list(expected)) < 1e-8
    for seed, copy in zip(SEEDS, copies, strict=True):
        expected = load_checkpoint(root / f"batched-{seed}" / name)["model"]
        assert relative(load_checkpoint(copy / name)["model"], expected, list(expected)) < 1e-10
        rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]


@pytest.fixture(scope="module")
def float32_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default path: train_seeds (one batched pass, float32) and a separate train_network run of seed 1."""
    root = tmp_path_factory.mktemp("float32")
    results = train_seeds([demo(s, **BATCHED) for s in SEEDS], [root / f"batched-{s}" for s in SEEDS])
    assert all(r["batched"] == 3 for r in results)
    train_network(demo(1, **BATCHED), root / "separate-1")  # the same config: train_network ignores the field
    return root


def test_members_write_what_a_separate_run_writes(float32_runs: Path) -> None:
    batched, separate = float32_runs / "batched-1", float32_runs / "separate-1"
    files = sorted(p.relative_to(separate).as_posix() for p in separate.rglob("*") if p.is_file())
    assert sorted(p.relative_to(batched).as_posix() for p in batched.rglob("*") if p.is_file()) == files
    assert (batched / "config.yaml").read_text() == (separate / "config.yaml").read_text()
    for epoch in range(1, EPOCHS + 1):
        a, b = (load_checkpoint(d / "checkpoints" / f"epoch-{epoch:04d}.pt") for d in (batched, separate))
        assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
        assert all(a["model"][k].shape == b["model"][k].shape and a["model"][k].dtype == b["model"][k].dtype
                   for k in a["model"])
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        # the data generator drew exactly what the separate run's drew; the global RNG is its run's
        assert a["rng"].keys() == b["rng"].keys()
        assert all(torch.equal(a["rng"][k], b["rng"][k]) for k in a["rng"])
        assert (a["epoch"], a["iteration"], a["step"], a["kind"]) == (b["epoch"], b["iteration"], b["step"], b["kind"])
        assert (a["architecture"], a["dataset"], a["config"]) == (b["architecture"], b["dataset"], b["config"])
        assert a["metrics"].keys() == b["metrics"].keys()
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (batched, separate)]
    assert [r.keys() for r in rows[0]] == [r.keys() for r in rows[1]]
    a, b = (load_checkpoint(d / "final.pt") for d in (batched, separate))
    assert a.keys() == b.keys() and a["metrics"].keys() == b["metrics"].keys()
    # a separate run continues a batched member's folder
    copy = float32_runs / "continued"
    shutil.copytree(batched, copy)
    (copy / "final.pt").unlink()
    (copy / "checkpoints" / f"epoch-{EPOCHS:04d}.pt").unlink()
    result = train_network(demo(1, **BATCHED), copy, resume=True)
    assert [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert result["metrics"]["test_error"] < 85  # trained (chance: 90 %); float32 makes it another network


def test_finished_members_are_reused(float32_runs: Path) -> None:
    dirs = [float32_runs / f"batched-{s}" for s in SEEDS]
    stamps = [(d / "final.pt").stat().st_mtime_ns for d in dirs]
    results = train_seeds([demo(s, **BATCHED) for s in SEEDS], dirs)
    assert all(r.get("skipped") for r in results)
    assert [(d / "final.pt").stat().st_mtime_ns for d in dirs] == stamps


def test_batching_blocker_names_what_prevents_one_pass() -> None:
    assert batching_blocker([demo(0), demo(1)]) is None
    assert batching_blocker([demo(0)]) == "one network"
    assert batching_blocker([demo(0), demo(0)]) == "two runs share a seed"
    assert batching_blocker([demo(0), demo(1, **{"train.lr": 0.05})]) == "the runs differ in more than their seed"
    bf16 = {"step.precision": "bf16"}
    assert "step settings" in batching_blocker([demo(0, **bf16), demo(1, **bf16)])
    dropout = {"model.name": "wideresnet", "model.kwargs": {"depth": 10, "widen_factor": 1, "dropout": 0.3}}
    assert batching_blocker([demo(0, **dropout), demo(1, **dropout)]) == "the network has dropout"


def test_train_batched_auto_means_on_a_gpu_only() -> None:
    assert load_config(None).train.batched == "auto"
    def wants(config: Config) -> bool:
        return wants_batching(config.train, config.device)

    assert not wants(demo(0)) and wants(demo(0, **BATCHED))
    assert wants(demo(0, device="cuda")) and not wants(demo(0, device="cuda", **{"train.batched": False}))
    assert wants(demo(0, device="auto")) == torch.cuda.is_available()
    with pytest.raises(ConfigError, match="train.batched"):
        demo(0, **{"train.batched": "sometimes"})


def test_batched_steps_equal_separate_steps_for_a_2d_residual_network() -> None:
    """PreResNet-8 (2D convolutions, BatchNorm2d, residual sums) in float64: three SGD steps of
    two members together equal each member's own three steps, weights, momentum and BN statistics."""
    from modeconn.models import build_model
    from modeconn.training.batched import BatchedNetworks

    def network(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model("preresnet", num_classes=10, depth=8).double().train()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 16, 3, 32, 32, generator=g, dtype=torch.float64)  # step, member, batch
    y = torch.randint(0, 10, (3, 2, 16), generator=g)
    batched = BatchedNetworks([network(0), network(1)], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        batched.step(x[step], y[step], lr=0.1)
    for k in range(2):
        net = network(k)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for step in range(3):
            loss = torch.nn.functional.cross_entropy(net(x[step, k]), y[step, k])
            opt.zero_grad()
            loss.backward()
            opt.step()
        copy = network(k)
        copy_opt = torch.optim.SGD(copy.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        batched.copy_into(k, copy, copy_opt)
        expected, got = net.state_dict(), copy.state_dict()
        assert relative(got, expected, list(expected)) < 1e-10
        for key in (k for k in expected if k.endswith(("running_mean", "running_var"))):
            assert relative(got, expected, [key]) < 1e-10, key
        momentum = {i: opt.state[p]["momentum_buffer"] for i, p in enumerate(net.parameters())}
        got_momentum = {i: copy_opt.state[p]["momentum_buffer"] for i, p in enumerate(copy.parameters())}
        assert relative(got_momentum, momentum, list(momentum)) < 1e-10
