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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train]


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
