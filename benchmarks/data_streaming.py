"""Streamed vs in-memory data: epoch time of the same data held as tensors on the device and
read through a DataLoader with worker processes (training/core/streaming.py).

    python benchmarks/data_streaming.py [--quick] [--workers 0 1 2] [--rounds 5]

Two data sets: the demo (MNIST-1D, configs/mnist1d.yaml: 2,000 training signals, cnn1d) and
scikit-learn's 1,797 real 8x8 digits written as a PNG image folder (tests/digits_folder.py,
PreResNet-8). For each, three timings per way of holding the data, taken round-robin after a
quiet machine (benchmarks/common.py `interleaved`), median of the samples:
- data epoch: one shuffled epoch of normalised training batches, nothing else;
- train epoch: one epoch of SGD steps of the network on those batches (forward, backward, step);
- test pass: softmax outputs over the test split (evaluation reads this way).
The workers are persistent: the first epoch of a process also starts them (not in the table).
Both ways give the same batches (tests/test_data_sources.py), so only time differs.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F

from modeconn.models import build_model
from modeconn.training.core.config import load_config
from modeconn.training.core.data import Dataset, build_dataset, train_batches
from modeconn.training.core.networks import dataset_spec, load_data, predict_probs
from tests.digits_folder import write_digits_folder

BATCH = 128


def _data_epoch(data: Dataset) -> Callable[[], Any]:
    def run() -> float:
        total = 0.0
        for x, _ in train_batches(data, BATCH, torch.Generator().manual_seed(0)):
            total += float(x[0, 0].sum())  # touch every batch (on the CPU this syncs nothing extra)
        return total

    return run


def _train_epoch(data: Dataset, model: torch.nn.Module) -> Callable[[], Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run() -> None:
        model.train()
        for x, y in train_batches(data, BATCH, torch.Generator().manual_seed(0)):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def _test_pass(data: Dataset, model: torch.nn.Module) -> Callable[[], Any]:
    def run() -> torch.Tensor:
        model.eval()
        return predict_probs(model, data, "test")

    return run


def _ways(held: Dataset, streamed: dict[int, Dataset]) -> dict[str, Dataset]:
    return {"in memory": held, **{f"streamed, {w} worker{'s' * (w != 1)}": d for w, d in streamed.items()}}


def _measure(name: str, ways: dict[str, Dataset], architecture: dict[str, Any], rounds: int) -> tuple[list, dict]:
    rows, data = [], {}
    timings = {}
    for kind in ("data epoch", "train epoch", "test pass"):
        cases = {}
        for way, ds in ways.items():
            torch.manual_seed(0)
            model = build_model(architecture["name"], ds.num_classes, **architecture.get("kwargs", {}))
            make = {"data epoch": lambda d=ds: _data_epoch(d), "train epoch": lambda d=ds, m=model: _train_epoch(d, m),
                    "test pass": lambda d=ds, m=model: _test_pass(d, m)}[kind]
            cases[way] = make()
        timings[kind] = common.interleaved(cases, rounds=rounds, min_sample_s=0.0, max_calls=1, warmup=1)
    for way in ways:
        base = {k: timings[k]["in memory"].value for k in timings}
        rows.append([name, way, *(f"{timings[k][way].value:.3f}" for k in timings),
                     f"{timings['train epoch'][way].value / base['train epoch']:.2f}",
                     timings["train epoch"][way].quiet_count])
        data[way] = {k: timings[k][way].as_dict() for k in timings}
    return rows, data


def _cold_start(build: Callable[[], Dataset]) -> float:
    """Seconds of the first data epoch of a freshly built streamed data set (workers start)."""
    data = build()
    started = time.perf_counter()
    _data_epoch(data)()
    return time.perf_counter() - started


def _cold_in_worker(spec: dict[str, Any], start_method: str | None) -> float:
    """`_cold_start` in a `--jobs` worker (run_jobs), its loader workers started by
    `start_method` (None: the worker's own default, the command's since the pool sets it)."""
    if start_method is not None:
        multiprocessing.set_start_method(start_method, force=True)
    return _cold_start(lambda: build_dataset("image_folder", **spec))


def _jobs_section(run: dict[str, Any], spec: dict[str, Any], rounds: int) -> None:
    from modeconn.training.core.distributed import Job, run_jobs

    jobs = [Job(_cold_in_worker, (spec, "spawn")), Job(_cold_in_worker, (spec, None))]
    samples = [run_jobs(jobs, 2, torch.device("cpu")) for _ in range(rounds)]
    spawned, inherited = (sorted(s[i] for s in samples) for i in (0, 1))
    common.add_section(
        run, f"First data epoch of the digits folder inside a `--jobs` worker ({spec['num_workers']} loader workers)",
        ["loader workers started by", "seconds (median)", "all samples"],
        [["spawn (a spawned pool worker's default, what jobs did before)", common.median(spawned),
          ", ".join(f"{v:.2f}" for v in spawned)],
         [f"the command's default ({multiprocessing.get_start_method()})", common.median(inherited),
          ", ".join(f"{v:.2f}" for v in inherited)]],
        notes="Both jobs side by side in one run_jobs pool of 2 (the way `compare --jobs 2` runs its sub-runs), "
              "each round a fresh pool. Every streamed split's first pass, and every pass nested in another "
              "(BN recomputation and snapshot evaluation inside an FGE epoch), starts its loader workers.")


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="streamed worker counts (default 0 1 2)")
    parser.add_argument("--rounds", type=int, default=None, help="samples of each timing (default 7; --quick 2)")
    args = parser.parse_args()
    workers = args.workers or ([1] if args.quick else [0, 1, 2])
    rounds = args.rounds or (2 if args.quick else 7)
    run = common.start_run("data_streaming")
    run["quick"], run["command"], run["threads"] = args.quick, common.command_line(), torch.get_num_threads()
    rows, data, cold = [], {}, []

    demo = dataset_spec(load_config(common.ROOT / "configs" / "mnist1d.yaml").data)
    held = load_data(demo, "cpu")
    streamed = {w: held.streamed_copy(num_workers=w) for w in workers}
    r, d = _measure("demo (MNIST-1D)", _ways(held, streamed), {"name": "cnn1d"}, rounds)
    rows += r
    data["demo"] = d
    cold.append(["demo (MNIST-1D)", f"{_cold_start(lambda: load_data({**demo, 'in_memory': False, 'num_workers': max(workers)}, 'cpu')):.2f}"])

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_digits_folder(Path(tmp) / "digits")
        spec = {"root": folder.root, "val_size": 180, "channels": 3}  # the registered PreResNet takes RGB
        held = build_dataset("image_folder", in_memory=True, **spec)
        streamed = {w: build_dataset("image_folder", num_workers=w, **spec) for w in workers}
        r, d = _measure("digits folder (PNG)", _ways(held, streamed), {"name": "preresnet", "kwargs": {"depth": 8}},
                        rounds)
        rows += r
        data["digits"] = d
        cold.append(["digits folder (PNG)",
                     f"{_cold_start(lambda: build_dataset('image_folder', num_workers=max(workers), **spec)):.2f}"])

    common.add_section(
        run, f"Epoch time, in memory vs streamed (batch {BATCH}, {torch.get_num_threads()} torch threads)",
        ["data set", "held", "data epoch s", "train epoch s", "test pass s", "train epoch vs in memory", "quiet"],
        rows, data=data,
        notes="Median seconds over the quiet samples (benchmarks/common.py). Data epoch: batches only; train epoch: "
              "SGD steps on them; test pass: softmax over the test split (demo 12,000 signals, digits 449 images). "
              "Streamed: a DataLoader over the split with that many worker processes (0: read in this process), "
              "persistent across epochs; the digits are decoded from PNG every epoch.")
    common.add_section(run, f"First epoch of a fresh streamed data set ({max(workers)} workers: they start)",
                       ["data set", "seconds"], cold)
    if max(workers) > 0:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_digits_folder(Path(tmp) / "digits")
            _jobs_section(run, {"root": folder.root, "val_size": 180, "channels": 3, "num_workers": max(workers)},
                          rounds)
    common.write_results(run, out_dir=args.out)


if __name__ == "__main__":
    main()
