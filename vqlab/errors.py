"""Errors that mean "the user asked for something impossible", as opposed to a bug in vqlab.

The command lines (``python -m vqlab.train``, ``vqlab.evaluate``) print a ``UserError`` as one
line, ``error: <message>``, and exit with status 2; anything else keeps its traceback. Every
subclass also derives from the built-in exception it replaced (``ValueError``,
``FileNotFoundError``...), so callers that catch those keep working. The others live beside the
code that raises them: ``vqlab.schema.ConfigError``, ``vqlab.weights.MissingWeightsError``,
``vqlab.data.DataError``, ``vqlab.distributed.DeviceError``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config value, a file or folder, a device or a request that cannot be honoured.
    The message names the key or path to fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a config implies) is not there."""


class ResumeError(UserError, ValueError):
    """``--resume`` asks to continue a run in a way that cannot give the run that was started."""


class RunExistsError(UserError, FileExistsError):
    """A new run is asked for in a folder that already holds another run."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file cannot be read (truncated, not a checkpoint), or holds another model's weights."""
