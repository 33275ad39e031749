"""Start-up of `bentoml serve`: check the artifact once before any worker starts, and tell
a worker that replaces a dead one that its siblings are already serving.

Fail loudly (like Triton's default `--exit-on-error`): a broken artifact stops `bentoml
serve` with one line naming the model and the file and a non-zero exit, before a port is
opened. A failure inside a worker instead (BentoML 1.4 runs the service's __init__ in the
worker's ASGI lifespan) makes uvicorn exit, and the circus arbiter respawns that worker
forever while nothing accepts on the shared socket, so requests hang. The check therefore
runs in BentoML's deployment hook, which runs once in the `bentoml serve` process before
the workers are spawned (and is not run by `bentoml build`).

Replacement workers: workers share one listening socket, and uvicorn starts accepting
only after the service's __init__ returns. A first-start worker returns at once and loads
in the background (so /readyz answers 503 while loading); a worker that replaces a dead
one loads inside __init__ instead, so it takes no connection before it can answer it and
its siblings keep taking them all. "Siblings have served" is a file that the first ready
worker creates in a folder the deployment hook makes for this server run.

A private verified copy: the deployment hook copies the stored artifact into that folder
(files read-only), verifies the copy (hashes, manifest, every graph's contract, see
serving/contract_check.py) and every worker, first or replacement, loads only the copy. So
what a server verified at start is what it serves until it stops, whatever happens to the
store meanwhile (a file changed or deleted, a newer version stored under the same name).
Load-once-before-fork is not an option: BentoML's arbiter starts each worker as a new
process, and onnxruntime sessions cannot be handed to another process. The folder is
removed when `bentoml serve` exits; it lives under TMPDIR, so the disk there must hold one
more copy of the artifact (and a cleaner of old files in TMPDIR must spare it).

A replacement that still cannot load (the copy damaged, memory, a GPU failing) while
siblings serve keeps trying inside __init__, so it never takes a connection (retry_until);
a lone worker answers 503 with the reason instead, since there is nobody to take its traffic.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modeconn.contract.artifact import ArtifactError, load_artifact

from .contract_check import check_contract

logger = logging.getLogger("bentoml.serve.modeconn")

RUN_DIR_ENV = "MODECONN_RUN_DIR"  # set by the deployment hook, inherited by the workers
ARTIFACT_DIR_ENV = "MODECONN_ARTIFACT_DIR"  # the private verified copy, inside the run folder
ARTIFACT_TAG_ENV = "MODECONN_ARTIFACT_TAG"  # the tag the hook resolved (the model name may say "latest")
_SERVED = "served"
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
STOP_POLL_S = 1.0


def verify_before_workers(model_name: str) -> None:
    """The deployment hook's work: copy the stored artifact into a private folder of this
    server run and verify the copy (sha256 of every file, the manifest, every graph's
    contract), or stop the server with one line naming the model and the file."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    model = bentoml.models.get(model_name)  # a missing model already failed in BentoML
    run_dir = Path(tempfile.mkdtemp(prefix="modeconn-serve-"))
    copy = run_dir / "artifact"
    try:
        # links stay links: load_artifact then refuses any that leads out of the copy
        shutil.copytree(model.path, copy, symlinks=True)
        check_contract(load_artifact(copy))
    except (ArtifactError, OSError) as exc:
        remove_run_dir(run_dir)
        # BentoML's CLI prints a BentoMLException as one line and exits with status 1.
        message = str(exc).replace(str(copy), str(model.path))  # name the store's folder, not the copy
        raise BentoMLException(f"cannot serve model {model.tag}: {message}") from None
    make_read_only(copy)
    atexit.register(remove_run_dir, run_dir)
    os.environ.update({RUN_DIR_ENV: str(run_dir), ARTIFACT_DIR_ENV: str(copy), ARTIFACT_TAG_ENV: str(model.tag)})


def served_folder(default: str | Path) -> Path:
    """The folder a worker loads: the verified copy, or `default` outside `bentoml serve`."""
    return Path(os.environ.get(ARTIFACT_DIR_ENV) or default)


def served_tag(default: object) -> str:
    return os.environ.get(ARTIFACT_TAG_ENV) or str(default)


def make_read_only(root: Path) -> None:
    """Files 0444 and folders 0555: the copy is not to be changed by anyone, the server included."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for folder, _, _ in os.walk(root, topdown=False):
        Path(folder).chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def remove_run_dir(run_dir: Path) -> None:
    """Remove the run folder, read-only copy included (its folders first made writable again)."""
    for folder, _, _ in os.walk(run_dir):
        try:
            Path(folder).chmod(stat.S_IRWXU)
        except OSError:
            pass
    shutil.rmtree(run_dir, ignore_errors=True)


def retry_until(attempt: Callable[[], bool], what: str) -> None:
    """Call `attempt` until it answers True, waiting 1, 2, 4 ... 30 s between tries (a
    replacement worker whose siblings serve: it takes no connection meanwhile).

    The wait blocks the worker's event loop, so uvicorn's own SIGTERM/SIGINT handling cannot
    run: the worker stops (SystemExit) when it is asked to (the signal then also reaches the
    handler it replaced) or when its arbiter is gone, instead of retrying as an orphan."""
    parent, stop = os.getppid(), threading.Event()
    replaced = _catch_stop_signals(stop)
    try:
        wait = RETRY_FIRST_S
        while not attempt():
            logger.warning("%s failed; this worker takes no connections and retries in %.0f s", what, wait)
            waited = 0.0
            while waited < wait:  # in steps, to notice an arbiter that died without a word
                if stop.wait(min(STOP_POLL_S, wait - waited)) or os.getppid() != parent:
                    logger.warning("%s: this worker stops (%s)", what,
                                   "asked to" if stop.is_set() else "its server is gone")
                    raise SystemExit(0)
                waited += STOP_POLL_S
            wait = min(2 * wait, RETRY_MAX_S)
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)


def _catch_stop_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM and SIGINT set `stop` and then go to the handlers they had (returned, to be put
    back); nothing where signals cannot be caught (a thread other than the main one)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced: dict[int, Any] = {}
    for number in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(number)

        def asked(signum: int, frame: Any, previous: Any = previous) -> None:
            stop.set()
            if callable(previous):
                previous(signum, frame)

        replaced[number] = previous
        signal.signal(number, asked)
    return replaced


def siblings_have_served() -> bool:
    """True in a worker started after some worker of this server run was ready."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    return bool(run_dir) and (Path(run_dir) / _SERVED).exists()


def mark_served() -> None:
    if run_dir := os.environ.get(RUN_DIR_ENV):
        (Path(run_dir) / _SERVED).touch(exist_ok=True)
