"""BentoML's own adaptive batching in front of the ensemble graph: the minimal service a
BentoML user would write (`@bentoml.api(batchable=True)`), with modeconn's process layout
(PEER_WORKERS workers, the access log off and the prediction routes untraced, as modeconn's).

max_latency_ms is BentoML's latency budget, not a wait: its CorkDispatcher answers 503
("shedding") to a request it expects to miss it, so the budget is 60 s (modeconn's traffic
timeout) to keep it from shedding under 64 clients. Binary bodies: a positional-only
`bytes` parameter is BentoML's raw-body input (a JSON-schema "string" root input), turned
into the float32 array by a pydantic validator before the dispatcher batches it.
Run: `bentoml serve benchmarks.peers.bentoml_batching:Peer`; `...:PeerMicroBatcher` is the
same service with modeconn's batcher instead (the batchers compared with all else equal).
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import AfterValidator

from benchmarks.peers.common import Model, env_int
from modeconn.serving.batching import BatchSettings, MicroBatcher

MAX_ROWS = env_int("PEER_MAX_BATCH_ROWS", 1024)
MAX_LATENCY_MS = 60_000
_model: Model | None = None


def _raw_rows(body: bytes) -> np.ndarray:
    assert _model is not None
    return _model.from_binary(body)


@bentoml.service(
    name="peer-bentoml-batching",
    workers=env_int("PEER_WORKERS", 1),
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/readyz", "/livez", "/healthz", "/metrics", "/predict", "/predict_raw"]},
)
class Peer:
    def __init__(self) -> None:
        global _model
        _model = self.model = Model.from_env()

    @bentoml.api(route="/predict", batchable=True, max_batch_size=MAX_ROWS, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, inputs: np.ndarray) -> list[dict[str, Any]]:
        return self.model.rows(*self.model.run(self.model.check(inputs.astype(np.float32, copy=False))))

    @bentoml.api(route="/predict_raw", batchable=True, max_batch_size=MAX_ROWS, max_latency_ms=MAX_LATENCY_MS)
    def predict_raw(self, body: Annotated[bytes, AfterValidator(_raw_rows)], /) -> list[dict[str, Any]]:
        return self.model.rows(*self.model.run(body))


@bentoml.service(
    name="peer-bentoml-microbatcher",
    workers=env_int("PEER_WORKERS", 1),
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/readyz", "/livez", "/healthz", "/metrics", "/predict", "/predict_raw"]},
)
class PeerMicroBatcher:
    """The same minimal service with modeconn's hand-written batcher (serving/batching.py)
    instead of BentoML's: the two batchers compared with everything else equal."""

    def __init__(self) -> None:
        global _model
        _model = self.model = Model.from_env()
        settings = BatchSettings(max_batch_rows=MAX_ROWS)
        self.batcher = MicroBatcher(lambda _key, x: self.model.run(x), split_axes=(0, 1), settings=settings,
                                    name="ensemble")

    async def _answer(self, x: np.ndarray) -> dict[str, Any]:
        mean, members = await self.batcher.submit(None, x)
        return self.model.answer(mean, members)

    @bentoml.api(route="/predict")
    async def predict(self, inputs: np.ndarray) -> dict[str, Any]:
        return await self._answer(self.model.check(inputs.astype(np.float32, copy=False)))

    @bentoml.api(route="/predict_raw")
    async def predict_raw(self, body: Annotated[bytes, AfterValidator(_raw_rows)], /) -> dict[str, Any]:
        return await self._answer(body)
