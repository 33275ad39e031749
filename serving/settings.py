"""The service's settings: one object, read from MODECONN_* environment variables once, when
serving/service.py is imported (BentoML's decorator needs some of them at that moment).

| variable | field | default |
|---|---|---|
| MODECONN_MODEL | model | modeconn-mnist1d (name or tag in the BentoML store) |
| MODECONN_PROVIDER | provider | auto (auto, cuda or cpu) |
| MODECONN_WORKERS | workers | 2 |
| MODECONN_MAX_BODY_BYTES | max_body_bytes: one request's body | 8 MiB |
| MODECONN_BODY_BUDGET_BYTES | body_budget_bytes: request bodies held at once per worker; above it 503 + Retry-After before the body is read | 64 MiB |
| MODECONN_MAX_CONNECTIONS | connections.max_connections: open connections per worker; above it 503 + Retry-After (serving/connections.py) | 256 |
| MODECONN_KEEP_ALIVE_S | connections.keep_alive_s: an idle keep-alive connection is closed after | 5 |
| MODECONN_HEADER_TIMEOUT_S | connections.header_timeout_s: the request head must be whole within (slowloris) | 10 |
| MODECONN_BODY_TIMEOUT_S | connections.body_timeout_s: the body must be whole within this of its head | 60 |
| MODECONN_ACCESS_LOG / _METRICS / _TRACE_PREDICTIONS | access_log / metrics / trace_predictions | off / on / off |
| MODECONN_BATCHING, _MAX_BATCH_ROWS, _MAX_WAIT_MS, _MAX_QUEUE_ROWS | batching (serving/batching.py) | on, 1024, 0, 32768 |
| MODECONN_ORT_THREADS / _ORT_SPINNING | onnxruntime (serving/runtime.py) | usable cores // workers (MODECONN_THREADS overrides) / on only for one worker on a quiet machine |
| MODECONN_CURVE_CACHE | curve_cache: fixed-t curve sessions kept (serving/fixed_t.py); 0: none | 16 |
| MODECONN_CURVE_PRELOAD | curve_preload: fixed-t sessions built before readiness, at t = i/(n-1) | 0 |
| MODECONN_CURVE_BUILD_AFTER | curve_build_after: a t's session is built once it was asked for this often | 2 |
| MODECONN_TEST_FAULT | test_fault: for tests only, paths that raise (comma-separated: json, bentoml, binary, curve; serving/errors.py) | none |
| MODECONN_HOLD_AT, _HOLD_PIPE | for tests only: `serve:load` stops each worker before it opens its sessions (modeconn/contract/hooks.py) | none |

A value that cannot be read stops the service with an error naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from modeconn.contract import threads
from modeconn.contract.errors import ModeconnError

from .batching import BatchSettings
from .connections import ConnectionLimits
from .env import env_flag, env_int
from .errors import FAULT_PATHS
from .runtime import SessionSettings

# Two (benchmarks/results/worker_kill-*, README "Start-up and faults"): a SIGKILLed worker
# is then not an outage, and on 2 cores two workers with one onnxruntime thread each
# answered more requests than one worker, for a second copy of the graphs in memory.
DEFAULT_WORKERS = 2
DEFAULT_CURVE_CACHE = 16


class SettingsError(ModeconnError):
    """A MODECONN_* variable that does not make sense with the others."""


@dataclass(frozen=True)
class ServiceSettings:
    model: str = "modeconn-mnist1d"
    provider: str = "auto"
    workers: int = DEFAULT_WORKERS
    max_body_bytes: int = 8 << 20
    # eight largest bodies: a burst of big uploads waits (503) instead of growing the worker
    body_budget_bytes: int = 64 << 20
    connections: ConnectionLimits = ConnectionLimits()
    access_log: bool = False
    metrics: bool = True
    trace_predictions: bool = False
    batching: BatchSettings = BatchSettings()
    onnxruntime: SessionSettings = SessionSettings()
    curve_cache: int = DEFAULT_CURVE_CACHE
    curve_preload: int = 0
    curve_build_after: int = 2
    test_fault: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.body_budget_bytes < self.max_body_bytes:
            raise SettingsError(
                f"MODECONN_BODY_BUDGET_BYTES={self.body_budget_bytes} is less than one body may be "
                f"(MODECONN_MAX_BODY_BYTES={self.max_body_bytes})"
            )
        if unknown := set(self.test_fault) - set(FAULT_PATHS):
            raise SettingsError(f"MODECONN_TEST_FAULT: {sorted(unknown)}; use some of {', '.join(FAULT_PATHS)}")
        if self.provider not in ("auto", "cuda", "cpu"):
            raise SettingsError(f"MODECONN_PROVIDER={self.provider!r}: use auto, cuda or cpu")
        if self.curve_preload > self.curve_cache:
            raise SettingsError(
                f"MODECONN_CURVE_PRELOAD={self.curve_preload} is more than the cache keeps "
                f"(MODECONN_CURVE_CACHE={self.curve_cache})"
            )
        if self.curve_preload == 1:
            raise SettingsError("MODECONN_CURVE_PRELOAD=1: give 0, or at least 2 points (t = 0 and 1)")

    @property
    def curve_preload_ts(self) -> list[float]:
        n = self.curve_preload
        return [i / (n - 1) for i in range(n)] if n > 1 else []

    @classmethod
    def from_env(cls) -> ServiceSettings:
        env = os.environ
        workers = env_int("MODECONN_WORKERS", DEFAULT_WORKERS, minimum=1)
        return cls(
            model=env.get("MODECONN_MODEL", cls.model),
            provider=env.get("MODECONN_PROVIDER", cls.provider),
            workers=workers,
            max_body_bytes=env_int("MODECONN_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            body_budget_bytes=env_int("MODECONN_BODY_BUDGET_BYTES", cls.body_budget_bytes, minimum=1),
            connections=_connection_limits(),
            access_log=env_flag("MODECONN_ACCESS_LOG", cls.access_log),
            metrics=env_flag("MODECONN_METRICS", cls.metrics),
            trace_predictions=env_flag("MODECONN_TRACE_PREDICTIONS", cls.trace_predictions),
            batching=BatchSettings.from_env(),
            onnxruntime=SessionSettings.from_env(default_threads=threads.threads_per_process(workers),
                                                 default_spinning=threads.spinning_allowed(workers)),
            curve_cache=env_int("MODECONN_CURVE_CACHE", DEFAULT_CURVE_CACHE, minimum=0),
            curve_preload=env_int("MODECONN_CURVE_PRELOAD", 0, minimum=0),
            curve_build_after=env_int("MODECONN_CURVE_BUILD_AFTER", 2, minimum=1),
            test_fault=tuple(p.strip() for p in env.get("MODECONN_TEST_FAULT", "").split(",") if p.strip()),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _connection_limits() -> ConnectionLimits:
    default = ConnectionLimits()
    return ConnectionLimits(
        keep_alive_s=env_int("MODECONN_KEEP_ALIVE_S", default.keep_alive_s, minimum=1),
        header_timeout_s=env_int("MODECONN_HEADER_TIMEOUT_S", default.header_timeout_s, minimum=1),
        body_timeout_s=env_int("MODECONN_BODY_TIMEOUT_S", default.body_timeout_s, minimum=1),
        max_connections=env_int("MODECONN_MAX_CONNECTIONS", default.max_connections, minimum=1),
    )
