"""What every peer shares: the artifact's ensemble session, opened with the same onnxruntime
settings as modeconn's (serving/runtime.py), request decoding, and the response fields."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from modeconn.contract.artifact import load_artifact
from modeconn.serving.runtime import summarize

BINARY = "application/octet-stream"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class Model:
    """The ensemble graph of the artifact at PEER_ARTIFACT, warmed up."""

    session: ort.InferenceSession
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]

    @classmethod
    def from_env(cls) -> Model:
        art = load_artifact(os.environ["PEER_ARTIFACT"])
        options = ort.SessionOptions()  # as serving/runtime.py's open_session
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = env_int("PEER_ORT_THREADS", 0)
        spinning = os.environ.get("PEER_ORT_SPINNING", "1")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = ort.InferenceSession(str(art.ensemble_file), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        model = cls(session, art.input_shape, art.class_names)
        for n in (1, 8, 32, 64):  # the warm-up modeconn's service does
            model.run(np.zeros((n, *art.input_shape), dtype=np.float32))
        return model

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, members = self.session.run(["probabilities", "member_probabilities"], {"x": x})
        return mean, members

    def from_json(self, body: bytes | dict[str, Any]) -> np.ndarray:
        data = json.loads(body) if isinstance(body, bytes | bytearray) else body
        return self.check(np.asarray(data["inputs"], dtype=np.float32))

    def from_binary(self, body: bytes) -> np.ndarray:
        """Raw little-endian float32, C order; rows = bytes / (4 * prod(input shape))."""
        row = 4 * int(np.prod(self.input_shape))
        if not body or len(body) % row:
            raise ValueError(f"body of {len(body)} bytes is not a whole number of {row}-byte rows")
        return np.frombuffer(body, dtype="<f4").reshape(-1, *self.input_shape)

    def check(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"inputs of shape {x.shape}, expected [N, {', '.join(map(str, self.input_shape))}]")
        return x

    def answer(self, mean: np.ndarray, members: np.ndarray) -> dict[str, list[Any]]:
        return summarize(mean, members, self.class_names)

    def rows(self, mean: np.ndarray, members: np.ndarray) -> list[dict[str, Any]]:
        """One dict per row (for batching APIs that split outputs by row)."""
        fields = self.answer(mean, members)
        return [{k: v[i] for k, v in fields.items()} for i in range(len(mean))]
