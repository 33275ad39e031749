"""The `modeconn` command line: one subcommand per stage, all sharing the common options
`--config`, `--out`, `--seed`, `--device`, `--resume`, `--force`, `--set`, `--json`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.config import Config, ConfigError, load_config, parse_set_overrides

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (default: built-in demo settings)")
    parser.add_argument("--out", type=Path, default=None, help=f"run directory (default: runs/NAME/{default_out})")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--force", action="store_true", help="delete what --out holds and start over")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.lr=0.05")
    parser.add_argument("--json", action="store_true", help="print one JSON object (paths, metrics) as the last line")
    parser.set_defaults(default_out=default_out)


def config_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    merged = {"seed": args.seed, "device": args.device, **(overrides or {}), **parse_set_overrides(args.set)}
    return load_config(args.config, merged)


def run_dir_from_args(args: argparse.Namespace, config: Config) -> Path:
    return args.out if args.out is not None else Path("runs") / config.name / args.default_out


# ---------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one network (an independent run)")
    _common(p, "train")
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument("--lr", type=float, help="overrides train.lr")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from training.train import train_network

    config = config_from_args(args, {"train.epochs": args.epochs, "train.lr": args.lr})
    return train_network(config, run_dir_from_args(args, config), resume=args.resume, force=args.force)


# ---------------------------------------------------------------- curves
def _add_curve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curve", help="fit a Bezier or PolyChain curve between two trained networks")
    _common(p, "curve")
    p.add_argument("--start", type=Path, required=True, help="checkpoint of the first endpoint w0")
    p.add_argument("--end", type=Path, required=True, help="checkpoint of the second endpoint w1")
    p.add_argument("--curve", choices=["bezier", "polychain"], help="overrides curve.curve")
    p.add_argument("--num-bends", type=int, help="overrides curve.num_bends (3 in the paper)")
    p.add_argument("--epochs", type=int, help="overrides curve.epochs")
    p.add_argument("--lr", type=float, help="overrides curve.lr")
    p.add_argument("--init", choices=["linear", "random"], help="interior bends: on the line (default) or random")
    p.add_argument("--free-start", action="store_true", help="train the start point too")
    p.add_argument("--free-end", action="store_true", help="train the end point too")
    p.set_defaults(handler=_curve)


def _curve(args: argparse.Namespace) -> dict[str, Any]:
    from training.curve_train import fit_curve

    config = config_from_args(args, {
        "curve.curve": args.curve, "curve.num_bends": args.num_bends, "curve.epochs": args.epochs,
        "curve.lr": args.lr, "curve.init": args.init,
        "curve.fix_start": False if args.free_start else None, "curve.fix_end": False if args.free_end else None,
    })
    return fit_curve(config, args.start, args.end, run_dir_from_args(args, config), resume=args.resume, force=args.force)


def _add_eval_curve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-curve", help="evaluate a curve (and the straight line) at evenly spaced t")
    p.add_argument("run", type=Path, help="curve run directory or its final.pt")
    p.add_argument("--points", type=int, default=61, help="number of evenly spaced t (61 as in the paper)")
    p.add_argument("--out", type=Path, help="where curve.json/csv/png go (default: the run directory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true", help="print the summaries as one JSON line")
    p.set_defaults(handler=_eval_curve)


def _eval_curve(args: argparse.Namespace) -> dict[str, Any]:
    from training.eval_curve import evaluate_curve

    if args.points < 2:
        raise ValueError(f"--points must be at least 2, got {args.points}")
    return evaluate_curve(args.run, points=args.points, out_dir=args.out, device=args.device)


def _add_curve_point(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curve-point", help="save φ(t) (BN recomputed) as an ordinary network checkpoint")
    p.add_argument("run", type=Path, help="curve run directory or its final.pt")
    p.add_argument("--t", type=float, required=True, help="the point, in [0, 1]")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_curve_point)


def _curve_point(args: argparse.Namespace) -> dict[str, Any]:
    from training.eval_curve import save_curve_point

    return save_curve_point(args.run, args.t, args.out, device=args.device)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_curve, _add_eval_curve, _add_curve_point]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeconn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.handler(args)
    except ConfigError as err:
        print(f"modeconn {args.command}: {err}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"modeconn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modeconn {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
