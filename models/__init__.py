"""Architectures as plain nn.Modules behind one registry."""

from modeconn.models import cnn1d, preresnet, vgg, wideresnet  # noqa: F401  (registers the architectures)
from modeconn.models.registry import ModelSpecError, build_model, list_models, register_model

__all__ = ["ModelSpecError", "build_model", "list_models", "register_model"]
