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
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from modeconn.contract.artifact import ArtifactError, load_artifact

from .runtime import check_graphs

RUN_DIR_ENV = "MODECONN_RUN_DIR"  # set by the deployment hook, inherited by the workers
_SERVED = "served"


def verify_before_workers(model_name: str) -> None:
    """The deployment hook's work: verify the stored artifact (sha256 of every file, the
    manifest, the graphs open on CPU with their contract) or stop the server."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    model = bentoml.models.get(model_name)  # a missing model already failed in BentoML
    try:
        check_graphs(load_artifact(model.path))
    except ArtifactError as exc:
        # BentoML's CLI prints a BentoMLException as one line and exits with status 1.
        raise BentoMLException(f"cannot serve model {model.tag}: {exc}") from None
    run_dir = tempfile.mkdtemp(prefix="modeconn-serve-")
    atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
    os.environ[RUN_DIR_ENV] = run_dir


def siblings_have_served() -> bool:
    """True in a worker started after some worker of this server run was ready."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    return bool(run_dir) and (Path(run_dir) / _SERVED).exists()


def mark_served() -> None:
    if run_dir := os.environ.get(RUN_DIR_ENV):
        (Path(run_dir) / _SERVED).touch(exist_ok=True)
