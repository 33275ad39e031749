"""A process that stops at a named point and says so, so a test acts exactly there (kills a run
after a known checkpoint, probes a server that is still loading) instead of racing a timer.

`MODECONN_HOLD_AT=NAME` (`train:epoch-2`, `fge:epoch-1`: the stage, the first word of its log
label, and the epoch whose checkpoint was just written; `serve:load`: a worker about to open its
sessions) and `MODECONN_HOLD_PIPE=PATH` (a FIFO the test made and holds open for reading): on
reaching NAME, the process writes one byte to PATH and then waits until it is killed. A FIFO, not
an inherited descriptor, so that the signal also crosses launchers that close descriptors
(torchrun, BentoML's arbiter). Without these variables `hold_point` returns at once.
"""

from __future__ import annotations

import os
import threading


def hold_point(name: str) -> None:
    if os.environ.get("MODECONN_HOLD_AT") != name:
        return
    # non-blocking: with no test reading (it gave up) this fails instead of hanging here
    fd = os.open(os.environ["MODECONN_HOLD_PIPE"], os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"!")
    finally:
        os.close(fd)
    threading.Event().wait()  # until the process is killed
