"""Training throughput over 1 and 2 processes: images/s of the real loop.

For each world size W (torchrun --nproc_per_node=W, gloo on CPUs; one thread per process),
`training.core.loop.fit` trains on synthetic CIFAR-shaped tensors (crop/flip augmentation on,
global batch 128) and the second epoch's seconds give images/s:
- plain: a network (`modeconn train`),
- curve: a Bezier curve with 3 bends around it (`modeconn curve`: CurveModel, its L2 term, one t
  per global step from a shared generator),
- fge: the plain step with FGE's cyclical LR plus, once per epoch (one cycle), the BN
  re-estimation of a copy over the training set that every snapshot costs, split over the ranks.

PreResNet-164 (1.7 M parameters, 164 layers) is too slow on one CPU core for that: its rows use a
global batch of 32 and 4 steps per epoch (so the second epoch is 4 global steps), which is
enough to see the 1 vs 2 process ratio. The precision / channels_last / compile options on the CPU
are in benchmarks/training_steps.py --options-only; GPU rows (fp32 vs bf16 vs bf16 + compile)
need a GPU machine; they are not measured here.

Usage: python benchmarks/distributed_steps.py [--quick] (the parent starts the torchrun workers)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from modeconn.models import build_model
from modeconn.training.core import distributed
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import FitPlan, fit
from modeconn.training.core.schedules import fge_learning_rate
from modeconn.training.curves.model import CurveModel

BATCH = 128


def synthetic_cifar(rows: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(rows, 3, 32, 32, generator=g), torch.randint(0, 10, (rows,), generator=g)
    return Dataset("synthetic-cifar", x, y, x[:0], y[:0], x[:0], y[:0], [0.5] * 3, [0.25] * 3,
                   [str(i) for i in range(10)], augment="crop_flip")


def epoch_seconds(kind: str, depth: int, data: Dataset, run_dir: Path, batch: int = BATCH) -> float:
    """Seconds of the second of two epochs of `kind` (the first warms up)."""
    torch.manual_seed(0)
    net = build_model("preresnet", num_classes=10, depth=depth)
    model, loss_fn, after_step = net, None, None
    steps = -(-len(data.y_train) // batch)
    if kind == "curve":
        ends = [build_model("preresnet", num_classes=10, depth=depth).state_dict() for _ in range(2)]
        model = CurveModel(net, ends[0], ends[1], "bezier", 3)
        t_gen = torch.Generator().manual_seed(0)

        def loss_fn(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = m(x, torch.rand((), generator=t_gen))
            return F.cross_entropy(logits, y) + 0.5 * 3e-4 * distributed.unwrap(m).last_l2, logits
    elif kind == "fge":
        def after_step(iteration: int, epoch: int) -> None:
            if iteration % steps == steps // 2:  # a snapshot per cycle of one epoch
                recompute_bn(copy.deepcopy(net), data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.0 if kind == "curve" else 3e-4)
    lr = (lambda e, i: fge_learning_rate(i, 2 * steps, 0.05, 0.01)) if kind == "fge" else (lambda e, i: 0.05)
    plan = FitPlan(epochs=2, batch_size=batch, learning_rate=lr, seed=1, description=f"{kind} preresnet{depth}",
                   save_every=100, after_step=after_step, **({"loss_fn": loss_fn} if loss_fn else {}))
    rows = fit(plan, run_dir=run_dir, model=model, optimizer=optimizer, data=data, checkpoint_fields={})
    return rows[-1]["seconds"]


# depth -> (global batch, steps per epoch): PreResNet-164 gets small batches and few steps
SETUPS = {20: (BATCH, 8), 164: (32, 4)}


def worker(out: Path, quick: bool, depths: list[int]) -> None:
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"), "gloo")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shared = distributed.all_gather_objects(tmp)[0]  # rank 0's folder: only rank 0 writes
        for depth in depths:
            batch, steps = SETUPS[depth]
            data = synthetic_cifar(batch * (min(steps, 4) if quick else steps))
            for kind in ("plain", "curve", "fge"):
                seconds = epoch_seconds(kind, depth, data, Path(shared) / f"{kind}{depth}", batch)
                results[f"{kind}{depth}"] = {"seconds": seconds, "images_per_s": len(data.y_train) / seconds,
                                              "rows": len(data.y_train), "batch": batch}
        distributed.barrier()
    if distributed.is_main():
        out.write_text(json.dumps({"world": distributed.world_size(), **results}))
    distributed.shutdown()


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 164], choices=sorted(SETUPS))
    args = parser.parse_args()
    run = common.start_run("distributed_steps")
    run["quick"], run["command"] = args.quick, common.command_line()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": str(common.ROOT), "OMP_NUM_THREADS": "1"}
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = Path(tmp) / f"world-{world}.json"
            cmd = [torchrun, "--standalone", f"--nproc_per_node={world}", __file__, "--worker", str(out),
                   "--depths", *map(str, args.depths)]
            subprocess.run([*cmd, *(["--quick"] if args.quick else [])], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            measured[world] = json.loads(out.read_text())
    for depth in args.depths:
        keys = [f"{kind}{depth}" for kind in ("plain", "curve", "fge")]
        rows = [[key.removesuffix(str(depth)), measured[1][key]["images_per_s"], measured[2][key]["images_per_s"],
                 measured[2][key]["images_per_s"] / measured[1][key]["images_per_s"]] for key in keys]
        first = measured[1][keys[0]]
        common.add_section(
            run, f"PreResNet-{depth}, CIFAR-shaped (synthetic), global batch {first['batch']}, CPU, 1 thread per process",
            ["step", "images/s, 1 process", "images/s, 2 processes (gloo)", "speed-up"], rows,
            notes=(f"{first['rows']} images per epoch; the second of two epochs of training.core.loop.fit. "
                   "With 2 processes on a 2-core machine each process gets one core."),
            data={world: {k: measured[world][k] for k in keys} for world in measured})
    common.write_results(run, out_dir=args.out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        depths = [int(d) for d in sys.argv[sys.argv.index("--depths") + 1:] if d.isdigit()]
        worker(Path(sys.argv[sys.argv.index("--worker") + 1]), "--quick" in sys.argv, depths)
    else:
        main()
