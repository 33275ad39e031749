"""onnxruntime sessions for one artifact, and the per-row statistics served with predictions.

Provider choice: CUDA when onnxruntime offers CUDAExecutionProvider *and* the driver reports
a GPU (onnxruntime-gpu lists CUDA even on machines without one); otherwise CPU. A session
whose CUDA provider fails to load falls back to CPU inside onnxruntime, so what is logged
and reported is `session.get_providers()[0]`, the provider really in use.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from modeconn.contract.artifact import Artifact, ArtifactError

from . import nchwc
from .calibration import scale
from .env import env_flag
from .fixed_t import CurveSplit, FixedTCache, t_key

# Under "bentoml." so the handlers BentoML configures for its workers print it.
logger = logging.getLogger(f"bentoml.serve.{__name__}")

# HEURISTIC skips cuDNN's exhaustive benchmark on every new input shape, which would
# otherwise stall the first requests of each batch size for seconds. TF32 off: with it
# (onnxruntime's default) an H100 answered probabilities up to 4e-3 away from the CPU and
# PyTorch float32 results the exporter checked; these small graphs gain nothing from it.
CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}


def cuda_device_count() -> int:
    """GPUs visible to the CUDA driver (0 without a driver); no torch needed."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def choose_providers(preference: str = "auto") -> list[Any]:
    """Execution providers for `preference` in {"auto", "cuda", "cpu"}."""
    if preference not in ("auto", "cuda", "cpu"):
        raise ValueError(f"provider preference must be auto, cuda or cpu, not {preference!r}")
    if preference != "cpu":
        has_provider = "CUDAExecutionProvider" in ort.get_available_providers()
        gpus = cuda_device_count() if has_provider else 0
        if has_provider and gpus > 0:
            _preload_cuda_libraries()
            return [("CUDAExecutionProvider", CUDA_PROVIDER_OPTIONS), "CPUExecutionProvider"]
        logger.info(
            "no GPU in use (onnxruntime CUDA provider %s, %d GPU(s) visible): running on CPU",
            "available" if has_provider else "not available",
            gpus,
        )
    return ["CPUExecutionProvider"]


def _preload_cuda_libraries() -> None:
    # onnxruntime-gpu 1.31 links CUDA 13 / cuDNN 9 but does not ship them; with the pip
    # packages (onnxruntime-gpu[cuda,cudnn]) installed this makes them loadable, and with
    # system libraries it is a no-op. Without either, session creation falls back to CPU.
    try:
        ort.preload_dlls()
    except Exception as exc:  # best effort; the provider actually used is logged later
        logger.warning("onnxruntime.preload_dlls() failed: %s", exc)


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime CPU threading; read from MODECONN_ORT_* environment variables.

    threads: intra-op threads per session (0: onnxruntime's default, one per core; the
    service's default is each worker's share of the usable cores, modeconn/contract/threads.py,
    so workers share the cores and a container's CPU quota is respected).
    spinning: whether idle intra-op threads busy-wait for the next op (onnxruntime's default;
    the service keeps it only for one worker on a quiet machine: there it answered batch-1
    requests about 0.5 ms sooner, with the same 64-client throughput). Off where other
    processes need the cores: spinning threads of K sessions run one after another slowed
    each other 2x on CIFAR shapes.
    """

    threads: int = 0
    spinning: bool = True

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"MODECONN_ORT_THREADS must be >= 0, not {self.threads}")

    @classmethod
    def from_env(cls, default_threads: int = 0, default_spinning: bool = True) -> SessionSettings:
        return cls(
            threads=int(os.environ.get("MODECONN_ORT_THREADS", default_threads)),
            spinning=env_flag("MODECONN_ORT_SPINNING", default_spinning),
        )


# The graph contract (docs/manifest.md): input names, and outputs the service reads.
ENSEMBLE_IO = ({"x"}, {"probabilities", "member_probabilities"})
CURVE_IO = ({"x", "t"}, {"probabilities"})
SWA_IO = ({"x"}, {"probabilities"})  # a member's contract


class Runtime:
    """The ensemble session; when the artifact has them, the SWA network's session and the
    curve: its general session (any t) and a bounded cache of fixed-t sessions (serving/fixed_t.py).
    On the CPU the general session runs curve.onnx rewritten for onnxruntime's blocked
    convolutions (serving/nchwc.py) once it answers as curve.onnx does; `curve_blocked` says whether.
    `observe(graph, rows, seconds)`, when set, hears of every session call of run_* (serving/metrics.py)."""

    observe: Callable[[str, int, float], None] | None = None

    def __init__(
        self,
        artifact: Artifact,
        providers: Sequence[Any],
        settings: SessionSettings = SessionSettings(),
        curve_cache: int = 0,
        curve_build_after: int = 2,
    ) -> None:
        self.artifact = artifact
        self._providers, self._settings = list(providers), settings
        self.ensemble = open_session(artifact.ensemble_file, providers, settings, *ENSEMBLE_IO)
        self.curve: ort.InferenceSession | None = None
        self.curve_cache: FixedTCache | None = None
        self.curve_blocked = self.curve_exact = False
        if artifact.curve_file is not None:
            self.curve = open_session(artifact.curve_file, providers, settings, *CURVE_IO)
            source: Path | bytes = artifact.curve_file
            if _provider_name(self._providers[0]) == "CPUExecutionProvider":
                blocked = self._block_curve(artifact.curve_file)
                # Fixed-t sessions cut from the blocked graph, with prepacking off, answer bit for
                # bit what the general session does; where every BN folded they are also as fast
                # as the usual ones (demo: 0.85x a member at batch 64; a pre-activation PreResNet-20,
                # whose BNs before convs stay: 1.43x against 1.00x, so it keeps the usual ones).
                if blocked is not None and nchwc.every_bn_folded(blocked):
                    source, self.curve_exact = blocked, True
            self._split_curve(source, curve_cache, curve_build_after)
        self.swa = None if artifact.swa_file is None else open_session(artifact.swa_file, providers, settings, *SWA_IO)
        self.providers = {"ensemble": self.ensemble.get_providers()[0]}
        if self.curve is not None:
            self.providers["curve"] = self.curve.get_providers()[0]
        if self.swa is not None:
            self.providers["swa"] = self.swa.get_providers()[0]
        for graph, provider in self.providers.items():
            logger.info("%s session runs on %s", graph, provider)

    def _split_curve(self, source: Path | bytes, capacity: int, build_after: int) -> None:
        """The fixed-t cache, from the curve graph cut in two (serving/fixed_t.py). A graph the
        split cannot handle is served without a cache."""
        try:
            self._split = CurveSplit(source)
            self._t_part = open_session(
                self._split.t_part, ["CPUExecutionProvider"], SessionSettings(1, False), {"t"}, set()
            )
        except Exception as exc:  # curve.onnx still answers every t correctly
            logger.warning("curve served without fixed-t sessions: %s", exc)
            return
        self.curve_cache = FixedTCache(self._fixed_session, capacity, build_after)

    def _block_curve(self, path: Path) -> bytes | None:
        """The general curve session on the blocked CPU kernels (serving/nchwc.py), when this
        CPU has them and the rewritten graph answers within nchwc.CHECK_ATOL of curve.onnx;
        the rewritten graph, or None when curve.onnx is served as exported."""
        assert self.curve is not None
        try:
            block = nchwc.block_size()
            graph = None if block is None else nchwc.nchwc_graph(path, block)
            if graph is None:
                return None
            session = open_session(graph, self._providers, self._settings, *CURVE_IO)
            worst = nchwc.largest_difference(
                session, self.curve, self.artifact.input_shape, self.artifact.input_range
            )
        except Exception as exc:  # curve.onnx as exported answers every t correctly
            logger.warning("curve.onnx served as exported: its NCHWc rewrite failed: %s", exc)
            return None
        if not worst <= nchwc.CHECK_ATOL:  # also NaN
            logger.warning(
                "curve.onnx served as exported: its NCHWc rewrite differs by %.3g (> %g)", worst, nchwc.CHECK_ATOL
            )
            return None
        logger.info("curve: new t on onnxruntime's NCHWc convolutions (block %d, max diff %.2g)", block, worst)
        self.curve, self.curve_blocked = session, True
        return graph

    def fixed_graph(self, t: float) -> bytes:
        """The curve's x-part with w(t) and the BN statistics at t as constants (ONNX bytes)."""
        values = self._t_part.run(self._split.boundary, {"t": np.array([t_key(t)], dtype=np.float32)})
        return self._split.fixed(values)

    def _fixed_session(self, t: float) -> ort.InferenceSession:
        # prepacked constant weights sum in another order than the general session's run-time ones
        return open_session(self.fixed_graph(t), self._providers, self._settings, {"x"}, {"probabilities"},
                     prepack=not self.curve_exact)

    def run_ensemble(self, _key: Any, x: np.ndarray) -> list[np.ndarray]:
        """[mean probabilities [N, C], member probabilities [K, N, C]]."""
        return self._timed("ensemble", self.ensemble, ["probabilities", "member_probabilities"], {"x": x})

    def run_swa(self, _key: Any, x: np.ndarray) -> list[np.ndarray]:
        """[probabilities [N, C] of the SWA network]."""
        assert self.swa is not None
        return self._timed("swa", self.swa, ["probabilities"], {"x": x})

    def run_curve(self, t: float, x: np.ndarray) -> list[np.ndarray]:
        """[probabilities [N, C] of the model at phi(t)]: a cached fixed-t session, or the
        general one (a t asked for again starts a build for next time)."""
        assert self.curve is not None
        if self.curve_cache is not None and (fixed := self.curve_cache.get(t)) is not None:
            return self._timed("curve", fixed, ["probabilities"], {"x": x})
        return self._timed("curve", self.curve, ["probabilities"], {"x": x, "t": np.array([t_key(t)], dtype=np.float32)})

    def _timed(self, graph: str, session: ort.InferenceSession, names: list[str],
               feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        options = _SHRINK if len(feeds["x"]) >= SHRINK_ROWS else None
        if self.observe is None:
            return session.run(names, feeds, options)
        started = time.perf_counter()
        outputs = session.run(names, feeds, options)
        self.observe(graph, len(feeds["x"]), time.perf_counter() - started)
        return outputs

    def preload_curve(self, ts: Sequence[float], batch_sizes: Sequence[int] = (1,)) -> None:
        """Build (and warm up) the fixed-t sessions of `ts` now, e.g. before readiness."""
        if self.curve_cache is None:
            return
        for t in ts:
            session = self.curve_cache.build_now(t)
            for n in batch_sizes:
                session.run(None, {"x": np.zeros((n, *self.artifact.input_shape), np.float32)})

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run every graph once per batch size, so first requests don't pay for allocation."""
        for n in batch_sizes:
            x = np.zeros((n, *self.artifact.input_shape), dtype=np.float32)
            self.run_ensemble(None, x)
            if self.swa is not None:
                self.run_swa(None, x)
            if self.curve is not None:
                self.curve.run(["probabilities"], {"x": x, "t": np.array([0.5], np.float32)})

    def close(self) -> None:
        if self.curve_cache is not None:
            self.curve_cache.close()


# After a large batch, onnxruntime's arena keeps the batch's buffers (about 85 MB per demo
# ensemble session at 1,024 rows) for good; shrinking it after such runs gives them back at
# no measurable cost to the run, while small batches keep the arena's reuse.
SHRINK_ROWS = 256
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0;gpu:0")


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else str(provider)


def open_session(
    source: Path | bytes,
    providers: Sequence[Any],
    settings: SessionSettings,
    inputs: set[str],
    outputs: set[str],
    prepack: bool = True,
) -> ort.InferenceSession:
    """A session of the graph at `source` (a file, or a serialized graph serving/fixed_t.py made)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = settings.threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.spinning else "0"
    )
    path = source if isinstance(source, Path) else Path("<curve graph built at load>")
    model = str(source) if isinstance(source, Path) else source
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime's load errors share no base class below Exception
        raise ArtifactError(f"{path}: onnxruntime cannot load this graph: {exc}") from exc
    # The graph names are the contract (docs/manifest.md): refuse a graph that breaks it
    # at load time rather than on the first request.
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    if have_in != inputs or not outputs <= have_out:
        raise ArtifactError(
            f"{path.name}: graph inputs {sorted(have_in)} / outputs {sorted(have_out)}; "
            f"expected inputs {sorted(inputs)} and outputs including {sorted(outputs)}"
        )
    return session


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis, in float64 (0 log 0 = 0)."""
    p = p.astype(np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def summarize(
    mean_probs: np.ndarray,
    per_model_probs: np.ndarray,
    class_names: Sequence[str],
    answered: np.ndarray | None = None,
) -> dict[str, list[Any]]:
    """Response fields from the averaged distribution [N, C] and the averaged models' [M, N, C].

    `answered`: the probabilities returned (temperature-scaled ones), default `mean_probs`;
    the predictions and `agreement` follow them. The uncertainty describes the models as
    exported, decomposed (README, "HTTP API"): total = H(mean p); expected (aleatoric) =
    mean over models of H(p_m); mutual information (epistemic) = total - expected, which is
    >= 0 by Jensen's inequality; float32 rounding can make it -1e-8 for models that agree,
    so it is clipped at 0. (A temperature rescales each distribution on its own, which
    breaks that identity, so the decomposition stays with the raw models.)"""
    answered = mean_probs if answered is None else answered
    total, expected, information = _decomposition(mean_probs, per_model_probs)
    predictions, agreement = _votes(answered, per_model_probs)
    return _fields(answered, predictions, class_names, total, expected, information, agreement)


class RowAnswers(NamedTuple):
    """What /predict answers for a batch of rows: a batch is summarised once, in the session's
    thread, and each request takes its rows (serving/batching.py splits the arrays along
    SPLIT_AXES), instead of a dozen small numpy calls per request. Predictions and agreement
    are the calibrated probabilities'; a raw request recomputes its own from `members`."""

    probabilities: np.ndarray  # [N, C] as the graph gave them
    calibrated: np.ndarray  # [N, C] at the temperature (the same array without one)
    members: np.ndarray  # [M, N, C]
    predictions: np.ndarray
    agreement: np.ndarray
    entropy: np.ndarray
    expected_entropy: np.ndarray
    mutual_information: np.ndarray
    finite: np.ndarray  # [N] bool: the row's probabilities are all finite

    @classmethod
    def of(cls, mean_probs: np.ndarray, per_model_probs: np.ndarray, temperature: float | None) -> RowAnswers:
        """`summarize`'s statistics for every row, the probabilities also at `temperature`."""
        calibrated = mean_probs if temperature is None else scale(mean_probs, temperature)
        return cls(mean_probs, calibrated, per_model_probs, *_votes(calibrated, per_model_probs),
                   *_decomposition(mean_probs, per_model_probs), np.isfinite(mean_probs).all(axis=1))

    def fields(self, class_names: Sequence[str], calibrated: bool) -> dict[str, list[Any]]:
        if calibrated:
            answered, (predictions, agreement) = self.calibrated, (self.predictions, self.agreement)
        else:
            answered, (predictions, agreement) = self.probabilities, _votes(self.probabilities, self.members)
        return _fields(answered, predictions, class_names, self.entropy, self.expected_entropy,
                       self.mutual_information, agreement)


# the axis of the rows in each of RowAnswers' arrays
SPLIT_AXES = tuple(1 if name == "members" else 0 for name in RowAnswers._fields)


def _decomposition(mean_probs: np.ndarray, per_model_probs: np.ndarray) -> tuple[np.ndarray, ...]:
    total = entropy(mean_probs)
    expected = entropy(per_model_probs).mean(axis=0)
    return total, expected, np.maximum(total - expected, 0.0)


def _votes(answered: np.ndarray, per_model_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions = answered.argmax(axis=1)
    return predictions, (per_model_probs.argmax(axis=2) == predictions[None, :]).mean(axis=0)


def _fields(answered: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], total: np.ndarray,
            expected: np.ndarray, information: np.ndarray, agreement: np.ndarray) -> dict[str, list[Any]]:
    return {
        "probabilities": answered.tolist(),
        "predictions": predictions.tolist(),
        "labels": [class_names[i] for i in predictions],
        "entropy": total.tolist(),
        "expected_entropy": expected.tolist(),
        "mutual_information": information.tolist(),
        "agreement": agreement.tolist(),
    }
