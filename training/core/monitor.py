"""Live monitoring: every stage's per-epoch metric rows as TensorBoard scalars (`tensorboard: true`).

The rows are those `fit` appends to metrics.jsonl (train loss/accuracy, LR, validation and test
metrics, seconds), one scalar per numeric field, its step the epoch; the events go to
RUN/tensorboard, so `tensorboard --logdir runs/NAME` shows each stage's run side by side.
Rank 0 alone writes. After a resume the events of epochs past the checkpoint (written before
the kill, replayed now) are purged (SummaryWriter's purge_step), as metrics.jsonl drops its rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modeconn.training.core import distributed
from modeconn.training.core.config import ConfigError

EpochLogger = Callable[[dict[str, Any]], None]


def tensorboard_dir(run_dir: Path) -> Path:
    return run_dir / "tensorboard"


@contextlib.contextmanager
def epoch_logger(run_dir: Path, enabled: bool, start_epoch: int) -> Iterator[EpochLogger]:
    """A function that logs one metric row; the writer is flushed and closed on exit (also on an
    error or Ctrl-C). A no-op when disabled and on ranks other than 0."""
    if not enabled or not distributed.is_main():
        yield lambda row: None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises ImportError when the tensorboard package is missing
        raise ConfigError("tensorboard: true needs the tensorboard package: pip install 'modeconn[monitor]' "
                          "(or pip install tensorboard), or set tensorboard=false") from err
    writer = SummaryWriter(str(tensorboard_dir(run_dir)), purge_step=start_epoch + 1 if start_epoch else None)

    def log(row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                writer.add_scalar(key, value, global_step=int(row["epoch"]))
        writer.flush()  # live: visible in TensorBoard at the end of each epoch

    try:
        yield log
    finally:
        writer.close()
