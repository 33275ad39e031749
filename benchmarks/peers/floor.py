"""The floor: Starlette + uvicorn + onnxruntime, nothing else. The session runs inline on
the event loop (no thread hop, no queue, no batching): the least a server can add to a
request. Run: `python -m uvicorn benchmarks.peers.floor:app --workers N`."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from benchmarks.peers.common import BINARY, Model

MODEL = Model.from_env()


async def predict(request: Request) -> Response:
    body = await request.body()
    try:
        if request.headers.get("content-type", "").startswith(BINARY):
            x = MODEL.from_binary(body)
        else:
            x = MODEL.from_json(body)
    except (ValueError, KeyError, TypeError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(MODEL.answer(*MODEL.run(x)))


async def ready(_: Request) -> Response:
    return Response("ok")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", ready)])
