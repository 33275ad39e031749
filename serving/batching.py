"""Micro-batching in front of one onnxruntime session.

Why not BentoML's own batching (`@bentoml.api(batchable=True)`): it polls for the next batch in
1 ms ticks and may hold requests for company, and it batches one argument along one axis (the
curve's t is one scalar per call); this batcher starts the next batch the moment the session is
free and bounds its queue by rows. Measured side by side: benchmarks/README.md, "The batcher".

Requests arrive here already validated (one bad request can never fail a batch). Each is
queued with a key (graph input other than `x`: None for the ensemble, t for the curve). One
asyncio task per batcher waits for the first pending request (and, with `max_wait_ms` > 0, for
company), takes pending requests in arrival order up to `max_batch_rows` rows (at least one
request), runs the session once per key in a thread, and splits the outputs per request. Under
load batches grow on their own; at low load a request runs at once.

Pending rows above `max_queue_rows` are refused with `Overloaded` (HTTP 503 + Retry-After):
backpressure instead of an unbounded queue. A request under several keys (a curve request's ts)
is admitted or refused whole (`submit_many`), so nothing of a refused request keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .env import env_flag

# Under "bentoml." so the handlers BentoML configures for its workers print it.
logger = logging.getLogger(f"bentoml.serve.{__name__}")

RunFn = Callable[[Hashable, np.ndarray], Sequence[np.ndarray]]


@dataclass(frozen=True)
class BatchSettings:
    """How requests are coalesced; read from MODECONN_* environment variables."""

    enabled: bool = True
    max_batch_rows: int = 1024  # rows per session call
    max_wait_ms: float = 0.0  # longest a request waits for company before its batch runs
    # pending rows above this are refused with 503; room for two of the largest curve requests
    # (1024 rows x 16 ts), so two heavy clients are both served instead of taking turns by luck
    max_queue_rows: int = 32768

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.max_wait_ms < 0:
            raise ValueError(f"invalid batching settings: {self}")
        if self.max_queue_rows < self.max_batch_rows:
            raise ValueError(f"max_queue_rows must be >= max_batch_rows: {self}")

    @classmethod
    def from_env(cls) -> BatchSettings:
        env = os.environ
        return cls(
            enabled=env_flag("MODECONN_BATCHING", cls.enabled),
            max_batch_rows=int(env.get("MODECONN_MAX_BATCH_ROWS", cls.max_batch_rows)),
            max_wait_ms=float(env.get("MODECONN_MAX_WAIT_MS", cls.max_wait_ms)),
            max_queue_rows=int(env.get("MODECONN_MAX_QUEUE_ROWS", cls.max_queue_rows)),
        )


class Overloaded(RuntimeError):
    """More rows are pending than the batcher's queue bound allows."""


@dataclass
class _Pending:
    key: Hashable
    x: np.ndarray
    future: asyncio.Future[list[np.ndarray]]
    enqueued_at: float


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    requests: int = 0
    max_rows_seen: int = 0

    def as_dict(self) -> dict[str, float]:
        mean = self.rows / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "requests": self.requests,
            "rows": self.rows,
            "mean_rows_per_batch": round(mean, 3),
            "max_rows_per_batch": self.max_rows_seen,
        }


class MicroBatcher:
    """Coalesces concurrent `submit(key, x)` calls into few `run(key, x_batch)` calls.

    `run` returns a sequence of arrays; array i is split along `split_axes[i]` (0 for
    `probabilities` [N, C], 1 for `member_probabilities` [K, N, C]). `on_batch`, when given,
    is called after each batch has answered (serving/metrics.py samples the queue then).
    """

    def __init__(
        self, run: RunFn, *, split_axes: Sequence[int], settings: BatchSettings, name: str,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self._on_batch = on_batch
        self._split_axes = tuple(split_axes)
        self.max_batch_rows = settings.max_batch_rows
        self.max_wait_s = settings.max_wait_ms / 1000.0
        self.max_queue_rows = settings.max_queue_rows
        self.name = name
        self.stats = BatchStats()
        self._pending: deque[_Pending] = deque()
        self._pending_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # One thread: session calls of this batcher are serial, which is what makes the
        # queue fill up (and batches grow) under load.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")

    @property
    def pending_rows(self) -> int:
        """Rows queued and not yet taken into a batch (serving/metrics.py samples it)."""
        return self._pending_rows

    async def submit(self, key: Hashable, x: np.ndarray) -> list[np.ndarray]:
        return (await self.submit_many([key], x))[0]

    async def submit_many(self, keys: Sequence[Hashable], x: np.ndarray) -> list[list[np.ndarray]]:
        """`x` run under each key (a curve request's t values), admitted or refused as one unit:
        the rows of every key are reserved at once, so a refused request leaves nothing queued,
        and a request that fails or is abandoned withdraws what of it has not run yet."""
        rows = len(x) * len(keys)
        if self._pending_rows and self._pending_rows + rows > self.max_queue_rows:
            raise Overloaded(
                f"{self._pending_rows} rows are already queued for {self.name}; this request needs "
                f"{rows} more and the queue bound is {self.max_queue_rows}"
            )
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._loop(), name=f"batcher-{self.name}")
        futures: list[asyncio.Future[list[np.ndarray]]] = []
        for key in keys:
            futures.append(loop.create_future())
            self._pending.append(_Pending(key, x, futures[-1], loop.time()))
        self._pending_rows += rows
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            if len(futures) == 1:  # the common case, without gather's extra future and callbacks
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:  # queued parts of a failed or cancelled request do not run
                future.cancel()
            raise

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            try:
                await self._run_batch(batch)
            except Exception:  # never let the loop die: later requests would hang
                logger.exception("batcher %s: batch failed", self.name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("batch failed"))

    async def _wait_for_batch(self) -> None:
        assert self._wakeup is not None
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].enqueued_at + self.max_wait_s
        while self._pending_rows < self.max_batch_rows:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._pending:
            n = len(self._pending[0].x)
            if batch and rows + n > self.max_batch_rows:
                break
            item = self._pending.popleft()
            self._pending_rows -= n
            rows += n
            if not item.future.done():  # skip requests whose client already gave up
                batch.append(item)
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        groups: dict[Hashable, list[_Pending]] = {}
        for item in batch:
            groups.setdefault(item.key, []).append(item)
        loop = asyncio.get_running_loop()
        for key, items in groups.items():
            x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, key, x)
            except Exception as exc:  # each request logs it with its traceback and id (errors.py)
                logger.warning("batcher %s: session run failed (%d rows): %r", self.name, len(x), exc)
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.rows += len(x)
            self.stats.requests += len(items)
            self.stats.max_rows_seen = max(self.stats.max_rows_seen, len(x))
            if len(items) == 1:  # nothing to split
                if not items[0].future.done():
                    items[0].future.set_result(outputs)
                continue
            start = 0
            for it in items:
                stop = start + len(it.x)
                parts = [
                    out[(slice(None),) * axis + (slice(start, stop),)]
                    for out, axis in zip(outputs, self._split_axes, strict=True)
                ]
                if not it.future.done():
                    it.future.set_result(parts)
                start = stop
        if self._on_batch is not None:
            self._on_batch()
