"""Start a command that stops at a named point (training/core/hooks.py) and wait until it is there."""

from __future__ import annotations

import os
import select
import subprocess
from collections.abc import Sequence
from pathlib import Path


def start_held(cmd: Sequence[str], point: str, env: dict[str, str], cwd: Path | None = None,
               timeout: float = 300.0) -> subprocess.Popen:
    """The process, waiting at `point` (for the caller to kill it); an AssertionError if it
    ends or the timeout passes first."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**env, "MODECONN_HOLD_AT": point, "MODECONN_HOLD_FD": str(write_fd)},
                            pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout)
        reached = bool(ready) and os.read(read_fd, 1) == b"!"
    finally:
        os.close(read_fd)
    if not reached:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{' '.join(cmd[:3])} did not reach {point} (exit {proc.returncode})")
    return proc
