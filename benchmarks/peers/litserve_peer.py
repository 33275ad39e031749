"""LitServe with its batching in front of the ensemble graph: one LitAPI whose requests the
inference workers (PEER_WORKERS processes) collect into batches of up to
PEER_MAX_BATCH_ROWS requests, waiting at most PEER_LITSERVE_WAIT_S for company.

A wait of 0 makes LitServe's worker loop poll its queue without blocking (a core per idle
worker, loops/base.py collate_requests); any positive wait polls every 1 ms and always waits
the whole window, so the default is 1 ms. JSON and raw float32 bodies share /predict: the
request parameter is FastAPI's `Body()` of any type, so a JSON body arrives parsed and an
application/octet-stream body as bytes (LitServe's own `Request` type would call .json()).
Run: `python -m benchmarks.peers.litserve_peer PORT`.
"""

# No `from __future__ import annotations`: LitServe hands decode_request's annotation to
# FastAPI as the endpoint's parameter type, which must be the object, not a string.
import os
import sys
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Body

from benchmarks.peers.common import Model, env_int


class EnsembleAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = Model.from_env()

    def decode_request(self, request: Annotated[Any, Body()]) -> np.ndarray:
        if isinstance(request, bytes | bytearray):
            return self.model.from_binary(bytes(request))
        return self.model.from_json(request)

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:  # noqa: UP006
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, batch: Any) -> Any:
        if isinstance(batch, np.ndarray):  # max_batch_size 1: no batch() call
            return self.model.answer(*self.model.run(batch))
        x, counts = batch
        mean, members = self.model.run(x)
        out, start = [], 0
        for n in counts:
            out.append(self.model.answer(mean[start:start + n], members[:, start:start + n]))
            start += n
        return out

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    port = int(sys.argv[1])
    api = EnsembleAPI(max_batch_size=env_int("PEER_MAX_BATCH_ROWS", 1024),
                      batch_timeout=float(os.environ.get("PEER_LITSERVE_WAIT_S", "0.001")))
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=env_int("PEER_WORKERS", 1),
                          timeout=60)
    server.run(host="127.0.0.1", port=port, num_api_servers=env_int("PEER_API_SERVERS", 1),
               log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
