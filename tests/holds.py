"""Stop a process at a named point (modeconn/contract/hooks.py) and wait until it is there: the
wait ends on the process's byte in a FIFO or on its exit (a pidfd), whichever comes first."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Hold:
    point: str
    pipe: Path
    fd: int  # the FIFO's reading end, open for as long as the hold

    @property
    def env(self) -> dict[str, str]:
        """What asks a process to stop at `point`."""
        return {"MODECONN_HOLD_AT": self.point, "MODECONN_HOLD_PIPE": str(self.pipe)}

    def reached(self, proc: subprocess.Popen, timeout: float = 300.0) -> None:
        """Until `proc` (or a process it started) is at the point; an AssertionError if `proc`
        ends or the timeout passes first."""
        exited = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([self.fd, exited], [], [], timeout)
        finally:
            os.close(exited)
        if self.fd in ready and os.read(self.fd, 1) == b"!":
            return
        why = f"exited with {proc.wait()}" if exited in ready else f"still running after {timeout:g} s"
        raise AssertionError(f"{' '.join(map(str, proc.args[:3]))} did not reach {self.point}: {why}")


@contextlib.contextmanager
def hold(point: str) -> Iterator[Hold]:
    """A FIFO to stop processes at `point` with, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="modeconn-hold-") as folder:
        pipe = Path(folder) / "reached"
        os.mkfifo(pipe)
        fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # before any writer: it opens without waiting
        try:
            yield Hold(point, pipe, fd)
        finally:
            os.close(fd)


def start_held(cmd: Sequence[str], point: str, env: dict[str, str], cwd: Path | None = None,
               timeout: float = 300.0, **popen: Any) -> subprocess.Popen:
    """The process, waiting at `point` (for the caller to kill it: its process group with
    `start_new_session=True`); an AssertionError if it ends or the timeout passes first."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    with hold(point) as held:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env={**env, **held.env}, **popen)
        try:
            held.reached(proc, timeout)
        except AssertionError:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL) if popen.get("start_new_session") else proc.kill()
            proc.wait()
            raise
    return proc
