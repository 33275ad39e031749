"""A run that stops at a named point and says so, so a test can kill it exactly there.

`MODECONN_HOLD_AT=NAME` (for example `train:epoch-2`: the stage, the first word of its log label) and `MODECONN_HOLD_FD=FD` (a pipe the
test passed in): on reaching NAME, the process writes one byte to FD and then waits until it
is killed. Without these variables `hold_point` returns at once.
"""

from __future__ import annotations

import os
import threading


def hold_point(name: str) -> None:
    if os.environ.get("MODECONN_HOLD_AT") != name:
        return
    fd = int(os.environ["MODECONN_HOLD_FD"])
    os.write(fd, b"!")
    os.close(fd)
    threading.Event().wait()  # until the test's SIGKILL
