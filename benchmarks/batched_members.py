"""Many members in one pass: training examples/s of K networks batched (training/batched.py
`BatchedNetworks`: stacked parameters, vmap + functional_call, one SGD over the stack) against
the same K networks trained one after another (one plain SGD step each, as `fit` steps), for
K = 1, 2, 4, 8, on the same threads, timed round-robin (benchmarks/common.py).

- CPU (default): the demo network (configs/mnist1d.yaml: cnn1d with BatchNorm) on the demo's
  MNIST-1D batches of 128, each member its own seed and its own batches.
- `--device cuda`: PreResNet-20 (the registry's `preresnet`, depth 20) on random CIFAR-shaped
  batches (128 x 3 x 32 x 32, 10 classes), synchronised after every call.
- `--end-to-end` (CPU): one epoch of the demo for the largest K: `train_members` (one pass,
  evaluation and checkpoints included) against K `train_network` runs, wall-clock, one sample
  each (read it with the load average it records).

Usage: python benchmarks/batched_members.py [--quick] [--threads N] [--members 1 2 4 8]
       [--device cpu|cuda] [--end-to-end]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F

from modeconn.models import build_model
from modeconn.training.batched import BatchedNetworks, train_members
from modeconn.training.core.config import load_config
from modeconn.training.core.data import train_batches
from modeconn.training.core.networks import dataset_spec, load_data
from modeconn.training.train import train_network

CONFIG = common.ROOT / "configs" / "mnist1d.yaml"
BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
POOL = 8  # distinct batches per member, cycled


def demo_setup(device: torch.device) -> tuple[Callable[[int], torch.nn.Module], Callable[[int], list]]:
    """(network of seed s, that seed's batches) for the demo."""
    config = load_config(CONFIG, {"device": device.type})
    data = load_data(dataset_spec(config.data), device)

    def network(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(config.model.name, num_classes=data.num_classes, **config.model.kwargs).to(device)

    def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stream = train_batches(data, BATCH, torch.Generator().manual_seed(seed + 1))
        return [next(stream) for _ in range(POOL)]

    return network, batches


def cifar_setup(device: torch.device) -> tuple[Callable[[int], torch.nn.Module], Callable[[int], list]]:
    """(PreResNet-20 of seed s, random CIFAR-shaped batches of seed s)."""
    def network(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model("preresnet", num_classes=10, depth=20).to(device)

    def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed + 1)
        return [(torch.randn(BATCH, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (BATCH,), generator=g).to(device))
                for _ in range(POOL)]

    return network, batches


def cases_for(k: int, network: Callable, batches: Callable, device: torch.device) -> dict[str, Callable[[], None]]:
    """One call of each: K plain steps one after another, and one batched step of K members."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pools = [batches(s) for s in range(k)]
    plain = []
    for s in range(k):
        net = network(s).train()
        plain.append((net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)))
    stacked_x = [torch.stack([pools[s][i][0] for s in range(k)]) for i in range(POOL)]
    stacked_y = [torch.stack([pools[s][i][1] for s in range(k)]) for i in range(POOL)]
    batched = BatchedNetworks([network(s) for s in range(k)], LR, MOMENTUM, WEIGHT_DECAY)
    position = {"plain": 0, "batched": 0}

    def sequential() -> None:
        i = position["plain"] % POOL
        position["plain"] += 1
        for (net, opt), pool in zip(plain, pools, strict=True):
            x, y = pool[i]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()

    def together() -> None:
        i = position["batched"] % POOL
        position["batched"] += 1
        batched.step(stacked_x[i], stacked_y[i], LR)
        sync()

    return {f"sequential K={k}": sequential, f"batched K={k}": together}


def step_section(run: dict[str, Any], args: Any, device: torch.device) -> None:
    network, batches = (cifar_setup if device.type == "cuda" else demo_setup)(device)
    rows, data = [], {}
    for k in args.members:
        cases = cases_for(k, network, batches, device)
        samples = common.interleaved(cases, rounds=args.rounds, min_sample_s=args.min_sample_s)
        seq, bat = samples[f"sequential K={k}"], samples[f"batched K={k}"]
        rows.append([k, k * BATCH / seq.value, k * BATCH / bat.value, seq.value / bat.value,
                     f"{seq.quiet_count} / {bat.quiet_count}", common.spread(bat)])
        data[k] = {name: s.as_dict() for name, s in samples.items()}
    what = "demo cnn1d on MNIST-1D" if device.type == "cpu" else "PreResNet-20 on random CIFAR-shaped inputs"
    common.add_section(
        run, f"Training steps: {what}, batch {BATCH} per member, {device.type}"
        + (f", {args.threads} thread(s)" if device.type == "cpu" else ""),
        ["K", "sequential examples/s", "batched examples/s", "batched / sequential", "quiet samples", "batched spread"],
        rows,
        notes="One call: one SGD step of every member (forward, loss, backward, momentum SGD with weight "
              "decay), K plain networks one after another vs one batched step; the median of the quiet samples.",
        data=data)


def bound_section(run: dict[str, Any], args: Any, device: torch.device) -> None:
    """The most batching could give: ONE network's step on a batch K times larger against K
    steps of BATCH (the same examples). Stacking K members makes a wider network, which at best
    runs as fast per example as this larger batch."""
    network, batches = (cifar_setup if device.type == "cuda" else demo_setup)(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net = network(0).train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    pool = batches(0)
    rows, data = [], {}
    for k in [k for k in args.members if k > 1]:
        big = [(torch.cat([x for x, _ in pool[i:i + k]]), torch.cat([y for _, y in pool[i:i + k]]))
               for i in range(0, len(pool) - k + 1, k)]

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def small(k: int = k) -> None:
            for x, y in pool[:k]:
                step(x, y)
            sync()

        def large(big: list = big) -> None:
            step(*big[0])
            sync()

        samples = common.interleaved({f"{k} x {BATCH}": small, f"1 x {k * BATCH}": large}, rounds=args.rounds,
                                     min_sample_s=args.min_sample_s)
        a, b = samples[f"{k} x {BATCH}"], samples[f"1 x {k * BATCH}"]
        rows.append([k, k * BATCH / a.value, k * BATCH / b.value, a.value / b.value])
        data[k] = {name: x.as_dict() for name, x in samples.items()}
    common.add_section(
        run, "The bound: one network, K steps of one batch against one step of a K times larger batch",
        ["K", f"K steps of {BATCH}: examples/s", f"one step of K x {BATCH}: examples/s", "large / small"], rows,
        notes="A batched pass of K members is a K times wider network; it cannot beat the larger batch's "
              "examples/s by much, so a ratio near 1 here leaves nothing for batching to win.",
        data=data)


def step_flops_per_example(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step (forward, loss, backward) per example, by torch's FLOP counter
    (2 x multiply-adds of convolutions, linear layers and matmuls; elementwise work uncounted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() // len(y)


def roofline_section(run: dict[str, Any], args: Any, device: torch.device) -> dict[str, Any]:
    """How close one plain step already is to the machine's arithmetic rate: the step's FLOPs
    times its examples/s against the best square matmul on the same threads. Batching K members
    changes the shapes, not the FLOPs per example, so peak / achieved bounds what it can win."""
    network, batches = demo_setup(device)
    plain = cases_for(1, network, batches, device)["sequential K=1"]
    seconds = common.interleaved({"plain step": plain}, rounds=args.rounds, min_sample_s=args.min_sample_s)
    net, (x, y) = network(0).train(), batches(0)[0]
    flops = step_flops_per_example(net, x, y)
    achieved = flops * BATCH / seconds["plain step"].value / 1e9
    peak = common.matmul_peak(args.threads, quick=args.quick)
    ceiling = peak["gflops"] / achieved
    common.add_section(
        run, f"The roofline: one plain demo step against this machine's matmul rate, {args.threads} thread(s)",
        ["training FLOPs per example", "plain step GFLOP/s", "best matmul GFLOP/s", "step / matmul",
         "most any batching can give"],
        [[f"{flops / 1e6:.2f} M", achieved, f"{peak['gflops']} ({peak['by']})", achieved / peak["gflops"],
          f"{ceiling:.2f}x"]],
        notes="FLOPs counted by torch.utils.flop_counter (convolutions, linear layers: forward and backward), "
              "the plain step timed again here (median of quiet samples); the matmul rate is the best of torch.mm and numpy on 1024 and 2048 "
              "square matrices, the same threads. A batched pass does the same FLOPs per example, so its speed-up "
              "over the plain step is at most matmul / step (and reaching the matmul rate with 5-wide 1D "
              "convolutions of 32-64 channels is not to be expected).",
        data={"flops_per_example": flops, "achieved_gflops": achieved, "matmul": peak})
    return {"flops_per_example": flops, "achieved_gflops": achieved, "matmul": peak}


def compare_floor_section(run: dict[str, Any], args: Any, flops_per_example: int) -> None:
    """The least time `compare` could take on this machine: the training examples its finished
    run folder shows (every sub-run's metrics.jsonl, the epoch rows times the training set)
    times the step's FLOPs, at the best matmul rate on all the machine's cores."""
    config = load_config(CONFIG, {"device": "cpu"})
    train_size = len(load_data(dataset_spec(config.data), "cpu").y_train)
    epochs = sum(sum(1 for line in p.read_text().splitlines() if line.strip())
                 for p in sorted(Path(args.compare_run).rglob("metrics.jsonl")))
    summary = json.loads((Path(args.compare_run) / "compare.json").read_text())
    cores = run["machine"]["cores"]
    peak = common.matmul_peak(cores, quick=args.quick)
    torch.set_num_threads(args.threads)
    total = epochs * train_size * flops_per_example
    common.add_section(
        run, f"compare's floor on this machine ({args.compare_run})",
        ["training epochs", "examples", "training TFLOP", f"best matmul GFLOP/s, {cores} threads",
         "floor s (training at the matmul rate)", "compare took s"],
        [[epochs, epochs * train_size, total / 1e12, peak["gflops"], total / peak["gflops"] / 1e9,
          summary["seconds"]]],
        notes="Training only (evaluation forward passes uncounted), so the true floor is higher. The run's "
              "epochs are counted from its own files: every sub-run's metrics.jsonl rows.",
        data={"epochs": epochs, "train_size": train_size, "matmul": peak, "compare_seconds": summary["seconds"]})


def end_to_end_section(run: dict[str, Any], args: Any) -> None:
    k = max(args.members)
    config = load_config(CONFIG, {"device": "cpu", "train.epochs": 1, "train.save_every": 1})
    configs = [config.model_copy(update={"seed": s}) for s in range(k)]
    root = Path(tempfile.mkdtemp(prefix="batched-members-"))
    try:
        load_data(dataset_spec(config.data), "cpu")  # the data cache filled before timing
        started, load_before = time.perf_counter(), common.load_average()
        train_members(configs, [root / f"batched-{s}" for s in range(k)])
        batched = time.perf_counter() - started
        started = time.perf_counter()
        for c in configs:
            train_network(c, root / f"sequential-{c.seed}")
        sequential = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    examples = k * len(load_data(dataset_spec(config.data), "cpu").y_train)
    common.add_section(
        run, f"One demo epoch of {k} networks, end to end (evaluation and checkpoints included)",
        ["K", "sequential s", "batched s", "sequential examples/s", "batched examples/s", "batched / sequential",
         "load before", "load after"],
        [[k, sequential, batched, examples / sequential, examples / batched, sequential / batched, load_before,
          common.load_average()]],
        notes="One sample each, batched first: `train_members` against K `train_network` runs.")


def main() -> None:
    parser = common.arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8], help="the K values")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--end-to-end", action="store_true", help="also one demo epoch end to end (CPU)")
    parser.add_argument("--compare-run", type=Path, default=None,
                        help="a finished `modeconn compare` folder of the demo: also its floor on this machine (CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.quick:
        args.members = [k for k in args.members if k <= 2] or [1, 2]
    args.rounds, args.min_sample_s = (2, 0.05) if args.quick else (7, 0.5)
    torch.set_num_threads(args.threads)
    name = "batched_members" + ("-cuda" if device.type == "cuda" else "")
    run = common.start_run(name)
    run.update(quick=args.quick, command=common.command_line(), threads=args.threads, device=args.device)
    if device.type == "cuda":
        run["gpu"] = torch.cuda.get_device_name()
    step_section(run, args, device)
    bound_section(run, args, device)
    if device.type == "cpu":
        roofline = roofline_section(run, args, device)
        if args.compare_run is not None:
            compare_floor_section(run, args, roofline["flops_per_example"])
    if args.end_to_end and device.type == "cpu":
        end_to_end_section(run, args)
    summary = ("Target on a quiet 2-core CPU: K = 8 at >= 3x the sequential examples/s; on a lent GPU the same "
               "for PreResNet-20." + (f" GPU: {run['gpu']}." if "gpu" in run else ""))
    common.write_results(run, summary, args.out)


if __name__ == "__main__":
    main()
