"""The one base of every error a user can cause and fix: a bad config, data folder,
checkpoint, run folder, artifact or request. The CLI prints these as one line; anything
else is a bug and keeps its traceback.

It lives in the neutral contract package that both training and serving import (serving
must not import training, and training must not reach into serving); `models/` raises its
own ModelSpecError, which the training side turns into a ConfigError.
"""

from __future__ import annotations


class ModeconnError(ValueError):
    """A user-facing error; the message names the field, file or folder at fault."""
