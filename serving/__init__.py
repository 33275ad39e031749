"""Serving stage: reads exported artifacts (docs/manifest.md) and serves them with BentoML.

Imports neither torch, `training` nor `models`; the serving image holds onnxruntime,
numpy, pydantic and bentoml only.
"""
