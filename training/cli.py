"""The `modeconn` command line: one subcommand per stage, all sharing the common options
`--config`, `--out`, `--seed`, `--device`, `--resume`, `--force`, `--set`, `--json`.
Without `--config` a command runs the built-in defaults, which are the demo's settings
(configs/mnist1d.yaml spells them out), into runs/demo/.

`train`, `curve`, `fge` and `sse` also run under `torchrun --nproc_per_node=N` (one
optimisation over N processes, training/core/distributed.py); the other commands run as one process.
Every command computes with its share of the usable cores (modeconn/contract/threads.py;
MODECONN_THREADS overrides it), its idle OpenMP threads sleeping rather than spinning.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modeconn.contract import threads

# before torch is imported: its OpenMP runtime reads the wait policy once, when it loads
threads.wait_passively(when_shared=True)

from modeconn.contract.errors import ModeconnError  # noqa: E402
from modeconn.training.core import distributed  # noqa: E402
from modeconn.training.core.config import (  # noqa: E402
    DEMO_CONFIG_FILE,
    Config,
    ConfigError,
    config_origin,
    load_config,
    parse_set_overrides,
)

DISTRIBUTED_COMMANDS = ("train", "curve", "fge", "sse")
CONFIG_HELP = (f"YAML config (default: the built-in defaults, which are the demo's settings, as {DEMO_CONFIG_FILE}; "
               "a file gives what differs)")
DEVICES = ["auto", "cpu", "cuda"]


def _add_device(p: argparse.ArgumentParser) -> None:
    """--device of the commands that only evaluate: auto (CUDA when there is one) by default."""
    p.add_argument("--device", choices=DEVICES, default="auto")


def _common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--config", type=Path, help=CONFIG_HELP + "; its model section names the network: "
                        "name (a registered one, torchvision:NAME, timm:NAME) or factory "
                        "('package.module:callable', any nn.Module; docs/own-model.md)")
    parser.add_argument("--out", type=Path, default=None, help=f"run directory (default: runs/NAME/{default_out})")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config)")
    parser.add_argument("--device", choices=DEVICES, help="training device")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="start over: delete what modeconn wrote in --out (a folder it made; anything else there "
                             "is kept, and a folder it did not make is refused)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.lr=0.05")
    parser.add_argument("--json", action="store_true", help="print one JSON object (paths, metrics) as the last line")
    parser.set_defaults(default_out=default_out)
    _step_options(parser)


def _step_options(parser: argparse.ArgumentParser) -> None:
    """The training step's options (config `step` section, `tensorboard`), for every training stage."""
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="overrides step.precision: autocast of the forward pass (loss, BN re-estimation and "
                             "evaluation stay fp32; fp16 adds a GradScaler); default fp32")
    parser.add_argument("--channels-last", action="store_true", default=None,
                        help="step.channels_last: NHWC memory layout for image models (4-D inputs)")
    parser.add_argument("--compile", action="store_true", default=None, help="step.compile: torch.compile the step")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also log each epoch's metrics as TensorBoard events in RUN/tensorboard")


def _step_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"step.precision": args.precision, "step.channels_last": args.channels_last,
            "step.compile": args.compile, "tensorboard": args.tensorboard}


def overrides_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The common flags, the command's own (`overrides`) and --set pairs, as dotted overrides."""
    return {"seed": args.seed, "device": args.device, **_step_overrides(args), **(overrides or {}),
            **parse_set_overrides(args.set)}


def config_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    """--config (None: the built-in defaults, the demo's) with every override the command line gives."""
    return load_config(args.config, overrides_from_args(args, overrides))


def run_dir_from_args(args: argparse.Namespace, name: str) -> Path:
    """--out, else runs/NAME/COMMAND (NAME: the config's `name`, `demo` for the built-in defaults)."""
    return args.out if args.out is not None else Path("runs") / name / args.default_out


# ---------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one network (an independent run)")
    _common(p, "train")
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument("--lr", type=float, help="overrides train.lr")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.train import train_network

    config = config_from_args(args, {"train.epochs": args.epochs, "train.lr": args.lr})
    return train_network(config, run_dir_from_args(args, config.name), resume=args.resume, force=args.force)


# ---------------------------------------------------------------- curves
def _add_curve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curve", help="fit a Bezier or PolyChain curve between two trained networks")
    _common(p, "curve")
    p.add_argument("--start", type=Path, required=True,
                   help="checkpoint of the first endpoint w0, or weights trained elsewhere (a state_dict .pt or a "
                        ".safetensors file of the config's model, on its data)")
    p.add_argument("--end", type=Path, required=True, help="checkpoint or weights file of the second endpoint w1")
    p.add_argument("--curve", choices=["bezier", "polychain"], help="overrides curve.curve")
    p.add_argument("--num-bends", type=int, help="overrides curve.num_bends (3 in the paper)")
    p.add_argument("--epochs", type=int, help="overrides curve.epochs")
    p.add_argument("--lr", type=float, help="overrides curve.lr")
    p.add_argument("--init", choices=["linear", "random"], help="interior bends: on the line (default) or random")
    p.add_argument("--free-start", action="store_true", help="train the start point too")
    p.add_argument("--free-end", action="store_true", help="train the end point too")
    p.add_argument("--align", action="store_true",
                   help="permute --end's hidden units to match --start first (weight matching, as `modeconn align`); "
                        "the aligned end is saved in the run folder as aligned-end.pt and the curve ends there")
    p.set_defaults(handler=_curve)


def _curve(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.curves.fit import fit_curve

    config = config_from_args(args, {
        "curve.curve": args.curve, "curve.num_bends": args.num_bends, "curve.epochs": args.epochs,
        "curve.lr": args.lr, "curve.init": args.init,
        "curve.fix_start": False if args.free_start else None, "curve.fix_end": False if args.free_end else None,
    })
    return fit_curve(config, args.start, args.end, run_dir_from_args(args, config.name), resume=args.resume,
                     force=args.force, align=args.align)


def _add_simplex(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simplex", help="fit a simplex of low loss through trained networks, or grow one from one network (ESPRO)",
        description="Benton et al. (ICML 2021): the networks given are fixed vertices; simplex.vertices trained "
                    "vertices are added one at a time (each from the centroid, the earlier ones frozen), trained on "
                    "the loss at points drawn uniformly on the simplex minus λ·log of its squared volume "
                    "(Cayley-Menger). One network: ESPRO's simplex around it; several: one simplex through them, "
                    "or with --connecting the paper's mode-connecting complex. Then error and NLL at the vertices, "
                    "the centre and sampled points (BN recomputed at each) into simplex.json/.csv, and the "
                    "ensemble of sampled points (saved as RUN/snapshots/, so ensemble-eval and export take the "
                    "run) into ensemble.json/.csv.",
    )
    _common(p, "simplex")
    p.add_argument("--runs", type=Path, nargs="+", required=True, metavar="CKPT",
                   help="checkpoints of the trained networks (fixed vertices), or weights trained elsewhere (a "
                        "state_dict .pt or a .safetensors file of the config's model, on its data)")
    p.add_argument("--vertices", type=int, help="overrides simplex.vertices (trained vertices added)")
    p.add_argument("--epochs", type=int, help="overrides simplex.epochs (per trained vertex)")
    p.add_argument("--lr", type=float, help="overrides simplex.lr")
    p.add_argument("--volume-weight", type=float, help="overrides simplex.volume_weight (λ)")
    p.add_argument("--connecting", action="store_true", default=None,
                   help="simplex.connecting: one simplex per network, each with every trained vertex")
    p.set_defaults(handler=_simplex)


def _simplex(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.simplex.fit import fit_simplex

    config = config_from_args(args, {
        "simplex.vertices": args.vertices, "simplex.epochs": args.epochs, "simplex.lr": args.lr,
        "simplex.volume_weight": args.volume_weight, "simplex.connecting": args.connecting,
    })
    return fit_simplex(config, args.runs, run_dir_from_args(args, config.name), resume=args.resume, force=args.force)


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "align", help="permute a network's hidden units to match another's (weight matching)",
        description="Git Re-Basin weight matching: the permutation groups are derived from the network's graph "
                    "(torch.fx); --end's units are permuted to match --start's and saved as an ordinary checkpoint "
                    "computing the same function as --end, with an `alignment` record.",
    )
    p.add_argument("--start", type=Path, required=True, help="checkpoint of the network to match (A)")
    p.add_argument("--end", type=Path, required=True, help="checkpoint of the network to permute (B)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (B aligned to A)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the groups are visited in")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(handler=_align)


def _align(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.curves.align import align_checkpoints

    return align_checkpoints(args.start, args.end, args.out, seed=args.seed)


def _add_layer_barrier(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layer-barrier", help="the barrier between two networks when one layer (or block) is interpolated at a time",
        description="For each layer (every module with parameters) or block (every top-level child), only its "
                    "parameters go from A's to B's while the rest stay A's; BN statistics recomputed at each point. "
                    "The barrier is the largest rise above the straight line between that path's ends, in train "
                    "NLL and held-out error; the row (all) is the whole straight line. Writes layer_barrier.json, "
                    ".csv and .png.",
    )
    p.add_argument("--start", type=Path, required=True, help="checkpoint of network A (the rest stays A's)")
    p.add_argument("--end", type=Path, required=True, help="checkpoint of network B")
    p.add_argument("--by", choices=["layer", "block"], default="layer", help="what is interpolated at a time")
    p.add_argument("--points", type=int, default=11, help="evenly spaced α in [0, 1] per group")
    p.add_argument("--split", choices=["test", "val"], default="test", help="where the error is measured")
    p.add_argument("--align", action="store_true", help="permute B's hidden units to match A's first (weight matching)")
    p.add_argument("--out", type=Path, required=True, help="folder the layer_barrier.* reports go into")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(handler=_layer_barrier)


def _layer_barrier(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.curves.layerwise import evaluate_layer_barriers

    return evaluate_layer_barriers(args.start, args.end, args.out, points=args.points, by=args.by,
                                   split=args.split, align=args.align, device=args.device)


def _add_eval_curve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-curve", help="evaluate a curve (and the straight line) at evenly spaced t")
    p.add_argument("run", type=Path, help="curve run directory or its final.pt")
    p.add_argument("--points", type=int, default=61, help="number of evenly spaced t (61 as in the paper)")
    p.add_argument("--out", type=Path, help="where curve.json/csv/png go (default: the run directory)")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the summaries as one JSON line")
    p.set_defaults(handler=_eval_curve)


def _eval_curve(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.curves.evaluate import evaluate_curve

    if args.points < 2:
        raise ConfigError(f"--points must be at least 2, got {args.points}")
    return evaluate_curve(args.run, points=args.points, out_dir=args.out, device=args.device)


def _add_curve_point(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curve-point", help="save φ(t) (BN recomputed) as an ordinary network checkpoint")
    p.add_argument("run", type=Path, help="curve run directory or its final.pt")
    p.add_argument("--t", type=float, required=True, help="the point, in [0, 1]")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    _add_device(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_curve_point)


def _curve_point(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.curves.evaluate import save_curve_point

    return save_curve_point(args.run, args.t, args.out, device=args.device)


def _add_plane(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plane", help="train loss and test error over the plane through a 3-bend curve's w0, θ, w1 (or three networks)",
        description="The plane through w0, θ and w1 (orthonormal basis as dnn-mode-connectivity's plane.py) on a "
                    "G x G grid whose lines pass exactly through the three networks, BN recomputed at every point; "
                    "writes plane.png (contours with the curve and the straight line), plane.npz, plane.csv and "
                    "plane.json.",
    )
    p.add_argument("run", type=Path, nargs="?", help="curve run directory (3 bends) or its final.pt")
    p.add_argument("--points", type=Path, nargs=3, metavar=("A", "B", "C"),
                   help="instead of a curve: three network checkpoints (A = w0, B = θ, C = w1)")
    p.add_argument("--grid", type=int, default=21, help="grid points per axis (21 as the official plane.py)")
    p.add_argument("--margin", type=float, default=0.2, help="margin on each side, a fraction of the points' extent")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="where the error is measured: test (default), or val (the official plane.py's default; "
                        "on the demo 1,000 signals instead of 12,000, about 3x faster)")
    p.add_argument("--out", type=Path, help="where plane.* go (default: the curve's run directory; needed with --points)")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.set_defaults(handler=_plane)


def _plane(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.curves.plane import make_plane

    return make_plane(args.run, args.points, grid=args.grid, margin=args.margin, out_dir=args.out, device=args.device,
                      split=args.split)


# ---------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export members, the fused ensemble and a curve to ONNX + manifest")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="FGE/SSE run dirs (their snapshots), train runs or checkpoints (members), one curve run")
    p.add_argument("--name", default=None, help="BentoML model name (default: export.name, the demo's)")
    p.add_argument("--out", type=Path, help="write the artifact to this folder instead of the BentoML store (new, empty, "
                   "or an earlier artifact with nothing else in it, which is replaced)")
    p.add_argument("--config", type=Path, help="YAML config whose export section is used")
    p.add_argument("--bn-grid-points", type=int, help="t grid for the curve's BN statistics (default 61)")
    p.add_argument("--swa", type=Path, metavar="CHECKPOINT",
                   help="also export this network (e.g. `modeconn swa`'s swa.pt; the members' architecture and data "
                        "set) as swa.onnx, served by /predict with \"model\": \"swa\"")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.export import export_runs

    merged = {"export.name": args.name, "export.bn_grid_points": args.bn_grid_points, **parse_set_overrides(args.set)}
    return export_runs(args.runs, load_config(args.config, merged).export, out=args.out, swa=args.swa)


# ---------------------------------------------------------------- FGE, SSE, ensembles
def _add_fge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fge", help="Fast Geometric Ensembling from a trained network",
        description="FGE from an epoch checkpoint of a train run (weights and momentum buffers: the paper's "
                    "setting, the default in pipeline and compare), or from any network checkpoint without "
                    "optimizer state (final.pt, a snapshot, a curve point) or weights trained elsewhere (a bare "
                    "state_dict saved with torch.save, or a .safetensors file; its architecture and data from the "
                    "config's model and data sections); "
                    "those two start with fresh momentum, which the log and --json ('momentum') say.",
    )
    _common(p, "fge")
    p.add_argument("--from", dest="start", type=Path, required=True, metavar="CKPT",
                   help="e.g. RUN/checkpoints/epoch-0024.pt (momentum kept), RUN/final.pt, a state_dict file or "
                        "a .safetensors file (fresh momentum)")
    p.add_argument("--cycle", type=float, help="overrides fge.cycle_epochs (cycle length in epochs; made even in iterations)")
    p.add_argument("--lr1", type=float, help="overrides fge.lr1 (the LR at a cycle's start and end)")
    p.add_argument("--lr2", type=float, help="overrides fge.lr2 (the LR at the middle, where snapshots are taken; <= lr1)")
    p.add_argument("--epochs", type=float, help="overrides fge.epochs (the budget; may be fractional)")
    p.add_argument("--no-bn-update", action="store_true",
                   help="keep the BN running averages in the snapshots instead of recomputing them")
    p.set_defaults(handler=_fge)


def _fge(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.ensembles.fge import run_fge

    config = config_from_args(args, {
        "fge.cycle_epochs": args.cycle, "fge.lr1": args.lr1, "fge.lr2": args.lr2, "fge.epochs": args.epochs,
        "fge.bn_update": False if args.no_bn_update else None,
    })
    return run_fge(config, args.start, run_dir_from_args(args, config.name), resume=args.resume, force=args.force)


def _add_sse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sse", help="Snapshot Ensembles (cosine restarts) from a fresh network")
    _common(p, "sse")
    p.add_argument("--cycle", type=float, help="overrides sse.cycle_epochs")
    p.add_argument("--lr", type=float, help="overrides sse.lr (the LR at each cycle's start)")
    p.add_argument("--epochs", type=int, help="overrides sse.epochs (the budget)")
    p.set_defaults(handler=_sse)


def _sse(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.ensembles.sse import run_sse

    config = config_from_args(args, {"sse.cycle_epochs": args.cycle, "sse.lr": args.lr, "sse.epochs": args.epochs})
    return run_sse(config, run_dir_from_args(args, config.name), resume=args.resume, force=args.force)


def _add_ensemble_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble-eval", help="evaluate any set of network checkpoints as one ensemble",
        description="Ensemble (mean of softmax outputs) of network checkpoints: train runs' final.pt, "
                    "FGE/SSE snapshots, curve points. A run directory stands for all its snapshots "
                    "(RUN/snapshots/snapshot-*.pt) when it has any, else for its final.pt.",
    )
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CKPT", help="checkpoint file or run directory")
    p.add_argument("--out", type=Path, help="also write ensemble.json and ensemble.csv into this folder")
    p.add_argument("--ood", action="append", metavar="SET",
                   help="an out-of-distribution set to tell from the test inputs (AUROC; repeatable): "
                        "mnist1d-noise, shuffled, auto (the default: the built-in sets that apply to the data "
                        "set), none, or the path of an .npz (array x) / .npy file or folder of inputs")
    p.add_argument("--ood-seed", type=int, default=0, help="seed of the built-in OOD sets (default 0)")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(handler=_ensemble_eval)


def _ensemble_eval(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.ensembles.evaluate import evaluate_checkpoints

    return evaluate_checkpoints(args.checkpoints, device=args.device, out_dir=args.out,
                                ood=args.ood or ["auto"], ood_seed=args.ood_seed)


def _add_swa(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "swa", help="Stochastic Weight Averaging: one network, the average of a run's snapshots or of checkpoints",
        description="The arithmetic mean of the parameters (torch.optim.swa_utils.AveragedModel) of an FGE/SSE "
                    "run's snapshots (a run directory stands for RUN/snapshots/snapshot-*.pt, else its final.pt) "
                    "or of any network checkpoints of one architecture and data set; BatchNorm statistics "
                    "recomputed on the training split (training/core/bn.py); saved as an ordinary checkpoint "
                    "(kind swa, its members listed).",
    )
    p.add_argument("sources", type=Path, nargs="+", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (e.g. swa.pt)")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(handler=_swa)


def _swa(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.ensembles.swa import run_swa

    return run_swa(args.sources, args.out, device=args.device)


def _add_swag(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "swag", help="SWAG: a Gaussian over the weights from an FGE/SSE walk, and an ensemble sampled from it",
        description="Fits SWAG (diagonal + low-rank covariance, Maddox et al. 2019) to an FGE/SSE run's snapshots "
                    "(a run directory stands for them) or to any checkpoints of one network, draws --samples "
                    "networks with BN recomputed into OUT/samples/ (ordinary checkpoints, kind swag: export and "
                    "ensemble-eval take them) and evaluates them as an ensemble (OUT/ensemble.json, swag.json).",
    )
    p.add_argument("sources", type=Path, nargs="+", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    p.add_argument("--out", type=Path, required=True, help="folder for samples/, swag.json and ensemble.json")
    p.add_argument("--samples", type=int, default=8, help="networks to draw (default 8)")
    p.add_argument("--rank", type=int, default=20, help="deviation columns kept: the last K snapshots (default 20)")
    p.add_argument("--scale", type=float, default=1.0, help="covariance scale (the paper's samples: 1; 0.5 is common)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(handler=_swag_command)


def _swag_command(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.ensembles.swag import run_swag

    return run_swag(args.sources, args.out, samples=args.samples, rank=args.rank, scale=args.scale, seed=args.seed,
                    device=args.device)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="the paper's budget table: Ind vs SSE vs FGE ensembles at 1B, 2B, 3B",
        description="Train (or reuse) K independent networks, one FGE run and one SSE run per seed, and "
                    "write compare.md / compare.csv. Always continues what --out holds (finished sub-runs are "
                    "skipped, interrupted ones resumed), so --resume is implied; --force starts over, deleting "
                    "only what the comparison wrote in --out.",
    )
    _common(p, "compare")
    p.add_argument("--budgets", type=int, nargs="+", metavar="K", help="overrides compare.budgets (multiples of B = train.epochs)")
    p.add_argument("--seeds", type=int, help="overrides compare.seeds")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N sub-runs side by side, one process each (GPUs in turn); the same results as 1")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run each sub-run as a task on the Ray cluster at ADDRESS (auto: the one this machine "
                        "belongs to; HOST:PORT); the same results; needs pip install 'modeconn[cluster]'")
    p.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.ensembles.compare import compare_budgets

    overrides = overrides_from_args(args, {"compare.budgets": args.budgets, "compare.seeds": args.seeds})
    config = load_config(args.config, overrides)
    if args.ray is not None:
        from modeconn.training.core.cluster import connect

        connect(args.ray)  # before any work: without Ray, or without a cluster, one line and nothing written
    return compare_budgets(config, run_dir_from_args(args, config.name), force=args.force, jobs_at_once=_jobs(args),
                           ray=args.ray, origin=config_origin(args.config, overrides))


def _jobs(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    return args.jobs


# ---------------------------------------------------------------- pipeline
def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the whole demo: two networks, a curve, FGE, SWA, export to the store")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--runs", type=Path, default=None, help="where the stages' runs go (default runs/NAME)")
    p.add_argument("--out", type=Path, default=None, help="write the artifact to this folder instead of the BentoML store "
                   "(new, empty, or an earlier artifact with nothing else in it)")
    p.add_argument("--seed", type=int, help="seed of the first network (the second uses seed + 1)")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--force", action="store_true",
                   help="rerun every stage: delete what the pipeline wrote in --runs (anything else there is kept; "
                        "a folder modeconn did not make is refused)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="2: train the two networks side by side")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    _step_options(p)
    p.set_defaults(handler=_pipeline)


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from modeconn.training.pipeline import run_pipeline

    overrides = overrides_from_args(args)
    config = load_config(args.config, overrides)
    return run_pipeline(config, args.runs or Path("runs") / config.name, force=args.force, out=args.out,
                        jobs=_jobs(args), origin=config_origin(args.config, overrides))


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_align, _add_curve, _add_eval_curve, _add_curve_point, _add_layer_barrier, _add_plane, _add_simplex,
    _add_export,
    _add_fge, _add_sse,
    _add_ensemble_eval, _add_swa, _add_swag, _add_compare, _add_pipeline,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeconn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    finished = False
    try:
        if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
            raise ConfigError(f"{args.command} runs as one process; start it without torchrun "
                              f"(under torchrun: {', '.join(DISTRIBUTED_COMMANDS)})")
        # each of the ranks on this node gets its share of the cores (one process: all of them)
        distributed.use_threads(distributed.ranks_on_node())
        result = args.handler(args)
        if distributed.launched():  # torchrun: the --json says how many processes made it
            result = {**result, "distributed": distributed.layout()}
        finished = True
    except ConfigError as err:
        print(f"modeconn {args.command}: {err}", file=sys.stderr)
        return 2
    except ModeconnError as err:  # only user mistakes: a bug keeps its traceback
        print(f"modeconn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modeconn {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(finished)
    if args.json and distributed.rank_from_env() == 0:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
